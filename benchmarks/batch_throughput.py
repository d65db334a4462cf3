"""Decode throughput of one model against batch size: how many rows `s2t eval --batch-size` should decode together.

    .venv/bin/python benchmarks/batch_throughput.py --model qwen2.5-coder-0.5b-instruct --batch-sizes 16,32,64

Each batch prefills random 150-token prompts, then times 48 greedy steps against the cache. Prints tokens/s
and ms per step; compare batch sizes within one run only (timings here are noisy).
"""

from __future__ import annotations

import argparse
import time

import torch

from select2think.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    model = load_model(args.model, dtype=args.dtype)[0]
    torch.manual_seed(0)
    for b in (int(x) for x in args.batch_sizes.split(",")):
        ids = torch.randint(100, 20000, (b, args.prompt_len), device=model.device)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
        print(f"batch {b:4d}: {b * args.steps / dt:7.1f} tok/s  {dt / args.steps * 1000:6.0f} ms/step", flush=True)


if __name__ == "__main__":
    main()
