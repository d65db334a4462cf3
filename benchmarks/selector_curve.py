"""S2T-Local's learning curve: Agree@1 on held-out training problems against the number of training groups.

    .venv/bin/python benchmarks/selector_curve.py --groups DIR --sweep runs/head_sweep.json \\
        --out docs/measurements/selector/curve.json --plot docs/measurements/selector/curve.png [--lora RUN ...]

Head-only points: the reserved rows trained with the settings, epoch count and gate that
benchmarks/head_sweep.py chose by cross-validation (its JSON), on the first 1/32, 1/16, ..., all of the
training problems (whole problems, one shuffled order), each scored on the validation problems that
`s2t train` holds out (never used to choose anything here), with and without the gate. LoRA points: the
validation history of `s2t train --val-every N` runs (groups seen -> Agree@1) on the same validation
problems. Needs the hidden-state cache one `s2t train --head-only` run leaves beside the groups.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from head_sweep import cached_features, rows_after, tuned_config
from select2think.local.head_only import head_metrics
from select2think.local.objective import TrainConfig, load_groups, split_groups


def head_only_points(groups, hidden, logp, q, cfg: TrainConfig, epochs: int, gate: float, fractions) -> list[dict]:
    train, val = split_groups(groups, cfg)
    where = {id(g): i for i, g in enumerate(groups)}
    va = torch.tensor([where[id(g)] for g in val])
    items = sorted({g["item"] for g in train})
    random.Random(cfg.seed).shuffle(items)
    points = []
    for f in fractions:
        keep = set(items[: max(1, round(len(items) * f))])
        tr = torch.tensor([where[id(g)] for g in train if g["item"] in keep])
        rows = rows_after(hidden, logp, q, tr, cfg, epochs)
        plain = head_metrics(rows, hidden[va], logp[va], q[va], cfg.prior_weight)
        gated = head_metrics(rows, hidden[va], logp[va], q[va], cfg.prior_weight, gate)
        points.append({"fraction": f, "problems": len(keep), "groups": len(tr), "plain": plain, "gated": gated})
        print(
            f"{len(tr):6d} groups ({len(keep)} problems): Agree@1 {plain['agree_at_1']:.3f}, gated "
            f"{gated['agree_at_1']:.3f} (SLM top-1 {plain['slm_top1_agree']:.3f}, {plain['n']} held-out groups)",
            flush=True,
        )
    return points


def lora_points(run: Path) -> list[dict]:
    meta = json.loads((run / "selector.json").read_text())
    return [{"groups": h.get("groups_seen", 0), **h} for h in meta["history"]]


def plot(points, lora: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [p["groups"] for p in points]
    ax.plot(x, [100 * p["plain"]["agree_at_1"] for p in points], "o-", label="head only")
    ax.plot(x, [100 * p["gated"]["agree_at_1"] for p in points], "s--", label="head only, gated")
    for name, hist in lora.items():
        ax.plot([max(h["groups"], 1) for h in hist], [100 * h["agree_at_1"] for h in hist], "^-", label=f"LoRA {name}")
    ax.axhline(100 * points[-1]["plain"]["slm_top1_agree"], color="gray", ls=":", label="SLM top-1")
    ax.axhspan(67, 71, color="green", alpha=0.12, label="paper (67-71%)")
    ax.set_xscale("log")
    ax.set_xlabel("training groups")
    ax.set_ylabel("Agree@1 on held-out problems (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--sweep", required=True, help="benchmarks/head_sweep.py's JSON (settings, epochs, gate)")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--fractions", default="0.03125,0.0625,0.125,0.25,0.5,1")
    ap.add_argument("--lora", nargs="*", default=[], help="`s2t train --val-every` output directories")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    sweep = json.loads(Path(args.sweep).read_text())
    gate = sweep.get("best_gate") or 0.0
    cfg, best = tuned_config(args.sweep, args.slm, args.groups, args.dtype)
    groups = load_groups(cfg.groups)
    hidden, logp, q = cached_features(cfg, groups)
    fractions = [float(f) for f in args.fractions.split(",")]
    points = head_only_points(groups, hidden, logp, q, cfg, best["best_epoch"], gate, fractions)
    lora = {Path(r).name: lora_points(Path(r)) for r in args.lora}
    out = {
        "groups": args.groups,
        "sweep": args.sweep,
        "settings": best,
        "gate": gate,
        "head_only": points,
        "lora": lora,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(points, lora, Path(args.plot))


if __name__ == "__main__":
    main()
