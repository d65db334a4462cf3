"""Does a head-only selector learn to select, or learn gsm_symbolic's templates? Cross-validation with folds
by problem (as head_sweep.py) against folds by template, same settings, same training problems.

    .venv/bin/python benchmarks/template_cv.py --groups REGROUPED --sweep docs/measurements/selector/head_sweep.json \\
        --out docs/measurements/selector/template_cv.json

gsm_symbolic draws its problems from about 100 templates (new names and numbers each time,
`datasets.gsm_symbolic_template`), so with a thousand problems split by problem every held-out problem's
template has trained too, and a held-out problem measures the selector within templates it has seen.
GSM8K's test problems share no template with them: folds by template estimate what to expect there (and
`s2t train`'s split now holds out whole templates: local.split). The validation problems `s2t train` holds
out are left out, as in head_sweep.py; the settings (head lr, prior, epochs) are the sweep's best. Also
reports how many held-out problems have a template that trains.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from head_sweep import cached_features, fit_curve, tuned_config
from select2think.local.objective import load_groups, split_groups
from select2think.local.split import split_unit


def fold_cv(hidden, logp, q, idx, fold, folds: int, cfg) -> dict:
    """Agree@1 after the last epoch and at the best, weighted over folds, and the SLM top-1's."""
    curves, weights = [], []
    for f in range(folds):
        curves.append(fit_curve(hidden, logp, q, idx[fold != f], idx[fold == f], cfg))
        weights.append(int((fold == f).sum()))
    mean = [sum(w * c[e] for w, c in zip(weights, curves, strict=True)) / sum(weights) for e in range(cfg.epochs + 1)]
    top1 = float((q[idx].argmax(-1) == 0).float().mean())
    return {"agree_at_1": mean[-1], "untrained": mean[0], "best": max(mean), "slm_top1_agree": top1, "curve": mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--sweep", required=True, help="head_sweep.py's JSON: its best settings are used")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg, best = tuned_config(args.sweep, args.slm, args.groups, args.dtype)
    groups = load_groups(args.groups)
    hidden, logp, q = cached_features(cfg, groups)
    train, val = split_groups(groups, cfg)
    template = {it: split_unit(it) for it in {g["item"] for g in groups}}
    if any(unit == it for it, unit in template.items()):
        raise SystemExit(f"{args.groups} holds problems that are not gsm_symbolic's")
    where = {id(g): i for i, g in enumerate(groups)}
    idx = torch.tensor([where[id(g)] for g in train])
    result = {"groups": args.groups, "settings": best, "folds": args.folds}
    for by, key in (("problem", lambda it: it), ("template", lambda it: template[it])):
        units = sorted({key(g["item"]) for g in train})
        random.Random(cfg.seed).shuffle(units)
        fold_of = {u: i % args.folds for i, u in enumerate(units)}
        fold = torch.tensor([fold_of[key(g["item"])] for g in train])
        result[f"by_{by}"] = {"units": len(units), **fold_cv(hidden, logp, q, idx, fold, args.folds, cfg)}
        r = result[f"by_{by}"]
        print(f"folds by {by} ({len(units)}): CV Agree@1 {r['agree_at_1']:.3f} (SLM top-1 {r['slm_top1_agree']:.3f})")
    trained = {template[g["item"]] for g in train}
    held = {g["item"] for g in val}
    result["held_out_problems"] = len(held)
    result["held_out_with_a_training_template"] = sum(template[it] in trained for it in held)
    print(f"{result['held_out_with_a_training_template']} of {len(held)} held-out problems have a template that trains")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
