"""Does a selector that compares the candidates beat one that scores each alone? Cross-validated on the cache.

    .venv/bin/python benchmarks/selector_listwise.py --groups /work/data/regroup_gsm8k --dtype fp32 \
        --out docs/measurements/selector/listwise_gsm8k.json

The shipped head scores each candidate's final hidden state alone (a linear map, the 16 reserved rows), so
what it can learn is "this kind of token is what the LLM picks". A listwise selector sees the K candidates
together: each hidden state is projected to a small width, tagged with its SLM rank and log-prob, and one
self-attention layer across the K lets a candidate's score depend on the others (is it the arithmetic
continuation among formatting ones; are two candidates the same word). The output layer starts at zero, so
epoch 0 is the SLM's top-1 (the prior breaks the tie), and the score is added to `prior_weight` x log-prob as
the head's is. `--no-attention` keeps the same network without the layer across candidates (a pointwise
MLP), which separates "nonlinear" from "compares". Same folds (whole split units), loss (`selection_loss`)
and metrics (`selection_metrics`) as benchmarks/head_sweep.py; needs the cache one `s2t train --head-only`
run leaves beside the groups. `--extra DIR` adds another groups directory's groups to every fold's training
set (never to validation). A benchmark of what could be shipped, not a shipped selector: decoding would need
this network beside the reserved rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from head_sweep import group_folds, training_features
from select2think.decoding.local_scorer import with_prior
from select2think.local.objective import TrainConfig, selection_loss, selection_metrics

K = 8  # S2T's K: the candidates a selector chooses among


class Listwise(nn.Module):
    """Scores [N, K] from candidates' hidden states [N, K, H] and SLM log-probs [N, K] (rank order)."""

    def __init__(self, hidden: int, width: int, attention: bool, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.rank = nn.Parameter(torch.zeros(K, width))
        self.logp = nn.Linear(1, width)
        self.mix = (
            nn.TransformerEncoderLayer(width, 4, 2 * width, dropout, batch_first=True, norm_first=True)
            if attention
            else nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        )
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        x = self.proj(hidden) + self.rank + self.logp(logp.clamp_min(-30).unsqueeze(-1))
        return self.out(self.mix(x)).squeeze(-1)


def fit_curve(hidden, logp, q, tr, va, args, cfg) -> list[dict]:
    """selection_metrics on `va` after each epoch (index 0: untrained, the SLM top-1)."""
    torch.manual_seed(cfg.seed)
    net = Listwise(hidden.shape[-1], args.width, not args.no_attention, args.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def scored() -> dict:
        net.eval()
        with torch.no_grad():
            head = net(hidden[va], logp[va])
        net.train()
        return selection_metrics(with_prior(head, logp[va], cfg.prior_weight), q[va], head)

    curve = [scored()]
    for _ in range(args.epochs):
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(cfg.head_batch):
            loss = selection_loss(with_prior(net(hidden[idx], logp[idx]), logp[idx], cfg.prior_weight), q[idx], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            opt.step()
        curve.append(scored())
    return curve


def features(cfg: TrainConfig, path: str):
    """(training groups, hidden [N, K, H], log-prior [N, K], LLM targets [N, K]) of one groups directory."""
    hidden, logp, q, train = training_features(cfg, path)
    return train, hidden[:, :K], logp[:, :K], q[:, :K] / q[:, :K].sum(-1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--extra", default=None, help="another groups directory, added to every fold's training set")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--prior", type=float, default=0.1)
    ap.add_argument("--no-attention", action="store_true", help="the same network, each candidate alone")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = TrainConfig(slm=args.slm, groups=args.groups, out="-", dtype=args.dtype, head_only=True)
    cfg = dataclasses.replace(cfg, prior_weight=args.prior)
    train, hidden, logp, q = features(cfg, args.groups)
    fold, _ = group_folds(train, args.folds, cfg.seed)
    extra = features(cfg, args.extra)[1:] if args.extra else None
    curves, weights = [], []
    for f in range(args.folds):
        h, lp, qq = hidden, logp, q
        tr, va = (fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()
        if extra is not None:  # the extra groups go after this directory's, training only
            h, lp, qq = (torch.cat([a, b]) for a, b in zip((hidden, logp, q), extra, strict=True))
            tr = torch.cat([tr, torch.arange(len(hidden), len(h))])
        curves.append(fit_curve(h, lp, qq, tr, va, args, cfg))
        weights.append(len(va))
        print(f"fold {f}: " + " ".join(f"{m['agree_at_1']:.3f}" for m in curves[-1]), flush=True)
    keys = ("agree_at_1", "slm_top1_agree", "flips", "flips_right", "flips_broke")
    mean = [
        {k: sum(w * c[e][k] for w, c in zip(weights, curves, strict=True)) / sum(weights) for k in keys}
        for e in range(args.epochs + 1)
    ]
    best = max(range(len(mean)), key=lambda e: mean[e]["agree_at_1"])
    print(f"untrained {mean[0]['agree_at_1']:.3f}  best {mean[best]['agree_at_1']:.3f} at epoch {best}: {mean[best]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    Path(args.out).write_text(
        json.dumps(
            {
                "settings": settings,
                "train_groups": len(train),
                "train_problems": len({g["item"] for g in train}),
                "extra_groups": len(extra[0]) if extra else 0,
                "best_epoch": best,
                "best": mean[best],
                "curve": mean,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
