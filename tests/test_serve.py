"""`s2t serve` through the real `openai` client against uvicorn on a free loopback port, on the tiny pair.

The server decodes with its own copy of the pair (its worker thread owns it); expected outputs come from
in-process `generate` on the session's pair, which holds the same weights."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import running
from select2think import DecodeConfig, generate, load_pair
from select2think.cli import main
from select2think.decoding.calibrate import step_statistics
from select2think.serve import ServeConfig, create_app

PROMPTS = ["What is 2+2?", "Tell me a story.", "Hi", "Solve x^2 = 9 for x.", "Name a fruit.", "Count to ten."]


@contextlib.contextmanager
def serving(**settings):
    pair = load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu")
    app = create_app(pair, ServeConfig(**settings))
    with running(app) as url:
        yield url, app.state.service


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server():
    with serving(max_batch=4, max_queue=64) as (url, service):
        yield url, service


@pytest.fixture(scope="module")
def entropy_threshold(tiny_pair):
    return float(np.quantile(step_statistics(tiny_pair, ["Count to ten."], "entropy", max_new_tokens=30), 0.7))


def alone(pair, prompt, chat=False, **kw):
    """The in-process reference: one prompt decoded by itself."""
    return generate(pair, [prompt], DecodeConfig(chat_template=chat, **kw), batch_size=1).generations[0]


def test_models_health_and_a_completion_equal_generate(server, tiny_pair):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["s2t"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    out = c.completions.create(
        model="s2t",
        prompt=PROMPTS[:3],
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    for i, choice in enumerate(out.choices):
        ref = alone(tiny_pair, PROMPTS[i], max_new_tokens=12)
        assert choice.index == i and choice.text == ref.text
        assert [int(t.split(":")[1]) for t in choice.logprobs.tokens] == ref.token_ids
        assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 36
    s2t = out.model_extra["s2t"]
    assert s2t["policy"] == "greedy" and s2t["generated_tokens"] == 36 and s2t["llm_forwards"] == 0


def test_chat_and_streams_equal_generate(server, tiny_pair):
    url, _ = server
    c = client(url)
    ref = alone(tiny_pair, "Name a fruit.", chat=True, max_new_tokens=15)
    msg = [{"role": "user", "content": "Name a fruit."}]
    out = c.chat.completions.create(model="s2t", messages=msg, max_tokens=15, temperature=0)
    assert out.choices[0].message.content == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(c.chat.completions.create(model="s2t", messages=msg, max_tokens=15, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].model_extra["s2t"]["generated_tokens"] == len(ref.token_ids)
    stream = c.completions.create(
        model="s2t", prompt="Hi", max_tokens=20, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == alone(tiny_pair, "Hi", max_new_tokens=20).text
    assert chunks[-1].usage.completion_tokens == 20


def test_stop_strings_cut_streamed_and_whole_text_alike(server, tiny_pair):
    url, _ = server
    c = client(url)
    full = alone(tiny_pair, PROMPTS[1], max_new_tokens=30).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    whole = c.completions.create(model="s2t", prompt=PROMPTS[1], max_tokens=30, stop=[stop]).choices[0]
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="s2t", prompt=PROMPTS[1], max_tokens=30, stop=[stop], stream=True)
        if ch.choices
    )
    assert whole.finish_reason == "stop" and whole.text == full[: full.index(stop)] == streamed


def test_s2t_settings_are_extra_body_fields(server, tiny_pair, entropy_threshold):
    url, _ = server
    settings = {"policy": "s2t", "trigger": "entropy", "threshold": entropy_threshold, "k": 4}
    out = client(url).completions.create(model="s2t", prompt=PROMPTS[0], max_tokens=24, extra_body=settings)
    ref = alone(tiny_pair, PROMPTS[0], max_new_tokens=24, **settings)
    s2t = out.model_extra["s2t"]
    assert out.choices[0].text == ref.text
    assert s2t["path"] == "lazy-llm" and s2t["triggers"] == ref.triggers > 0 and s2t["llm_forwards"] > 0


def test_concurrent_requests_share_the_batch_and_all_come_back_right(server, tiny_pair, entropy_threshold):
    url, _ = server
    c = client(url)
    jobs = [(p, 8 + 3 * i, i % 2 == 1) for i, p in enumerate(PROMPTS + PROMPTS[:2])]  # 8 requests, 2 configs
    s2t = {"policy": "s2t", "trigger": "entropy", "threshold": entropy_threshold, "k": 4}
    got: dict[int, str] = {}

    def ask(i):
        p, n, is_s2t = jobs[i]
        got[i] = (
            c.completions.create(model="s2t", prompt=p, max_tokens=n, extra_body=s2t if is_s2t else None)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == list(range(len(jobs)))
    for i, (p, n, is_s2t) in enumerate(jobs):
        assert got[i] == alone(tiny_pair, p, max_new_tokens=n, **(s2t if is_s2t else {})).text, i


def test_a_request_joining_mid_decode_gets_its_solo_tokens(server, tiny_pair):
    url, service = server
    c = client(url)
    stream = c.completions.create(model="s2t", prompt=PROMPTS[1], max_tokens=400, stream=True)
    pieces = []
    it = iter(stream)
    pieces.append(next(it).choices[0].text)  # the long request is decoding
    late = c.completions.create(
        model="s2t", prompt="Hi", max_tokens=10, logprobs=0, extra_body={"return_tokens_as_token_ids": True}
    ).choices[0]
    still_running = service.worker.active() > 0
    pieces.extend(ch.choices[0].text for ch in it if ch.choices)
    assert still_running  # the late request finished while the long one was mid-decode
    ref = alone(tiny_pair, "Hi", max_new_tokens=10)
    assert [int(t.split(":")[1]) for t in late.logprobs.tokens] == ref.token_ids
    assert "".join(pieces) == alone(tiny_pair, PROMPTS[1], max_new_tokens=400).text


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"prompt": "Hi", "policy": "bogus"}, "unknown policy"),
        ({"prompt": "Hi", "k": 0}, "k must be between 1 and 64"),
        ({"prompt": "Hi", "k": 65}, "k must be between 1 and 64"),
        ({"prompt": ""}, "empty prompt"),
        ({"prompt": []}, "prompt must not be empty"),
        ({"prompt": [[]]}, "must not be empty"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "Hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 10**7]}, "outside the vocabulary"),
        ({"prompt": "Hi", "n": 2}, "n must be 1"),
        ({"prompt": "Hi", "policy": "s2t", "trigger": "entropy", "threshold": 1.0, "logprobs": 2}, "single-model"),
        ({"prompt": "Hi", "calibration": "nope"}, "unknown calibration"),
        ({"prompt": "Hi", "policy": "s2t"}, "needs a threshold"),
        ({"prompt": "Hi", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "Hi", "policy": "llm", "temperature": 0.5}, "decodes greedily"),
        ({"prompt": "Hi", "max_tokens": 10**6}, "context"),
    ],
)
def test_bad_requests_are_400_with_an_openai_error_body(server, body, needle):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "s2t", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"]


def test_bad_chat_and_the_openai_client_raises_bad_request(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "s2t", "messages": [{"role": "user"}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="s2t", messages=[], max_tokens=3)


def test_metrics_count_requests_tokens_and_llm_calls(server, entropy_threshold):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    s2t = {"policy": "s2t", "trigger": "entropy", "threshold": entropy_threshold, "k": 4}
    client(url).completions.create(model="s2t", prompt=PROMPTS[0], max_tokens=24, extra_body=s2t)
    after = httpx.get(f"{url}/metrics").text

    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    assert (
        value(after, 's2t_requests_total{endpoint="/v1/completions",status="200"}')
        == value(before, 's2t_requests_total{endpoint="/v1/completions",status="200"}') + 1
    )
    assert value(after, "s2t_generated_tokens_total") == value(before, "s2t_generated_tokens_total") + 24
    assert value(after, "s2t_triggers_total") > value(before, "s2t_triggers_total")
    assert value(after, "s2t_llm_forwards_total") > value(before, "s2t_llm_forwards_total")
    assert value(after, 's2t_request_latency_seconds_count{endpoint="/v1/completions"}') >= 1
    assert 's2t_requests_total{endpoint="/v1/completions",status="400"}' in after


def test_queue_full_is_429_and_the_queued_request_still_completes():
    with serving(max_batch=1, max_queue=1) as (url, service):
        service.worker.pause()
        first: dict = {}
        t = threading.Thread(
            target=lambda: first.update(
                r=httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
            )
        )
        t.start()
        while service.worker.queued() == 0:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="s2t", prompt="Hi", max_tokens=3)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        service.worker.resume()
        t.join(timeout=60)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 3


def test_a_cancelled_stream_frees_its_row(tiny_pair):
    with serving(max_batch=1) as (url, service):
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4000, "stream": True}, timeout=60
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the only row was taken by the stream: the next request gets it only once the stream's row is freed
        out = client(url).completions.create(model="s2t", prompt="Name a fruit.", max_tokens=5)
        assert out.choices[0].text == alone(tiny_pair, "Name a fruit.", max_new_tokens=5).text
        metrics = httpx.get(f"{url}/metrics").text
        assert "s2t_cancelled_requests_total 1.0" in metrics
        forwards = next(line for line in metrics.splitlines() if line.startswith("s2t_slm_forwards_total"))
        assert float(forwards.split()[1]) < 1000  # the stream's row stopped long before its 4000 tokens
        assert service.worker.active() == 0 and service.worker.queued() == 0


def test_a_failing_decode_is_a_500_for_its_request_only(monkeypatch):
    from select2think.decoding.api import Decoder

    real = Decoder.run
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(self, batch)

    monkeypatch.setattr(Decoder, "run", flaky)
    with serving() as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        ok = client(url).completions.create(model="s2t", prompt="Hi", max_tokens=3)
        assert ok.usage.completion_tokens == 3 and httpx.get(f"{url}/health").status_code == 200


@torch.no_grad()
def llm_logprobs(pair, ids):
    """The LLM's log-probs [len(ids), V] after each prefix of `ids` (banned ids masked), in-process."""
    from select2think.decoding.teacher import step_logprobs
    from select2think.decoding.vocab import Vocab

    return step_logprobs(pair.llm.spawn(), ids[:1], [*ids[1:], 0], Vocab.of(pair))[0]


def test_remote_llm_contract_restricted_argmax_logprobs_and_prompt_logprobs(tiny_pair):
    prompt = [1, 504, 2201, 30, 17, 99]
    lp = llm_logprobs(tiny_pair, prompt)  # row j predicts prompt[j + 1]; the last row the next token
    allowed = lp[-1].topk(40).indices[[5, 17, 33]].tolist()  # not the argmax: the restriction must matter
    restricted = lp[-1][allowed]
    with serving(policy="llm") as (url, _):
        out = client(url).completions.create(
            model="s2t",
            prompt=[prompt, prompt[:4]],
            max_tokens=1,
            temperature=0,
            logprobs=3,
            extra_body={"allowed_token_ids": allowed, "return_tokens_as_token_ids": True, "prompt_logprobs": 2},
        )
        first = out.choices[0]
        token = int(first.logprobs.tokens[0].split(":")[1])
        assert token == allowed[int(restricted.argmax())]
        expect = float(restricted.log_softmax(-1).max())
        assert first.logprobs.token_logprobs[0] == pytest.approx(expect, abs=1e-4)
        assert set(first.logprobs.top_logprobs[0]) <= {f"token_id:{t}" for t in allowed}
        scored = first.model_extra["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(prompt)
        for pos in range(1, len(prompt)):
            entry = scored[pos][str(prompt[pos])]
            assert entry["logprob"] == pytest.approx(float(lp[pos - 1][prompt[pos]]), abs=1e-4)
            assert entry["rank"] == int((lp[pos - 1] > lp[pos - 1][prompt[pos]]).sum()) + 1
            assert len(scored[pos]) in (2, 3)
        assert len(out.choices) == 2 and out.choices[1].index == 1
        # logit_bias pushes a token to the top; unrestricted greedy is the LLM's argmax
        target = int(lp[-1].argsort()[-50])
        biased = client(url).completions.create(
            model="s2t", prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(target): 100}
        )
        assert biased.choices[0].text == tiny_pair.tokenizer.decode([target])
        plain = client(url).completions.create(model="s2t", prompt=prompt, max_tokens=1, temperature=0)
        assert plain.choices[0].text == tiny_pair.tokenizer.decode([int(lp[-1].argmax())])


def test_cli_serve_bad_options_exit_2(capsys):
    assert main(["serve", "--policy", "bogus"]) == 2
    assert main(["serve", "--model", "tiny-slm", "--llm", "tiny-llm"]) == 2
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--calibration", "nofile"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and "Traceback" not in err
