"""Does a head-only selector trained on one dataset's groups select well on another's problems, and does
adding them help? Cross-validation over TARGET's training problems (folds by `split.split_unit`), each
fold's head trained on (a) TARGET's other folds, (b) all of EXTRA, (c) both; Agree@1 on the held-out fold
after every epoch, beside the SLM top-1's.

    .venv/bin/python benchmarks/selector_mix.py --target /work/data/regroup_gsm8k --extra /work/data/regroup_learned3 \\
        --sweep docs/measurements/selector/head_sweep_regroup3.json --out docs/measurements/selector/mix.json \\
        --plot docs/measurements/selector/mix.png

Typical use: TARGET holds problems written one by one (GSM8K train), EXTRA problems drawn from a hundred
templates (gsm_symbolic). Both need the hidden-state cache one `s2t train --head-only` run leaves beside the
groups. The validation problems `s2t train` holds out of either directory are left out, as in head_sweep.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from head_sweep import fit_curve, group_folds, training_features, tuned_config


def plot(result: dict, path: Path) -> None:
    """Agree@1 per epoch for each training source, beside the SLM top-1's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {
        "target": f"other folds of the target ({result['target_groups']:,} groups in all)",
        "extra": f"the extra dataset ({result['extra_groups']:,} groups)",
        "both": "both",
    }
    for name, label in labels.items():
        ax.plot([100 * a for a in result["trained_on"][name]["curve"]], label=label)
    ax.axhline(100 * result["slm_top1_agree"], color="gray", linestyle=":", label="SLM top-1")
    ax.set_xlabel("epochs of head-only training")
    ax.set_ylabel("Agree@1 on held-out target problems (%, 5-fold CV)")
    ax.set_title(f"head-only selector on held-out problems of {Path(result['target']).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="groups directory whose problems are scored")
    ap.add_argument("--extra", required=True, help="groups directory of another dataset")
    ap.add_argument("--sweep", required=True, help="head_sweep.py's JSON: its best head lr and prior are used")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="PNG of the curves")
    args = ap.parse_args()
    cfg, best = tuned_config(args.sweep, args.slm, args.target, args.dtype)
    cfg = dataclasses.replace(cfg, epochs=args.epochs)
    ht, lt, qt, target = training_features(cfg, args.target)
    he, le, qe, extra = training_features(cfg, args.extra)
    if {g["item"] for g in target} & {g["item"] for g in extra}:
        raise SystemExit("the two directories share problems")
    hidden, logp, q = torch.cat([ht, he]), torch.cat([lt, le]), torch.cat([qt, qe])
    fold, fold_of = group_folds(target, args.folds, cfg.seed)
    own = torch.arange(len(target))
    every_extra = torch.arange(len(target), len(target) + len(extra))
    sources = {"target": lambda f: own[fold != f], "extra": lambda f: every_extra}
    sources["both"] = lambda f: torch.cat([own[fold != f], every_extra])
    result = {
        "target": args.target,
        "extra": args.extra,
        "target_groups": len(target),
        "target_units": len(fold_of),
        "extra_groups": len(extra),
        "settings": {"head_lr": best["head_lr"], "prior_weight": best["prior_weight"], "epochs": args.epochs},
        "folds": args.folds,
        "slm_top1_agree": float((qt.argmax(-1) == 0).float().mean()),
        "trained_on": {},
    }
    for name, train_on in sources.items():
        curves, weights = [], []
        for f in range(args.folds):
            curves.append(fit_curve(hidden, logp, q, train_on(f), own[fold == f], cfg))
            weights.append(int((fold == f).sum()))
        mean = [
            sum(w * c[e] for w, c in zip(weights, curves, strict=True)) / sum(weights) for e in range(args.epochs + 1)
        ]
        best_epoch = max(range(len(mean)), key=mean.__getitem__)
        result["trained_on"][name] = {
            "last": mean[-1],
            "best": mean[best_epoch],
            "best_epoch": best_epoch,
            "curve": mean,
        }
        print(
            f"trained on {name}: CV Agree@1 {mean[-1]:.3f} after {args.epochs} epochs, best {mean[best_epoch]:.3f} "
            f"at epoch {best_epoch} (untrained {mean[0]:.3f}, SLM top-1 {result['slm_top1_agree']:.3f})",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
