"""The static-buffer engine (`hf-static`): token-identical to the eager transformers engine in fp32, on every
execution path, batched and unbatched, through compaction and growth of its buffers. The CUDA graphs
themselves run only on a GPU (benchmarks/gpu_bench.py); here the same fixed-shape steps run eagerly."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from select2think import DecodeConfig, generate
from select2think.backends.static import StaticHFBackend
from select2think.decoding.calibrate import step_statistics

PROMPTS = ["What is 2+2?", "Tell me a long story about a cat and a dog.", "Hi", "Solve x^2 = 9 for x."]
ROOT = Path(__file__).resolve().parents[1]


def static_pair(pair, capacity=256, graphs=None):
    return dataclasses.replace(
        pair,
        slm=StaticHFBackend(pair.slm.model, graphs=graphs, capacity=capacity),
        llm=StaticHFBackend(pair.llm.model, graphs=graphs, capacity=capacity),
        engine="hf-static",
    )


def ids(result):
    return [g.token_ids for g in result.generations]


@pytest.fixture(scope="module")
def thresholds(tiny_pair):
    kl = step_statistics(tiny_pair, ["Count to ten.", "Name a color."], "kl", max_new_tokens=40)
    ent = step_statistics(tiny_pair, ["Count to ten."], "entropy", max_new_tokens=30)
    return {"kl": float(np.quantile(kl, 0.8)), "entropy": float(np.quantile(ent, 0.7))}


CASES = {
    "greedy": ({"policy": "greedy"}, "reference"),
    "llm": ({"policy": "llm"}, "reference"),
    "s2t-entropy": ({"policy": "s2t", "trigger": "entropy"}, "lazy-llm"),
    "s2t-kl": ({"policy": "s2t", "trigger": "kl"}, "draft-verify"),
    "s2t-local": ({"policy": "s2t-local", "trigger": "entropy"}, "local-tree"),
    "s2t-kl-reference": ({"policy": "s2t", "trigger": "kl", "fast": False}, "reference"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_static_engine_matches_eager_engine(tiny_pair, thresholds, case, monkeypatch):
    kw, path = CASES[case]
    trigger = kw.get("trigger")
    cfg = DecodeConfig(max_new_tokens=40, threshold=thresholds.get(trigger) if trigger else None, **kw)
    eager = generate(tiny_pair, PROMPTS, cfg, batch_size=1)
    compactions = []
    original = StaticHFBackend._compact
    monkeypatch.setattr(StaticHFBackend, "_compact", lambda self: (compactions.append(1), original(self)))
    static = static_pair(tiny_pair, capacity=48)  # a small buffer: compaction and growth both happen
    one, four = generate(static, PROMPTS, cfg, batch_size=1), generate(static, PROMPTS, cfg, batch_size=4)
    assert one.path == path
    assert ids(one) == ids(eager) == ids(four)
    assert one.stats.triggers == eager.stats.triggers
    assert (one.stats.slm_forwards, one.stats.llm_forwards) == (eager.stats.slm_forwards, eager.stats.llm_forwards)
    assert compactions and max(static.slm.capacity, static.llm.capacity) > 48


def test_rollback_and_siblings_keep_rows_independent(tiny_pair):
    """Row 1's rollback and sibling choice change nothing in row 0's predictions."""
    b = StaticHFBackend(tiny_pair.slm.model, capacity=16)
    b.reset(2)
    b.extend(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.bool))
    b.truncate(1, 1)
    assert (b.length(0), b.length(1)) == (3, 1)
    raw = b.score_siblings([0, 1], torch.tensor([[11, 12], [13, 14]]))
    b.keep_siblings({0: 1, 1: 0})
    assert (b.length(0), b.length(1)) == (4, 2)
    nxt = b.extend(torch.tensor([[20], [21]]), torch.ones(2, 1, dtype=torch.bool))
    alone = StaticHFBackend(tiny_pair.slm.model)
    alone.reset(1)
    ref = alone.extend(torch.tensor([[5, 6, 7, 12, 20]]), torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(nxt[0, -1], ref[0, -1], atol=1e-4)
    assert torch.allclose(raw[0, 1], ref[0, 3], atol=1e-4)
    b.retire([0])
    with pytest.raises(ValueError, match="retired"):
        b.length(0)


def test_graphs_fall_back_to_eager_when_capture_fails(tiny_pair, thresholds):
    """On a machine without CUDA the capture fails: the reason is kept and the tokens do not change."""
    cfg = DecodeConfig(policy="s2t", trigger="kl", threshold=thresholds["kl"], max_new_tokens=16)
    pair = static_pair(tiny_pair, graphs=True)
    assert ids(generate(pair, PROMPTS[:2], cfg)) == ids(generate(tiny_pair, PROMPTS[:2], cfg))
    assert pair.slm.graph_error is not None and pair.slm.captures == 0


def test_load_pair_names_the_static_engine():
    from select2think import load_pair
    from select2think.backends import ENGINES

    assert "hf-static" in ENGINES
    pair = load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu", backend="hf-static")
    assert isinstance(pair.slm, StaticHFBackend) and pair.engine == "hf-static"


def test_gpu_bench_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--out", str(out)]
    cmd += ["--tok", str(tmp_path / "none"), "--big-batch", "0", "--src", str(ROOT / "src")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    timed = [r for r in report["runs"] if "ms_per_token" in r]
    assert not [r for r in report["runs"] if "error" in r]
    assert {r["backend"] for r in timed} == {"hf", "hf-static"}
    assert {r["policy"] for r in timed} >= {"greedy", "llm", "s2t-kl90", "s2t-local-ent90", "s2t-kl90-reference"}
    assert report["machine"]["torch"] and report["summary"]


@pytest.mark.parametrize("engine", ["hf", "hf-static"])
def test_local_triggered_steps_apply_the_output_head_to_one_position_per_row(tiny_pair, thresholds, engine):
    """A triggered step scores K siblings for their hidden states; only the kept winner's next-token logits
    go through the output head (it was K x V per row, most of the step), and the tokens do not change."""
    pair = static_pair(tiny_pair) if engine == "hf-static" else tiny_pair
    cfg = DecodeConfig(policy="s2t-local", trigger="always", max_new_tokens=12)
    positions = []
    head = tiny_pair.slm.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: positions.append(args[0].numel() // args[0].shape[-1]))
    try:
        got = generate(pair, PROMPTS[:2], cfg, batch_size=2)
    finally:
        hook.remove()
    ref = generate(tiny_pair, PROMPTS[:2], dataclasses.replace(cfg, fast=False), batch_size=1)
    assert ids(got) == ids(ref) and got.stats.triggers > 0
    assert max(positions) <= 2


def test_host_reads_per_token_stay_few(thresholds):
    """Each value read back from the device stalls a GPU's queue: a committed step reads its tokens once,
    a verified block once. Counted here as calls that read tensors (host-side tensors included)."""
    from select2think import load_pair

    pair = load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu", backend="hf-static")
    reads = []
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def read(self, *a, **k):
            reads.append(name)
            return originals[name](self, *a, **k)

        return read

    per_token = {}
    try:
        for n in names:
            setattr(torch.Tensor, n, counting(n))
        for name, kw in {
            "greedy": {},
            "s2t-kl": {"policy": "s2t", "trigger": "kl", "threshold": thresholds["kl"]},
        }.items():
            reads.clear()
            r = generate(pair, PROMPTS, DecodeConfig(max_new_tokens=32, **kw), batch_size=4)
            per_token[name] = len(reads) / r.stats.generated_tokens
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    assert per_token["greedy"] <= 1.5 and per_token["s2t-kl"] <= 4.5, per_token
