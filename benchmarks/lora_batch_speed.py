"""LoRA training throughput: a problem's groups one per step vs all in one step (one tree forward over the
problem's trajectory, `s2t train --group-batch`), on real groups, side by side in one run.

    .venv/bin/python benchmarks/lora_batch_speed.py --groups DIR --problems 2 --dtypes fp32,bf16 \
        --out docs/measurements/selector/lora_batch_speed.json

For each of the first --problems problems of DIR with at least --group-batch groups: a training step (the
full loss with its KL-to-base forward, backward, AdamW step; LoRA r16, dropout 0) on each of its first
--group-batch groups alone, then one step on all of them together. Reports seconds per group and groups
per hour for both, per dtype. The first step of each dtype warms up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from select2think import load_pair
from select2think.local.objective import TrainConfig, batch_loss, load_groups, shared_trajectories
from select2think.local.train import prepare_model


def step_seconds(model, opt, batch, pair, cfg) -> float:
    t = time.perf_counter()
    loss, _, _ = batch_loss(model, batch, pair.reserved_ids, pair.vocab_size, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--group-batch", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    groups = load_groups(args.groups)
    batches = [b for b in shared_trajectories(groups, args.group_batch) if len(b) == args.group_batch]
    batches = [[groups[i] for i in b] for b in batches[: args.problems]]
    if not batches:
        raise SystemExit(f"no problem in {args.groups} has {args.group_batch} groups on one trajectory")
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", "runs": []}
    for dtype in args.dtypes.split(","):
        pair = load_pair(args.slm, None, dtype=dtype)
        cfg = TrainConfig(slm=args.slm, groups="", out="", dtype=dtype, lora_dropout=0.0)
        model, rows = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [rows.weight], lr=1e-6)
        step_seconds(model, opt, batches[0][:1], pair, cfg)  # warm-up
        alone = together = 0.0
        for batch in batches:
            alone += sum(step_seconds(model, opt, [g], pair, cfg) for g in batch)
            together += step_seconds(model, opt, batch, pair, cfg)
        n = sum(len(b) for b in batches)
        row = {
            "dtype": dtype,
            "groups": n,
            "mean_context": sum(len(g["context"]) for b in batches for g in b) / n,
            "alone_s_per_group": alone / n,
            "batched_s_per_group": together / n,
            "alone_groups_per_hour": 3600 * n / alone,
            "batched_groups_per_hour": 3600 * n / together,
            "speedup": alone / together,
        }
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        del model, rows, opt, pair
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
