"""Fast path vs reference loop for S2T (kl trigger) on the real pair, side by side, one question at a time.

    .venv/bin/python benchmarks/fast_path.py --n 20 --quantile 0.99 --out runs/bench_fast_path

Writes one JSON line per question (resumable) and a summary.json. The kl threshold is calibrated on
gsm_symbolic:calib, never on the test set.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from select2think import DecodeConfig, generate, load_pair
from select2think.data.datasets import load_dataset, load_gsm_symbolic
from select2think.data.prompts import math_prompt
from select2think.decoding.calibrate import calibrate, load_threshold


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--llm", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--n-calib", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--draft-len", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default="runs/bench_fast_path")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pair = load_pair(args.slm, args.llm, dtype=args.dtype)
    thr_file = out / f"kl_q{args.quantile}.json"
    if not thr_file.is_file():
        calib = load_gsm_symbolic("calib", limit=args.n_calib)
        calibrate(
            pair,
            [math_prompt(i.question) for i in calib.items],
            "kl",
            args.quantile,
            dataset="gsm_symbolic:calib",
            max_new_tokens=args.max_new_tokens,
        ).save(thr_file)
    threshold = load_threshold(thr_file, "kl", args.slm, args.llm)
    items = load_dataset("gsm8k").take(args.n)
    lines = out / "items.jsonl"
    done = {json.loads(line)["id"] for line in lines.read_text().splitlines()} if lines.is_file() else set()
    for item in items:
        if item.id in done:
            continue
        row = {"id": item.id}
        for name, fast in (("reference", False), ("fast", True)):
            cfg = DecodeConfig(
                policy="s2t",
                trigger="kl",
                threshold=threshold,
                k=8,
                fast=fast,
                draft_len=args.draft_len,
                max_new_tokens=args.max_new_tokens,
            )
            r = generate(pair, [math_prompt(item.question)], cfg, batch_size=1)
            row[name] = {"tokens": r.generations[0].token_ids, "stats": r.stats.to_dict()}
        row["identical"] = row["reference"]["tokens"] == row["fast"]["tokens"]
        with open(lines, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        print(
            item.id,
            "identical" if row["identical"] else "DIFFERENT",
            f"ref {row['reference']['stats']['wall_time_s']:.1f}s fast {row['fast']['stats']['wall_time_s']:.1f}s",
            flush=True,
        )
    rows = [json.loads(line) for line in lines.read_text().splitlines()]

    def tot(name: str, key: str) -> float:
        return sum(r[name]["stats"][key] for r in rows)

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.dtype}",
        "n": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "threshold": threshold,
        "quantile": args.quantile,
        "draft_len": args.draft_len,
        "trigger_rate_reference": tot("reference", "triggers") / tot("reference", "generated_tokens"),
        "llm_forwards_per_token_reference": tot("reference", "llm_forwards") / tot("reference", "generated_tokens"),
        "llm_forwards_per_token_fast": tot("fast", "llm_forwards") / tot("fast", "generated_tokens"),
        "wall_ratio_fast_over_reference": tot("fast", "wall_time_s") / tot("reference", "wall_time_s"),
        "hit_at_8_reference": tot("reference", "hits") / max(tot("reference", "hit_checked"), 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
