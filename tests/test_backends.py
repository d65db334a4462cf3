"""The backend contract, run against every engine that is installed (transformers always; llama.cpp on the
tiny pair written as a GGUF when llama-cpp-python is importable). Reference: the same engine, one row,
the whole sequence in one call."""

import importlib.util

import pytest
import torch

from select2think.backends.base import Backend

ENGINES = ["hf"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
TOL = {"hf": 1e-4, "llama.cpp": 1e-2}  # llama.cpp: f16 KV cache cells, kernels that depend on the batch shape


def make(engine: str) -> Backend:
    from select2think.backends import load_backend

    return load_backend("tiny-slm", engine, dtype="fp32", device="cpu")[0]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param, make(request.param)


def last_logits(b: Backend, seq: list[int]) -> torch.Tensor:
    """Reference: a fresh single row holding `seq`; raw logits [V] after its last token."""
    b.reset(1)
    ids = torch.tensor([seq])
    return b.extend(ids, torch.ones_like(ids, dtype=torch.bool))[0, -1]


def close(a, b, name):
    return torch.allclose(a, b, atol=TOL[name] * float(b.abs().max()), rtol=TOL[name])


PROMPTS = [[1, 504, 2201, 30], [7, 8], [99, 17, 30, 45, 12]]


def prefill(b: Backend, prompts=PROMPTS):
    from select2think.decoding.state import left_pad

    b.reset(len(prompts))
    ids, live = left_pad(prompts, 0)
    return b.extend(ids, live)


def test_batched_extend_equals_one_row_at_a_time(engine):
    name, b = engine
    refs = [last_logits(b, p) for p in PROMPTS]
    out = prefill(b)
    assert out.shape == (3, 5, b.vocab_rows)
    for r in range(3):
        assert close(out[r, -1], refs[r], name)
        assert b.length(r) == len(PROMPTS[r])
    step = b.extend(torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.bool), last_only=True)
    assert step.shape == (3, 1, b.vocab_rows)
    for r, t in enumerate([5, 6, 7]):
        assert close(step[r, 0], last_logits(b, PROMPTS[r] + [t]), name)


def test_truncate_then_extend_equals_never_having_extended(engine):
    name, b = engine
    prefill(b)
    b.extend(torch.tensor([[5, 6, 7]] * 3), torch.ones(3, 3, dtype=torch.bool))
    b.truncate(1, len(PROMPTS[1]) + 1)  # row 1 keeps its first drafted token only
    assert b.length(1) == len(PROMPTS[1]) + 1 and b.length(0) == len(PROMPTS[0]) + 3
    live = torch.tensor([[False], [True], [False]])
    out = b.extend(torch.tensor([[0], [9], [0]]), live)
    assert close(out[1, -1], last_logits(b, PROMPTS[1] + [5, 9]), name)


def test_retired_rows_leave_and_the_others_are_unchanged(engine):
    name, b = engine
    prefill(b)
    b.retire([1])
    live = torch.tensor([[True], [False], [True]])
    first = b.extend(torch.tensor([[5], [0], [6]]), live)
    second = b.extend(torch.tensor([[3], [0], [4]]), live)
    assert not first[1].any() and not second[1].any()
    assert b.row_tokens == [len(PROMPTS[0]) + 2, len(PROMPTS[1]), len(PROMPTS[2]) + 2]
    assert close(first[0, -1], last_logits(make(name), PROMPTS[0] + [5]), name)
    assert close(second[2, -1], last_logits(make(name), PROMPTS[2] + [6, 4]), name)


@pytest.mark.parametrize("retired", [False, True])
def test_an_admitted_row_starts_over_and_the_others_are_unchanged(engine, retired):
    """Continuous batching: a row (retired or still held) starts over mid-batch as a fresh row would."""
    name, b = engine
    if name == "hf":
        b.repack_slack = 0  # re-pack the slots at every admission: the layout must not matter
    prefill(b)
    if retired:
        b.retire([1])
    b.admit(1)
    assert b.length(1) == 0 and b.row_tokens[1] == 0
    new = [42, 43, 44, 45, 46, 47]
    ids = torch.zeros(3, len(new), dtype=torch.long)
    ids[1] = torch.tensor(new)
    live = torch.zeros(3, len(new), dtype=torch.bool)
    live[1] = True
    got = b.extend(ids, live, last_only=True)
    step = b.extend(torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.bool), last_only=True)
    assert b.length(1) == len(new) + 1 and b.row_tokens[1] == len(new) + 1
    ref = make(name)
    assert close(got[1, 0], last_logits(ref, new), name)
    for r, t in enumerate([5, 6, 7]):
        seq = [*new, t] if r == 1 else PROMPTS[r] + [t]
        assert close(step[r, 0], last_logits(ref, seq), name)
    if name == "hf":
        del b.repack_slack


def test_rows_retired_all_at_once_leave_the_hf_cache_when_a_newcomer_arrives():
    b = make("hf")
    prefill(b)
    b.retire([0, 1, 2])  # the cache keeps them (it never goes empty) ...
    b.admit(2)
    assert b.rows == [2]  # ... until a newcomer holds a row: then they are dropped
    b.admit(0)
    assert b.rows == [2, 0] and b.length(0) == b.length(2) == 0


@pytest.mark.parametrize("rows", [[0, 1, 2], [2, 0]])
def test_sibling_scoring_equals_separate_forwards_and_keep_advances_the_row(engine, rows):
    name, b = engine
    cands = torch.tensor([[11, 22, 33, 44], [55, 66, 77, 88], [5, 6, 7, 8]])[: len(rows)]
    prefill(b)
    b.want_hidden = True
    out = b.score_siblings(rows, cands)
    hidden = b.last_hidden
    b.want_hidden = False
    assert out.shape == (len(rows), 4, b.vocab_rows) and hidden.shape == (len(rows), 4, b.hidden_size)
    for i, r in enumerate(rows):
        for k in range(4):
            assert close(out[i, k], last_logits(make(name), PROMPTS[r] + [int(cands[i, k])]), name)
    prefill(b)
    b.score_siblings(rows, cands)
    b.keep_siblings({r: i + 1 for i, r in enumerate(rows)})
    for r in rows:
        assert b.length(r) == len(PROMPTS[r]) + 1
    feed = torch.tensor([[3], [4], [5]])
    nxt = b.extend(feed, torch.ones(3, 1, dtype=torch.bool))
    for r in range(3):
        kept = [int(cands[rows.index(r), rows.index(r) + 1])] if r in rows else []
        assert close(nxt[r, -1], last_logits(make(name), PROMPTS[r] + kept + [int(feed[r, 0])]), name)


def test_hidden_states_project_onto_the_logits(engine):
    name, b = engine
    if name != "hf":
        pytest.skip("the output head's weights are read from transformers")
    b.want_hidden = True
    out = prefill(b)
    b.want_hidden = False
    head = b.model.get_output_embeddings()
    assert torch.allclose(head(b.last_hidden[:, -1]), out[:, -1], atol=1e-4)


def test_engines_agree_on_the_same_weights():
    if len(ENGINES) < 2:
        pytest.skip("llama-cpp-python is not installed")
    hf, cpp = make("hf"), make("llama.cpp")
    for p in PROMPTS:
        assert close(last_logits(cpp, p), last_logits(hf, p), "llama.cpp")  # tight (1e-4) in test_llamacpp.py


def _one_error_line(capsys, argv) -> str:
    from select2think.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_llamacpp_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    hf_dir = tmp_path / "hf-model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    err = _one_error_line(capsys, ["generate", "--backend", "llama.cpp", "--slm", str(hf_dir), "hi"])
    assert "needs a GGUF model" in err and "qwen2.5-coder-0.5b-instruct" in err
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "empty.gguf" in _one_error_line(capsys, ["generate", "--backend", "llama.cpp", "--slm", str(empty), "hi"])
    torn = tmp_path / "torn.gguf"
    torn.write_bytes(b"GGUF" + b"\0" * 64)
    assert "torn.gguf" in _one_error_line(capsys, ["generate", "--backend", "llama.cpp", "--slm", str(torn), "hi"])
    assert "unknown backend" in _one_error_line(capsys, ["generate", "--backend", "vllm", "hi"])
    import select2think.backends.llamacpp as cpp

    monkeypatch.setattr(cpp, "_lib", None)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if it were not installed
    err = _one_error_line(capsys, ["generate", "--backend", "llama.cpp", "--slm", "tiny-slm", "hi"])
    assert "make llama" in err


@pytest.mark.skipif("llama.cpp" not in ENGINES, reason="llama-cpp-python is not installed")
def test_every_policy_runs_on_llamacpp_and_s2t_local_matches_its_reference(tmp_path):
    import json

    from safetensors.torch import save_file

    from select2think import DecodeConfig, generate, load_pair
    from select2think.local.selector import apply_selector

    pair = load_pair("tiny-slm", "tiny-llm", backend="llama.cpp")
    assert pair.slm.n_params > 0 and pair.slm.context_length and pair.llm.n_params > pair.slm.n_params
    prompts = ["What is 2+2?", "Name a fruit.", "Hi there"]
    for kw in (
        {"policy": "greedy"},
        {"policy": "llm"},
        {"policy": "sample", "seed": 1},
        {"policy": "s2t", "trigger": "kl", "threshold": 0.5},
        {"policy": "takeover", "trigger": "entropy", "threshold": 2.0},
    ):
        out = generate(pair, prompts, DecodeConfig(max_new_tokens=12, **kw), batch_size=3)
        assert all(len(g.token_ids) > 0 for g in out.generations), kw
    torch.manual_seed(0)
    save_file(
        {"reserved_ids": torch.arange(49152, 49168), "weight": torch.randn(16, 64)},
        tmp_path / "reserved_rows.safetensors",
    )
    (tmp_path / "selector.json").write_text(json.dumps({"slm": "tiny-slm", "head_only": True, "prior_weight": 0.1}))
    local = apply_selector(load_pair("tiny-slm", None, backend="llama.cpp"), tmp_path)
    cfg = {"policy": "s2t-local", "trigger": "entropy", "threshold": 2.0, "max_new_tokens": 16}
    runs = [
        generate(local, prompts, DecodeConfig(fast=fast, **cfg), batch_size=bs)
        for fast in (True, False)
        for bs in (1, 3)
    ]
    assert runs[0].stats.triggers > 0 and runs[0].stats.flips > 0
    assert all([g.token_ids for g in r.generations] == [g.token_ids for g in runs[0].generations] for r in runs)
