"""GPU timing of select2think's decode paths on random-weight Qwen2.5-shaped pairs, eager (`hf`) beside the
static-cache, CUDA-graph engine (`hf-static`). One JSON out: ms per token per policy, per backend, per
batch, with the run's statistics and the machine.

Weights are random (no hub is reachable from the GPU machine), so accuracy means nothing; thresholds are
calibrated as quantiles of the trigger statistic on the same pair (decoding/calibrate.py), so trigger rates
and draft-block cuts are those of a run at that rate. Pairs: 0.5B/1.5B (batch 1 and 32) and 1.5B/32B
(batch 1; only with the GPU memory for it). Every run is guarded: a failure is recorded in the JSON and the
benchmark goes on; a time budget (`--budget-s`) skips what would not fit, and records that too.

On the device machine (one line, repo root; `.gpu` built here by `bash benchmarks/gpu_prepare.sh [REPO]`
in the checkout the device tool sends, and named in `carry`):

    python3 -m pip install -q --no-index --no-deps --target .site .gpu/*.whl && export PYTHONPATH=$PWD/.site && PYTHONUNBUFFERED=1 python3 .gpu/gpu_bench.py --out $OUT/gpu_bench.json

(timeout_s 570: runs stop starting after `--budget-s` 390 s; with the install, about 7.5 minutes in all.)
Here, on the CPU, `python benchmarks/gpu_bench.py --smoke --out /tmp/smoke.json` runs tiny shapes in
seconds; run it before spending device time.
"""  # noqa: E501 - the device command stays one line, to copy as it is

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHAPES = {  # Qwen2.5 configs: hidden, intermediate, layers, heads, kv heads, tied embeddings, output rows
    "0.5b": (896, 4864, 24, 14, 2, True, 151936),
    "1.5b": (1536, 8960, 28, 12, 2, True, 151936),
    "32b": (5120, 27648, 64, 40, 8, False, 152064),
    "smoke-s": (64, 128, 2, 4, 2, True, 0),  # 0: the tokenizer's size + 64 padding rows
    "smoke-l": (96, 192, 3, 4, 2, True, 0),
}
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did she sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "How much more money does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow.",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas.",
    "Ken created a care package to send to his brother, who was away at boarding school. How much did it weigh?",
    "Alexis is applying for a new job and bought a new set of business clothes to wear to the interview.",
]
BATCH32_POLICIES = ("greedy", "llm", "s2t-kl90", "s2t-ent90-lazy", "s2t-local-ent90")


def default_src() -> Path:
    """src/ beside this file in `.gpu`, else the repository's."""
    return HERE / "src" if (HERE / "src").is_dir() else HERE.parent / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON report")
    ap.add_argument("--src", default=str(default_src()), help="select2think's src/ folder")
    ap.add_argument("--tok", default=str(HERE / "tokenizer"), help="folder of the cached 0.5B's tokenizer files")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the tiny models' tokenizer)")
    ap.add_argument("--pairs", default="0.5b:1.5b,1.5b:32b")
    ap.add_argument("--backends", default="hf-static,hf", help="in order of priority")
    ap.add_argument("--tokens", type=int, default=192, help="new tokens per prompt (static engine)")
    ap.add_argument("--eager-tokens", type=int, default=96, help="new tokens per prompt (eager engine: slower)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts at batch 1")
    ap.add_argument("--big-batch", type=int, default=32, help="the second batch size (first pair only); 0: none")
    ap.add_argument("--budget-s", type=float, default=390.0, help="seconds of runs; later runs are skipped")
    return ap.parse_args(argv)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    commit = HERE / "COMMIT"
    info["src_commit"] = commit.read_text().strip() if commit.is_file() else None
    return info


def build(shape: str, vocab_rows: int, device: str, dtype: Any) -> Any:
    """A random-weight Qwen2 causal LM with `shape`'s dims, built on `device` in `dtype`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, inter, layers, heads, kv, tied, rows = SHAPES[shape]
    cfg = Qwen2Config(
        vocab_size=rows or vocab_rows,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        rope_theta=1e6,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.set_attn_implementation("sdpa")
    return model.eval()


def params_bytes(shape: str, vocab_rows: int) -> int:
    h, inter, layers, heads, kv, tied, rows = SHAPES[shape]
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter
    return 2 * (layers * per_layer + (1 if tied else 2) * (rows or vocab_rows) * h)  # bf16


class Bench:
    """The report, saved after every change, and the clock."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.report: dict[str, Any] = {"config": vars(args), "machine": {}, "thresholds": {}, "runs": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: dict[str, Any]) -> None:
        self.report["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("stats", "error")}), flush=True)
        if "error" in row:
            print(row["error"], file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1))
        tmp.replace(out)


def policies(thr: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {
        "greedy": {"policy": "greedy"},
        "llm": {"policy": "llm"},
        "s2t-kl99": {"policy": "s2t", "trigger": "kl", "threshold": thr["kl99"]},
        "s2t-kl90": {"policy": "s2t", "trigger": "kl", "threshold": thr["kl90"]},
        "s2t-ent90-lazy": {"policy": "s2t", "trigger": "entropy", "threshold": thr["ent90"]},
        "s2t-local-ent90": {"policy": "s2t-local", "trigger": "entropy", "threshold": thr["ent90"]},
        "s2t-kl90-reference": {"policy": "s2t", "trigger": "kl", "threshold": thr["kl90"], "fast": False},
    }


def make_pair(slm_model: Any, llm_model: Any, tok: Any, engine: str, names: tuple[str, str]) -> Any:
    from select2think.backends.hf import HFBackend
    from select2think.backends.pair import ModelPair
    from select2think.backends.static import StaticHFBackend
    from select2think.models.pair import pick_reserved_ids

    wrap = StaticHFBackend if engine == "hf-static" else HFBackend
    slm, llm = wrap(slm_model), wrap(llm_model)
    eos = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    return ModelPair(
        slm=slm,
        llm=llm,
        tokenizer=tok,
        slm_name=names[0],
        llm_name=names[1],
        reserved_ids=pick_reserved_ids(tok, slm.vocab_rows),
        eos_ids=frozenset(eos),
        engine=engine,
    )


def calibrate(pair: Any, n_tok: int) -> dict[str, float]:
    import numpy as np

    from select2think.decoding.calibrate import step_statistics

    kl = step_statistics(pair, PROMPTS[:2], "kl", max_new_tokens=n_tok, batch_size=2)
    ent = step_statistics(pair, PROMPTS[:2], "entropy", max_new_tokens=n_tok, batch_size=2)
    return {
        "kl99": float(np.quantile(kl, 0.99)),
        "kl90": float(np.quantile(kl, 0.90)),
        "ent90": float(np.quantile(ent, 0.90)),
    }


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_state(pair: Any) -> tuple[int, list[str]]:
    """(graphs captured so far, capture errors) over the pair's static backends."""
    backends = [b for b in (pair.slm, pair.llm) if hasattr(b, "captures")]
    return sum(b.captures for b in backends), [b.graph_error for b in backends if b.graph_error]


def time_policy(pair: Any, name: str, kw: dict, batch: int, prompts: list[str], n_tok: int) -> dict[str, Any]:
    """Warm up (graphs are captured for most shapes there), then time one generate call."""
    from select2think import DecodeConfig, generate

    generate(pair, prompts[:batch], DecodeConfig(max_new_tokens=min(n_tok, 24), **kw), batch_size=batch)
    sync()
    before, _ = graph_state(pair)
    t = time.perf_counter()
    r = generate(pair, prompts, DecodeConfig(max_new_tokens=n_tok, **kw), batch_size=batch)
    sync()
    wall = time.perf_counter() - t
    after, errors = graph_state(pair)
    st = r.stats.to_dict()
    tokens = max(1, st["generated_tokens"])
    return {
        "prompts": len(prompts),
        "tokens": st["generated_tokens"],
        "wall_s": round(wall, 4),
        "ms_per_token": round(1000 * wall * batch / tokens, 3),  # per row: the latency a user sees
        "tokens_per_s": round(tokens / wall, 1),
        "path": r.path,
        "trigger_rate": round(st["trigger_rate"], 4),
        "llm_forwards_per_token": round(st["llm_forwards_per_token"], 4),
        "graphs_captured_while_timed": after - before,
        "graph_errors": errors,
        "stats": st,
    }


def run_pair(bench: Bench, s_shape: str, l_shape: str, tok: Any, device: str, dtype: Any, deadline: float) -> None:
    import torch

    args = bench.args
    label = f"{s_shape}/{l_shape}"
    vocab_rows = len(tok) + 64
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        need = 1.25 * (params_bytes(s_shape, vocab_rows) + params_bytes(l_shape, vocab_rows))
        if need > free:
            bench.add({"pair": label, "skipped": f"needs about {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"})
            return
    t = time.perf_counter()
    slm, llm = build(s_shape, vocab_rows, device, dtype), build(l_shape, vocab_rows, device, dtype)
    sync()
    bench.add({"pair": label, "build_s": round(time.perf_counter() - t, 2)})
    pairs = {e: make_pair(slm, llm, tok, e, (s_shape, l_shape)) for e in args.backends.split(",")}
    first = pairs[args.backends.split(",")[0]]
    try:
        t = time.perf_counter()
        thr = calibrate(first, min(96, args.tokens))
        bench.report["thresholds"][label] = {**thr, "seconds": round(time.perf_counter() - t, 2)}
        bench.save()
    except Exception:
        bench.add({"pair": label, "stage": "calibrate", "error": traceback.format_exc()})
        return
    big = args.big_batch if s_shape == first_pair_slm(args) else 0
    for engine, pair in pairs.items():
        n_tok = args.tokens if engine == "hf-static" else args.eager_tokens
        plan = [(1, PROMPTS[: args.prompts])] + ([(big, (PROMPTS * 8)[:big])] if big else [])
        for batch, prompts in plan:
            for name, kw in policies(thr).items():
                if batch > 1 and name not in BATCH32_POLICIES:
                    continue
                use = prompts[:1] if name.endswith("reference") else prompts
                head = {"pair": label, "backend": engine, "batch": batch, "policy": name}
                if bench.elapsed() > deadline:
                    bench.add({**head, "skipped": "time budget"})
                    continue
                try:
                    bench.add({**head, **time_policy(pair, name, kw, batch, use, n_tok)})
                except Exception:
                    bench.add({**head, "error": traceback.format_exc()})
    del pairs, first, slm, llm
    if device == "cuda":
        torch.cuda.empty_cache()


def first_pair_slm(args: argparse.Namespace) -> str:
    return "smoke-s" if args.smoke else args.pairs.split(",")[0].split(":")[0]


def summary(report: dict[str, Any]) -> list[str]:
    """One line per pair and batch: each policy's ms per token, static beside eager."""
    cells: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    for r in report["runs"]:
        if "ms_per_token" in r:
            cells.setdefault((r["pair"], r["batch"]), {}).setdefault(r["policy"], {})[r["backend"]] = r["ms_per_token"]
    lines = []
    for (pair, batch), pols in cells.items():
        parts = [f"{p} " + "/".join(f"{e}={v:.2f}" for e, v in by.items()) for p, by in pols.items()]
        lines.append(f"{pair} b{batch}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.smoke:
        args.pairs, args.tokens, args.eager_tokens, args.prompts = "smoke-s:smoke-l", 16, 12, 2
        args.big_batch = min(args.big_batch, 4)
    sys.path.insert(0, args.src)
    bench = Bench(args)
    import torch

    bench.report["machine"] = machine()
    bench.save()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        from select2think.models.tokenizers import smollm2_tokenizer

        tok = smollm2_tokenizer() if not Path(args.tok).is_dir() else _tokenizer(args.tok)
    else:
        tok = _tokenizer(args.tok)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    for i, (s_shape, l_shape) in enumerate(pairs):
        share = 0.45 if (len(pairs) > 1 and i == 0) else 1.0  # the first pair leaves room for the second
        try:
            run_pair(bench, s_shape, l_shape, tok, device, dtype, deadline=args.budget_s * share)
        except Exception:
            bench.add({"pair": f"{s_shape}/{l_shape}", "error": traceback.format_exc()})
    bench.report["summary"] = summary(bench.report)
    bench.report["total_s"] = round(bench.elapsed(), 1)
    bench.save()
    print("\n".join(bench.report["summary"]))
    print(f"report: {Path(args.out).resolve()}", flush=True)
    return str(Path(args.out).resolve())


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


if __name__ == "__main__":
    main()
