"""Choose `s2t train --head-only` settings by cross-validation on the training problems alone.

    .venv/bin/python benchmarks/head_sweep.py --groups runs/selector/groups --out runs/head_sweep.json

Needs the hidden-state cache that one `s2t train --head-only` run leaves beside the groups (no model
is loaded here). The validation problems that `s2t train` holds out (same seed, same fraction) are
left out entirely, so the settings chosen here can then be trained with `--keep last` and scored once
on them without selection bias. Each setting (head learning rate, prior weight) is trained on all but
one fold of training problems and scored on that fold after every epoch (folds hold whole gsm_symbolic
templates, as `s2t train`'s split: local.split); the mean curve over folds
picks the setting and its epoch count.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
from pathlib import Path

import torch

from select2think.local.head_only import feature_dir, head_metrics, llm_targets, recorded_prior, train_rows
from select2think.local.objective import TrainConfig, load_groups, split_groups
from select2think.local.split import split_unit


def cached_features(cfg: TrainConfig, groups: list[dict]):
    """(candidates' hidden states, the recorded prior, the LLM's targets) of `groups`, from the cache."""
    chunks = sorted(feature_dir(cfg).glob("*.pt"))
    parts = [torch.load(p, weights_only=True) for p in chunks]
    keys = [k for c in parts for k in c["keys"]]
    if keys != [[g["item"], g["step"]] for g in groups]:
        raise SystemExit(
            f"the cache in {feature_dir(cfg)} does not cover these groups: run s2t train --head-only first"
        )
    return torch.cat([c["hidden"] for c in parts]), recorded_prior(groups), llm_targets(groups)


def training_features(cfg: TrainConfig, directory: str):
    """(hidden, prior, targets, training groups) of a directory, without `s2t train`'s validation problems."""
    cfg = dataclasses.replace(cfg, groups=directory)
    groups = load_groups(directory)
    hidden, logp, q = cached_features(cfg, groups)
    train, _ = split_groups(groups, cfg)
    where = {id(g): i for i, g in enumerate(groups)}
    idx = torch.tensor([where[id(g)] for g in train])
    return hidden[idx], logp[idx], q[idx], train


def tuned_config(sweep: str | Path, slm: str, groups: str, dtype: str) -> tuple[TrainConfig, dict]:
    """(the head-only TrainConfig of a sweep JSON's best setting, epochs included; that setting's record)."""
    best = json.loads(Path(sweep).read_text())["results"][0]
    cfg = TrainConfig(slm=slm, groups=groups, out="-", dtype=dtype, head_only=True, epochs=max(best["best_epoch"], 1))
    return dataclasses.replace(cfg, head_lr=best["head_lr"], prior_weight=best["prior_weight"]), best


def group_folds(groups: list[dict], folds: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """(each group's fold, each split unit's fold): folds hold whole split units (gsm_symbolic templates, as
    `s2t train`'s split), shuffled with `seed`."""
    units = sorted({split_unit(g["item"]) for g in groups})
    random.Random(seed).shuffle(units)
    fold_of = {u: i % folds for i, u in enumerate(units)}
    return torch.tensor([fold_of[split_unit(g["item"])] for g in groups]), fold_of


def fit_curve(hidden, logp, q, tr, va, cfg) -> list[float]:
    """Agree@1 on `va` after each epoch of `s2t train --head-only`'s own loop (index 0: untrained)."""

    def agree(rows: torch.Tensor) -> float:
        return head_metrics(rows, hidden[va], logp[va], q[va], cfg.prior_weight)["agree_at_1"]

    init = torch.zeros(16, hidden.shape[-1])
    return [agree(init)] + [agree(rows) for _, rows, _ in train_rows(init, hidden, logp, q, tr, cfg)]


def rows_after(hidden, logp, q, tr, cfg, epochs: int) -> torch.Tensor:
    """The reserved rows after `epochs` epochs of `s2t train --head-only`'s loop (0: untrained)."""
    rows = torch.zeros(16, hidden.shape[-1])
    for epoch, trained, _ in train_rows(rows, hidden, logp, q, tr, dataclasses.replace(cfg, epochs=max(epochs, 1))):
        if epoch == epochs:
            rows = trained.detach().clone()
    return rows


def gate_cv(hidden, logp, q, idx, fold, folds: int, cfg, epochs: int, gates: list[float]) -> list[dict]:
    """Per gate, the fold-weighted mean of head_metrics on each held-out fold (flips right and broken too),
    the rows trained on the other folds for `epochs` epochs."""
    sums = {g: {} for g in gates}
    total = 0
    for f in range(folds):
        tr, va = idx[fold != f], idx[fold == f]
        rows = rows_after(hidden, logp, q, tr, cfg, epochs)
        total += len(va)
        for g in gates:
            m = head_metrics(rows, hidden[va], logp[va], q[va], cfg.prior_weight, g)
            for k in ("agree_at_1", "slm_top1_agree", "flips", "flips_right", "flips_broke"):
                sums[g][k] = sums[g].get(k, 0.0) + m[k] * len(va)
    return [{"gate": g, **{k: v / total for k, v in sums[g].items()}} for g in gates]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--head-batch", type=int, default=32)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--priors", default="0.1,0.2,0.4")
    ap.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="fit on this share of each fold's training problems (a learning curve: would more groups help?)",
    )
    ap.add_argument(
        "--min-llm-q",
        type=float,
        default=0.0,
        help="train only on groups where the LLM's pick holds at least this share of its top-8 probability "
        "(near-ties are noisy labels); validation keeps every group",
    )
    ap.add_argument(
        "--gates",
        default="",
        help="comma list: for the best setting, choose the confidence gate by the same cross-validation",
    )
    ap.add_argument("--out", default="runs/head_sweep.json")
    args = ap.parse_args()

    cfg = TrainConfig(
        slm=args.slm,
        groups=args.groups,
        out="-",
        dtype=args.dtype,
        head_only=True,
        epochs=args.epochs,
        head_batch=args.head_batch,
    )
    groups = load_groups(cfg.groups)
    hidden, logp, q = cached_features(cfg, groups)
    train, _ = split_groups(groups, cfg)
    where = {id(g): i for i, g in enumerate(groups)}
    fold, fold_of = group_folds(train, args.folds, cfg.seed)
    items = sorted({g["item"] for g in train})
    random.Random(cfg.seed).shuffle(items)
    idx = torch.tensor([where[id(g)] for g in train])

    results = []
    for lr, prior in itertools.product(
        [float(x) for x in args.lrs.split(",")], [float(x) for x in args.priors.split(",")]
    ):
        curves, weights = [], []
        for f in range(args.folds):
            tr, va = idx[fold != f], idx[fold == f]
            if args.train_fraction < 1:  # whole problems, the same ones for every setting
                keep = [it for it in items if fold_of[split_unit(it)] != f]
                keep = set(keep[: max(1, round(len(keep) * args.train_fraction))])
                tr = idx[(fold != f) & torch.tensor([g["item"] in keep for g in train])]
            if args.min_llm_q > 0:
                tr = tr[(q[tr, :8].max(-1).values / q[tr, :8].sum(-1)) >= args.min_llm_q]
            curves.append(fit_curve(hidden, logp, q, tr, va, dataclasses.replace(cfg, head_lr=lr, prior_weight=prior)))
            weights.append(len(va))
        mean = [
            sum(w * c[e] for w, c in zip(weights, curves, strict=True)) / sum(weights) for e in range(args.epochs + 1)
        ]
        best = max(range(len(mean)), key=mean.__getitem__)
        results.append(
            {
                "head_lr": lr,
                "prior_weight": prior,
                "best_epoch": best,
                "cv_agree_at_1": mean[best],
                "cv_agree_untrained": mean[0],
                "curve": mean,
            }
        )
        print(f"lr {lr:g} prior {prior:g}: untrained {mean[0]:.3f}  best {mean[best]:.3f} at epoch {best}", flush=True)
    results.sort(key=lambda r: -r["cv_agree_at_1"])
    gates = []
    if args.gates:
        best = results[0]
        tuned = dataclasses.replace(cfg, head_lr=best["head_lr"], prior_weight=best["prior_weight"])
        grid = [float(x) for x in args.gates.split(",")]
        gates = gate_cv(hidden, logp, q, idx, fold, args.folds, tuned, best["best_epoch"], grid)
        for g in gates:
            print(
                f"gate {g['gate']:g}: CV Agree@1 {g['agree_at_1']:.3f} (SLM top-1 {g['slm_top1_agree']:.3f}), flips "
                f"{g['flips']:.3f}, to the LLM's choice {g['flips_right']:.3f}, breaking {g['flips_broke']:.3f}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "groups": args.groups,
                "train_groups": len(train),
                "folds": args.folds,
                "train_fraction": args.train_fraction,
                "min_llm_q": args.min_llm_q,
                "train_problems": len(items),
                "results": results,
                "gates": gates,
                "best_gate": max(gates, key=lambda g: g["agree_at_1"])["gate"] if gates else None,
            },
            indent=2,
        )
    )
    print("best:", {k: v for k, v in results[0].items() if k != "curve"})


if __name__ == "__main__":
    main()
