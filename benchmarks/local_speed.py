"""S2T-Local costs: decoding time vs greedy, and training layout (tree vs K prefix copies).

    .venv/bin/python benchmarks/local_speed.py --n 5 --out runs/bench_local      # decode.json, train.json
    .venv/bin/python benchmarks/local_speed.py --skip-decode                       # the training part only
    .venv/bin/python benchmarks/local_speed.py --skip-train --n 64 --batch 64 --no-decoupled   # 64 rows at once

Decoding: greedy, the shipped selector (coupled, its learned trigger; --selector for another), and
s2t-local coupled and decoupled with an entropy trigger at quantile 0.90 calibrated on
gsm_symbolic:calib (--no-decoupled skips the last) on the same GSM8K problems, one after the other per
problem; compared per generated token, since a selector changes answer lengths. With --batch B the
n problems decode B at a time instead (policies one after the other): there only the rows whose
trigger fires score their K candidates. The selector's
weights do not change its cost: coupled runs the base weights (a merged LoRA costs nothing), decoupled
a freshly initialised, unmerged LoRA r16 (the adapter's extra matmuls and its second cache are real).
Training: one step on a K = 16 group (the full loss with its KL-to-base forward, backward, AdamW step)
in both layouts in fp32, and in the tree layout in each of --train-dtypes. The naive layout holds K
copies of the prefix's activations: at a 511-token context that exceeds 24 GiB, so it is timed at
shorter contexts only (--naive-max-context) while the tree layout is timed at every context.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from select2think import DecodeConfig, generate, load_pair
from select2think.data.datasets import load_dataset, load_gsm_symbolic
from select2think.data.prompts import math_prompt
from select2think.decoding.calibrate import calibrate, load_threshold
from select2think.local.bundle import bundled_trigger, shipped_bundle
from select2think.local.objective import TrainConfig, batch_loss
from select2think.local.selector import apply_selector
from select2think.local.train import prepare_model
from select2think.local.trigger_head import load_learned_trigger


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument(
        "--selector", default=None, help="selector or bundle with a learned trigger (default: the shipped one)"
    )
    ap.add_argument("--no-decoupled", action="store_true", help="skip the decoupled run")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--contexts", default="127,255,511")
    ap.add_argument("--naive-max-context", type=int, default=127)
    ap.add_argument("--train-dtypes", default="fp32", help="comma list: fp32,bf16 (tree layout timed in each)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", default="runs/bench_local")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_decode:
        bench_decode(args, out)
    if not args.skip_train:
        bench_train(args, out)


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads"


def bench_decode(args, out: Path) -> None:
    result = {"machine": machine()}

    pair = load_pair(args.slm, None, dtype="bf16")
    thr_file = out / "entropy_q0.9.json"
    if not thr_file.is_file():
        calib = load_gsm_symbolic("calib", limit=8)
        calibrate(
            pair,
            [math_prompt(i.question) for i in calib.items],
            "entropy",
            0.90,
            dataset="gsm_symbolic:calib",
            max_new_tokens=args.max_new_tokens,
        ).save(thr_file)
    thr = load_threshold(thr_file, "entropy", args.slm, None)
    adapted = load_pair(args.slm, None, dtype="bf16")  # an untrained LoRA: decoupled's real extra matmuls
    adapted.slm, _ = prepare_model(adapted.slm, adapted.reserved_ids, TrainConfig(slm=args.slm, groups="", out=""))
    adapted.slm.eval()
    local = {
        "policy": "s2t-local",
        "trigger": "entropy",
        "threshold": thr,
        "k": 8,
        "max_new_tokens": args.max_new_tokens,
    }
    runs = [("greedy", pair, DecodeConfig(policy="greedy", max_new_tokens=args.max_new_tokens), None)]
    bundle = Path(args.selector) if args.selector else shipped_bundle(args.slm)
    if bundle is not None:
        trigger_file = bundled_trigger(bundle)
        if trigger_file is None:
            raise SystemExit(f"{bundle} has no learned trigger (make one with `s2t bundle`)")
        trained = load_pair(args.slm, None, dtype="bf16")
        apply_selector(trained, bundle)
        thr_learned = load_threshold(trigger_file, "learned", args.slm, None)
        runs.append(
            (
                "s2t-local-shipped",
                trained,
                DecodeConfig(**{**local, "trigger": "learned", "threshold": thr_learned}),
                load_learned_trigger(trigger_file),
            )
        )
    runs.append(("s2t-local", pair, DecodeConfig(**local), None))
    if not args.no_decoupled:
        runs.append(("s2t-local-decoupled", adapted, DecodeConfig(local_mode="decoupled", **local), None))
    result["selector"] = str(bundle) if bundle else None
    totals = {name: [0.0, 0, 0] for name, *_ in runs}  # seconds, tokens, triggers
    prompts = [math_prompt(item.question) for item in load_dataset("gsm8k").take(args.n)]
    blocks = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    for block in blocks:
        for name, p, cfg, trigger in runs:
            r = generate(p, block, cfg, batch_size=args.batch, trigger=trigger)
            assert r.stats.llm_forwards == 0
            totals[name][0] += r.stats.wall_time_s
            totals[name][1] += r.stats.generated_tokens
            totals[name][2] += r.stats.triggers
    per_tok = {k: v[0] / max(v[1], 1) for k, v in totals.items()}
    result["decode"] = {
        "n": args.n,
        "batch": args.batch,
        "tokens": {k: v[1] for k, v in totals.items()},
        "trigger_rate": {k: v[2] / max(v[1], 1) for k, v in totals.items()},
        "time_per_token_ratio_over_greedy": {k: per_tok[k] / per_tok["greedy"] for k in per_tok},
        "wall_ratio_over_greedy": {k: v[0] / totals["greedy"][0] for k, v in totals.items()},
    }
    (out / "decode.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)


def bench_train(args, out: Path) -> None:
    """One training step per group (forward, backward, AdamW step), tree vs naive layout, per dtype."""
    result = {"machine": machine(), "train": []}
    for dtype in args.train_dtypes.split(","):
        train_pair = load_pair(args.slm, None, dtype=dtype)
        cfg = TrainConfig(slm=args.slm, groups="", out="", dtype=dtype)
        model, rows = prepare_model(train_pair.slm, train_pair.reserved_ids, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [rows.weight], lr=1e-5)
        ids = train_pair.tokenizer(" ".join(i.question for i in load_gsm_symbolic("train", limit=12).items))[
            "input_ids"
        ]
        for context in (int(c) for c in args.contexts.split(",")):
            group = {"context": ids[:context], "candidates": list(range(1000, 1016)), "llm_probs": [1 / 16] * 16}
            row = {"K": 16, "context": context, "dtype": dtype}
            for layout in ("tree", "naive"):
                if layout == "naive" and (context > args.naive_max_context or dtype != "fp32"):
                    continue
                cfg.layout = layout
                spent = []
                warmup = (
                    1 if layout == "tree" else 0
                )  # a cheap first pass warms up allocators; naive is too slow to repeat
                for _ in range(args.reps + warmup):
                    t = time.perf_counter()
                    loss, _, _ = batch_loss(model, [group], train_pair.reserved_ids, train_pair.vocab_size, cfg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    spent.append(time.perf_counter() - t)
                row[f"{layout}_s_per_group"] = min(spent[warmup:])
            if "naive_s_per_group" in row:
                row["speedup_tree_over_naive"] = row["naive_s_per_group"] / row["tree_s_per_group"]
            result["train"].append(row)
            print(json.dumps(row), flush=True)
        del model, rows, opt, train_pair
    (out / "train.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
