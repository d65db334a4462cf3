import json

import numpy as np
import pytest

from select2think import DecodeConfig, S2TError, generate
from select2think.decoding.calibrate import calibrate, calibrate_many, load_threshold, quantile_paths, step_statistics

PROMPTS = ["What is 2+2?", "Tell me a long story about a cat and a dog.", "Hi", "Solve x^2 = 9 for x."]


@pytest.fixture(scope="module")
def kl_thresholds(tiny_pair):
    """Quantiles of the tiny pair's KL statistic, so triggers fire at moderate rates."""
    stats = step_statistics(tiny_pair, ["Count to ten.", "Name a color."], "kl", max_new_tokens=40)
    return {q: float(np.quantile(stats, q)) for q in (0.5, 0.8, 0.95)}


def ids(result):
    return [g.token_ids for g in result.generations]


def run(pair, fast, bs, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", 32)
    return generate(pair, prompts, DecodeConfig(fast=fast, **kw), batch_size=bs)


@pytest.mark.parametrize(
    "policy,k,q,draft", [("s2t", 8, 0.8, 16), ("s2t", 2, 0.5, 4), ("takeover", 8, 0.8, 8), ("s2t", 64, 0.95, 1)]
)
def test_draft_verify_matches_reference(tiny_pair, kl_thresholds, policy, k, q, draft):
    cfg = {"policy": policy, "k": k, "trigger": "kl", "threshold": kl_thresholds[q], "draft_len": draft}
    ref = run(tiny_pair, False, 1, **cfg)
    fast1 = run(tiny_pair, True, 1, **cfg)
    fast4 = run(tiny_pair, True, 4, **cfg)
    ref4 = run(tiny_pair, False, 3, **cfg)
    assert fast1.path == "draft-verify" and ref.path == "reference"
    assert ids(fast1) == ids(ref) == ids(fast4) == ids(ref4)
    assert ref.stats.triggers > 0 and ref.stats.flips > 0  # the comparison exercised selections
    assert fast1.stats.triggers == ref.stats.triggers and fast1.stats.flips == ref.stats.flips
    assert ref.stats.llm_forwards == ref.stats.generated_tokens
    if draft > 1:
        assert fast1.stats.llm_forwards < ref.stats.llm_forwards


@pytest.mark.parametrize("trigger,threshold", [("entropy", None), ("margin", None), ("random", 0.7), ("always", None)])
def test_lazy_llm_matches_reference(tiny_pair, trigger, threshold):
    if threshold is None and trigger != "always":
        stats = step_statistics(tiny_pair, ["Count to ten."], trigger, max_new_tokens=30)
        threshold = float(np.quantile(stats, 0.7))
    cfg = {"policy": "s2t", "k": 4, "trigger": trigger, "threshold": threshold}
    ref = run(tiny_pair, False, 1, **cfg)
    fast = run(tiny_pair, True, 1, **cfg)
    fast_b = run(tiny_pair, True, 4, **cfg)
    assert fast.path == "lazy-llm"
    assert ids(fast) == ids(ref) == ids(fast_b)
    assert ref.stats.triggers > 0
    if trigger != "always":
        assert fast.stats.llm_forwards < ref.stats.llm_forwards


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_is_batch_invariant_and_seeded(tiny_pair, seed):
    a = run(tiny_pair, True, 1, policy="sample", seed=seed)
    b = run(tiny_pair, True, 4, policy="sample", seed=seed)
    assert ids(a) == ids(b)
    c = run(tiny_pair, True, 1, policy="sample", seed=seed + 10)
    assert ids(a) != ids(c)


def test_greedy_and_llm_alone_use_one_model(tiny_pair):
    g = run(tiny_pair, True, 2, policy="greedy")
    assert g.stats.llm_forwards == 0 and g.stats.llm_tokens == 0 and g.stats.flips == 0
    alone = run(tiny_pair, True, 2, policy="llm")
    assert alone.stats.slm_forwards == 0 and alone.stats.llm_forwards > 0
    assert ids(g) != ids(alone)


def test_stop_rules(tiny_pair):
    first = run(tiny_pair, True, 1, prompts=["Hi"], policy="greedy", max_new_tokens=5).generations[0]
    assert len(first.token_ids) == 5 and first.finish_reason == "length"
    eos = run(tiny_pair, True, 1, prompts=["Hi"], policy="greedy", extra_eos=(first.token_ids[2],))
    assert eos.generations[0].token_ids == first.token_ids[:3] and eos.generations[0].finish_reason == "eos"
    text = first.text
    stop = text[len(text) // 2 :][:3]
    if stop.strip():
        st = run(tiny_pair, True, 1, prompts=["Hi"], policy="greedy", max_new_tokens=5, stop=(stop,))
        assert st.generations[0].finish_reason == "stop" and stop not in st.texts[0]


def test_stats_hit_at_k_is_reported_at_triggers(tiny_pair, kl_thresholds):
    r = run(tiny_pair, True, 2, policy="s2t", trigger="kl", threshold=kl_thresholds[0.5], k=64)
    assert r.stats.hit_checked == r.stats.triggers > 0
    assert r.stats.hit_at_k is not None and 0.0 <= r.stats.hit_at_k <= 1.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"k": 0}, "k must be between 1 and 64"),
        ({"k": 65}, "k must be"),
        ({"policy": "s2t", "trigger": "kl"}, "needs a threshold"),
        ({"policy": "nope"}, "unknown policy"),
    ],
)
def test_bad_config_is_refused(kw, msg):
    with pytest.raises(S2TError, match=msg):
        DecodeConfig(**kw)


def test_empty_prompt_is_refused(tiny_pair):
    with pytest.raises(S2TError, match="empty prompt"):
        generate(tiny_pair, ["  "], policy="greedy")


def test_calibration_roundtrip_and_mismatch_checks(tiny_pair, tmp_path):
    cal = calibrate(tiny_pair, ["Count to ten.", "Name a color."], "kl", 0.8, dataset="unit", max_new_tokens=30)
    path = tmp_path / "kl.json"
    cal.save(path)
    thr = load_threshold(path, "kl", "tiny-slm", "tiny-llm")
    assert thr == pytest.approx(cal.threshold) and json.loads(path.read_text())["n_steps"] > 20
    r = run(
        tiny_pair,
        True,
        2,
        prompts=["Count to ten.", "Name a color."],
        policy="s2t",
        trigger="kl",
        threshold=thr,
        max_new_tokens=30,
    )
    assert 0.05 < r.stats.trigger_rate < 0.4  # about 20% of steps after warm-up
    with pytest.raises(S2TError, match="trigger 'kl', not 'entropy'"):
        load_threshold(path, "entropy", "tiny-slm", "tiny-llm")
    with pytest.raises(S2TError, match="LLM 'tiny-llm', not 'other'"):
        load_threshold(path, "kl", "tiny-slm", "other")
    with pytest.raises(S2TError, match="not found"):
        load_threshold(tmp_path / "missing.json", "kl", "tiny-slm", "tiny-llm")
    with pytest.raises(S2TError, match="strictly between 0 and 1"):
        calibrate(tiny_pair, ["x"], "kl", 1.0)


def test_several_quantiles_from_one_decode_equal_one_at_a_time(tiny_pair):
    prompts, kw = ["Count to ten.", "Name a color."], {"max_new_tokens": 24}
    many = calibrate_many(tiny_pair, prompts, "entropy", [0.5, 0.9], **kw)
    one = [calibrate(tiny_pair, prompts, "entropy", q, **kw) for q in (0.5, 0.9)]
    assert [c.threshold for c in many] == pytest.approx([c.threshold for c in one])
    assert many[0].threshold < many[1].threshold and [c.quantile for c in many] == [0.5, 0.9]
    assert quantile_paths("e{q}.json", [0.9, 0.95]) == ["e0.9.json", "e0.95.json"]
    assert quantile_paths("e.json", [0.9]) == ["e.json"]
    with pytest.raises(S2TError, match="need \\{q\\} in --out"):
        quantile_paths("e.json", [0.9, 0.95])
    with pytest.raises(S2TError, match="repeats"):
        quantile_paths("e{q}.json", [0.9, 0.9])


def test_cli_refuses_test_split_and_bad_k(capsys):
    from select2think.cli import main

    assert main(["calibrate", "--slm", "tiny-slm", "--llm", "tiny-llm", "--dataset", "gsm8k", "--out", "x.json"]) == 2
    assert "test split" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--slm",
                "tiny-slm",
                "--llm",
                "tiny-llm",
                "--policy",
                "s2t",
                "--k",
                "65",
                "--threshold",
                "1.0",
                "hi",
            ]
        )
        == 2
    )
    assert "k must be between 1 and 64" in capsys.readouterr().err
    assert main(["calibrate", "--quantile", "1.5", "--out", "x.json"]) == 2
    assert main(["calibrate", "--quantile", "0.9", "--quantile", "0.95", "--out", "x.json"]) == 2
    assert "{q}" in capsys.readouterr().err


def test_cli_generate_json(capsys, tiny_pair):
    from select2think.cli import main

    assert (
        main(
            [
                "generate",
                "--slm",
                "tiny-slm",
                "--llm",
                "tiny-llm",
                "--policy",
                "s2t",
                "--trigger",
                "entropy",
                "--threshold",
                "0.0",
                "--max-new-tokens",
                "8",
                "--dtype",
                "fp32",
                "--json",
                "Hello",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == "lazy-llm" and out["stats"]["generated_tokens"] == 8 and out["stats"]["triggers"] == 5


@pytest.mark.parametrize("trigger,threshold", [("always", None), ("kl", -1.0)])
def test_a_row_finishing_before_any_trigger_does_not_break_the_batch(tiny_pair, trigger, threshold):
    prompts = ["Hi", "Tell me a long story about a cat and a dog."]
    greedy = generate(tiny_pair, prompts, DecodeConfig(policy="greedy", max_new_tokens=12), batch_size=2)
    stop_tok = greedy.generations[0].token_ids[1]  # row 0 ends at step 2, before warm-up ends
    cfg = {
        "policy": "s2t",
        "trigger": trigger,
        "threshold": threshold,
        "warmup": 6,
        "max_new_tokens": 12,
        "extra_eos": (stop_tok,),
    }
    ref = generate(tiny_pair, prompts, DecodeConfig(fast=False, **cfg), batch_size=1)
    fast = generate(tiny_pair, prompts, DecodeConfig(fast=True, **cfg), batch_size=2)
    assert [g.token_ids for g in fast.generations] == [g.token_ids for g in ref.generations]
    assert fast.generations[0].finish_reason == "eos" and fast.stats.triggers > 0


@pytest.mark.parametrize(
    "policy,extra",
    [
        ("greedy", {}),
        ("sample", {"seed": 3}),
        ("llm", {}),
        ("s2t", {"trigger": "always", "fast": False}),
        ("s2t", {"trigger": "kl", "threshold": 0.0}),  # draft-verify
        ("takeover", {"trigger": "entropy", "threshold": 0.0}),  # lazy LLM
        ("s2t-local", {"trigger": "always"}),
    ],
)
def test_a_row_retired_early_leaves_the_batch_output_unchanged(tiny_pair, policy, extra):
    prompts = ["Hi", "Tell me a long story about a cat and a dog.", "Count to ten."]
    free = generate(tiny_pair, prompts[:1], DecodeConfig(policy=policy, max_new_tokens=10, **extra), batch_size=1)
    cfg = DecodeConfig(policy=policy, max_new_tokens=10, extra_eos=(free.generations[0].token_ids[1],), **extra)
    alone = generate(tiny_pair, prompts, cfg, batch_size=1)
    batched = generate(tiny_pair, prompts, cfg, batch_size=3)
    assert batched.generations[0].finish_reason == "eos" and len(batched.generations[0].token_ids) == 2
    assert [g.token_ids for g in batched.generations] == [g.token_ids for g in alone.generations]
    assert batched.stats.generated_tokens == alone.stats.generated_tokens
