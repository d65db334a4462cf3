"""Score trained head-only selectors on one groups directory's held-out problems: which selector does better
on the steps S2T-Local will be asked about?

    .venv/bin/python benchmarks/selector_transfer.py --groups REGROUPED --selector HEAD_A --selector HEAD_B \\
        --out docs/measurements/selector/transfer.json

Typical use: REGROUPED is `s2t regroup`'s output for the trigger S2T-Local decodes with; HEAD_A was trained
on kl firings of other problems, HEAD_B on REGROUPED's own training problems. Both are scored on the
validation problems `s2t train` holds out of REGROUPED (the script refuses a selector that trained on any of
them, under its own split), with and without each selector's own gate. With `--all-problems`, every problem
of REGROUPED is scored (for selectors trained on another dataset: the script still refuses one that trained
on any of them). Needs the hidden-state cache one `s2t train --head-only` run leaves beside the groups.

`--gates 0,0.03,0.1` scores every selector at each of those gates as well (choosing a gate on problems no
selector trained on). A selector whose training groups are not on this machine (the shipped bundle, say) is
refused unless `--unchecked REASON` names why its problems cannot overlap (e.g. it trained on gsm_symbolic
and REGROUPED is GSM8K train); the reason is written into the JSON. A selector fit on hidden states at
another precision (bf16) is scored on these (`--dtype`), with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from head_sweep import cached_features
from select2think.io import read_json
from select2think.local.head_only import head_metrics
from select2think.local.objective import TrainConfig, load_groups, split_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--selector", action="append", required=True, help="`s2t train --head-only` output (repeat)")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--all-problems", action="store_true", help="score every problem, not only the held-out ones")
    ap.add_argument("--gates", default="", help="comma-separated gates to score every selector at, e.g. 0,0.1")
    ap.add_argument("--unchecked", default="", help="why a selector whose training groups are absent cannot overlap")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        gates = [float(x) for x in args.gates.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--gates takes comma-separated numbers, not {args.gates!r}")
    if any(not 0 <= g < float("inf") for g in gates):
        ap.error(f"--gates must be numbers >= 0, not {args.gates!r}")

    cfg = TrainConfig(slm=args.slm, groups=args.groups, out="-", dtype=args.dtype, head_only=True)
    groups = load_groups(args.groups)
    hidden, logp, q = cached_features(cfg, groups)
    val = groups if args.all_problems else split_groups(groups, cfg)[1]
    where = {id(g): i for i, g in enumerate(groups)}
    va = torch.tensor([where[id(g)] for g in val])
    held_out = {g["item"] for g in val}
    results = []
    for sel in map(Path, args.selector):
        meta = read_json(sel / "selector.json", "selector metadata")
        own = TrainConfig(**meta["config"])  # the split it was trained under
        if (own.slm, own.layout) != (cfg.slm, cfg.layout):
            raise SystemExit(f"{sel} was trained on {own.slm} {own.layout} hidden states, not these")
        if own.dtype != cfg.dtype:  # the same model's states at another precision (llama.cpp decodes in fp32)
            print(f"{sel} was fit on {own.dtype} hidden states; scoring it on {cfg.dtype} ones", flush=True)
        trained_on = Path(own.groups)
        if trained_on.is_dir():
            trained, _ = split_groups(load_groups(own.groups), own)
            seen = {g["item"] for g in trained} & held_out
            if seen:
                raise SystemExit(f"{sel} was trained on {len(seen)} of the held-out problems (from {own.groups})")
            overlap = "checked"
        elif args.unchecked:
            overlap = f"unchecked: {args.unchecked}"
        else:
            raise SystemExit(
                f"{sel} trained on {own.groups}, which is not here: say why it cannot overlap (--unchecked)"
            )
        rows = load_file(sel / "reserved_rows.safetensors")["weight"].float()
        prior, gate = float(meta.get("prior_weight", 0.0)), float(meta.get("gate", 0.0))
        plain = head_metrics(rows, hidden[va], logp[va], q[va], prior)
        gated = head_metrics(rows, hidden[va], logp[va], q[va], prior, gate)
        at = {str(g): head_metrics(rows, hidden[va], logp[va], q[va], prior, g) for g in gates}
        results.append(
            {
                "selector": str(sel),
                "trained_on": str(trained_on),
                "overlap": overlap,
                "fit_on": own.dtype,
                "scored_on": cfg.dtype,
                "gate": gate,
                "plain": plain,
                "gated": gated,
                "at_gates": at,
            }
        )
        print(
            f"{sel}: Agree@1 {plain['agree_at_1']:.3f}, gated ({gate}) {gated['agree_at_1']:.3f} "
            f"(flips {gated['flips']:.3f}, to the LLM's choice {gated['flips_right']:.3f}, breaking a right top-1 "
            f"{gated['flips_broke']:.3f}); SLM top-1 {plain['slm_top1_agree']:.3f}; {plain['n']} groups",
            flush=True,
        )
        for g, m in at.items():
            net = m["agree_at_1"] - m["slm_top1_agree"]
            print(
                f"  gate {g}: Agree@1 {m['agree_at_1']:.3f} ({net:+.3f} over the top-1), flips {m['flips']:.3f}: "
                f"right {m['flips_right']:.3f}, broke {m['flips_broke']:.3f}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"groups": args.groups, "val_problems": len(held_out), "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
