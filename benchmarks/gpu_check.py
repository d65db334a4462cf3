"""CUDA check on the tiny pair: fast paths equal the reference loop (fp32), batching too, bf16 runs.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json

Meant for a lent GPU machine; needs only the tiny pair (tokenizer cached under $S2T_CACHE).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from select2think import DecodeConfig, generate, load_pair
from select2think.decoding.calibrate import step_statistics

PROMPTS = [
    "What is 2+2?",
    "Tell me a long story about a cat and a dog.",
    "Hi",
    "Solve x^2 = 9 for x.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Count to five.",
    "Name a fruit.",
]


def ids(r):
    return [g.token_ids for g in r.generations]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "checks": {},
    }
    pair = load_pair("tiny-slm", "tiny-llm", dtype="fp32", device=args.device)
    stats = step_statistics(pair, ["Count to ten.", "Name a color."], "kl", max_new_tokens=40)
    thr = float(np.quantile(stats, 0.8))
    for name, kw in {
        "s2t-kl": {"policy": "s2t", "trigger": "kl", "threshold": thr, "k": 8},
        "takeover-kl": {"policy": "takeover", "trigger": "kl", "threshold": thr},
        "s2t-entropy": {
            "policy": "s2t",
            "trigger": "entropy",
            "threshold": float(
                np.quantile(step_statistics(pair, ["Count to ten."], "entropy", max_new_tokens=30), 0.7)
            ),
            "k": 4,
        },
        "sample": {"policy": "sample", "seed": 3},
    }.items():
        ref = generate(pair, PROMPTS, DecodeConfig(fast=False, max_new_tokens=48, **kw), batch_size=1)
        fast = generate(pair, PROMPTS, DecodeConfig(fast=True, max_new_tokens=48, **kw), batch_size=1)
        fast8 = generate(pair, PROMPTS, DecodeConfig(fast=True, max_new_tokens=48, **kw), batch_size=8)
        report["checks"][name] = {
            "identical_fast": ids(ref) == ids(fast),
            "identical_batched": ids(ref) == ids(fast8),
            "triggers": ref.stats.triggers,
            "flips": ref.stats.flips,
            "llm_forwards_ref": ref.stats.llm_forwards,
            "llm_forwards_fast": fast.stats.llm_forwards,
        }
    bf16 = load_pair("tiny-slm", "tiny-llm", dtype="bf16", device=args.device)
    t = time.perf_counter()
    r = generate(
        bf16, PROMPTS, DecodeConfig(policy="s2t", trigger="kl", threshold=thr, max_new_tokens=64), batch_size=8
    )
    report["bf16_s2t_batch8"] = {
        "tokens": r.stats.generated_tokens,
        "wall_s": time.perf_counter() - t,
        "device_of_logits": str(bf16.device),
    }
    report["all_identical"] = all(c["identical_fast"] and c["identical_batched"] for c in report["checks"].values())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
