"""Wall time at batch 1 of every policy on the accuracy-cost frontier, side by side in one process
(docs/results.md, "The frontier"), plus transformers' assisted generation (the 0.5B drafting for the 1.5B)
against the 1.5B alone on transformers: what a user would pick instead of S2T.

Policies run on llama.cpp, one after another over the same GSM8K test problems, each problem alone (batch 1).
Accuracy comes from `s2t eval` on all 200 problems; this script gives the time column the eval cannot
(eval batches rows and its per-item times are shared across a batch).

    python benchmarks/frontier.py --thresholds /work/data/frontier --n 4 --max-new-tokens 256 \
        --out docs/measurements/frontier/wall_time.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from select2think import DecodeConfig, generate, load_pair
from select2think.data.datasets import load_dataset
from select2think.data.prompts import math_prompt
from select2think.decoding.calibrate import load_threshold
from select2think.local.trigger_head import load_learned_trigger
from select2think.models.chat import encode_prompts


def policies(thresholds: Path, slm: str, llm: str) -> dict[str, dict]:
    """label -> DecodeConfig arguments; a threshold file named TRIGGERqQ.json gives each SLM-only point."""
    out: dict[str, dict] = {"greedy": {"policy": "greedy"}, "llm": {"policy": "llm"}}
    for f in sorted(thresholds.glob("*.json")):
        trigger = json.loads(f.read_text())["trigger"]
        thr = load_threshold(f, trigger, slm, llm)
        out[f"s2t[{f.stem}]"] = {"policy": "s2t", "trigger": trigger, "threshold": thr}
        if trigger == "learned":  # its threshold file is also its weights
            out[f"s2t[{f.stem}]"]["head"] = load_learned_trigger(f)
        if f.stem == "entropy0.9":
            out[f"takeover[{f.stem}]"] = {"policy": "takeover", "trigger": trigger, "threshold": thr}
    return out


def row(res, wall: float) -> dict:
    s = res.stats
    return {
        "wall_s": round(wall, 3),
        "generated_tokens": s.generated_tokens,
        "llm_forwards_per_token": round(s.llm_forwards / max(s.generated_tokens, 1), 4),
        "llm_tokens_read": s.llm_tokens,
        "trigger_rate": round(s.trigger_rate, 4),
    }


def against_llm_alone(rows: dict[str, dict]) -> None:
    """Each row's wall time (whole, and per generated token: trajectories differ in length) and LLM tokens
    read as ratios to the LLM alone's, in place."""
    llm = rows["llm"]
    for r in rows.values():
        r["wall_vs_llm_alone"] = round(r["wall_s"] / llm["wall_s"], 3)
        r["ms_per_token"] = round(1000 * r["wall_s"] / max(r["generated_tokens"], 1), 2)
        r["per_token_vs_llm_alone"] = round(r["ms_per_token"] / (1000 * llm["wall_s"] / llm["generated_tokens"]), 3)
        r["llm_tokens_read_vs_llm_alone"] = round(r["llm_tokens_read"] / max(llm["llm_tokens_read"], 1), 3)


def llama_cpp_policies(prompts: list[str], thresholds: Path, max_new: int, slm: str, llm: str) -> dict:
    pair = load_pair(slm, llm, backend="llama.cpp")
    generate(pair, prompts[:1], DecodeConfig(policy="llm", max_new_tokens=8), batch_size=1)  # warm both models
    out: dict[str, dict] = {}
    for label, kw in policies(thresholds, slm, llm).items():
        head = kw.pop("head", None)
        t = time.perf_counter()
        res = generate(pair, prompts, DecodeConfig(max_new_tokens=max_new, **kw), batch_size=1, trigger=head)
        out[label] = row(res, time.perf_counter() - t)
        print(label, json.dumps(out[label]), flush=True)
    against_llm_alone(out)
    return out


def assisted_generation(prompts: list[str], max_new: int, slm: str, llm: str) -> dict:
    """transformers: the LLM alone vs the LLM with the SLM as its assistant, greedy, batch 1."""
    pair = load_pair(slm, llm, backend="hf")
    small, large = pair.slm.model, pair.require_llm().model
    ids = encode_prompts(pair.tokenizer, prompts, True)
    eos = pair.tokenizer.eos_token_id
    walls, same, tokens = {"llm": 0.0, "assisted": 0.0}, 0, 0
    for p in ids:
        x = torch.tensor([p])
        outs = {}
        for name, extra in (("llm", {}), ("assisted", {"assistant_model": small})):
            t = time.perf_counter()
            y = large.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, **extra)
            walls[name] += time.perf_counter() - t
            outs[name] = y[0, len(p) :].tolist()
        same += outs["llm"] == outs["assisted"]
        tokens += len(outs["llm"])
    return {
        "llm_alone_wall_s": round(walls["llm"], 2),
        "assisted_wall_s": round(walls["assisted"], 2),
        "assisted_wall_vs_llm_alone": round(walls["assisted"] / walls["llm"], 3),
        "identical_to_llm_alone": f"{same}/{len(ids)}",
        "llm_tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", required=True, help="folder of threshold files (s2t calibrate --backend llama.cpp)")
    ap.add_argument("--n", type=int, default=4, help="GSM8K test problems (the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--skip-assisted", action="store_true")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--llm", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    prompts = [math_prompt(i.question) for i in load_dataset("gsm8k").take(args.n)]
    report: dict = {"n": args.n, "max_new_tokens": args.max_new_tokens, "batch_size": 1}
    report["llama.cpp"] = llama_cpp_policies(prompts, Path(args.thresholds), args.max_new_tokens, args.slm, args.llm)
    if not args.skip_assisted:
        report["transformers_assisted"] = assisted_generation(prompts, args.max_new_tokens, args.slm, args.llm)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
