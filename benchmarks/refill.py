"""Offline continuous batching against fixed batches, side by side in one process (docs/results.md,
"Offline continuous batching"): the same prompts, policy and batch size, decoded with `generate(...,
continuous=False)` (each batch runs to its longest row) and with `continuous=True` (a finished row's slot
takes the next prompt at once). Reports the wall time of each, their ratio, and how many rows are identical.

    python benchmarks/refill.py --n 48 --batch-size 16 --out docs/measurements/refill.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from select2think import DecodeConfig, generate, load_pair
from select2think.data.datasets import load_dataset
from select2think.data.prompts import math_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--dataset", default="gsm_symbolic:dev")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pair = load_pair(args.slm, None, backend=args.backend)
    prompts = [math_prompt(i.question) for i in load_dataset(args.dataset).take(args.n)]
    cfg = DecodeConfig(policy="greedy", max_new_tokens=args.max_new_tokens)
    generate(pair, prompts[:2], cfg, batch_size=2)  # warm-up
    report: dict = {k: v for k, v in vars(args).items() if k != "out"}
    gens = {}
    for mode in ("fixed", "continuous"):
        t = time.perf_counter()
        res = generate(pair, prompts, cfg, batch_size=args.batch_size, continuous=mode == "continuous")
        wall = time.perf_counter() - t
        gens[mode] = [g.token_ids for g in res.generations]
        report[mode] = {"wall_s": round(wall, 1), "tokens": res.stats.generated_tokens}
        report[mode]["tokens_per_s"] = round(res.stats.generated_tokens / wall, 2)
        print(mode, report[mode], flush=True)
    report["speedup"] = round(report["fixed"]["wall_s"] / report["continuous"]["wall_s"], 3)
    same = sum(a == b for a, b in zip(gens["fixed"], gens["continuous"], strict=True))
    report["identical_rows"] = f"{same}/{len(prompts)}"
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
