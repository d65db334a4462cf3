"""Can the SLM's own confidence tell which candidate the LLM will pick, without features that name the
problem? A linear selector over per-candidate scalars (the SLM's log-prob, its gap to the top-1, the rank,
and the group's entropy and top-2 margin crossed with the rank), trained by softmax over each group's
top-8, cross-validated over TARGET's problems (folds by `split.split_unit`) and trained on EXTRA whole.

    .venv/bin/python benchmarks/selector_scalar.py --target /work/data/regroup_gsm8k \\
        --extra /work/data/regroup_learned3 --out docs/measurements/selector/scalar_gsm8k.json

Reads the groups alone (no hidden states, no model). The validation problems `s2t train` holds out of
either directory are left out, as in head_sweep.py.

`--lookahead` adds what the SLM would predict *after* each candidate: the entropy, top log-prob and top-2
margin of its next-token distribution, from the candidate's cached final hidden state through the SLM's
output embeddings (the cache one `s2t train --head-only` run leaves beside TARGET's groups; the model is
loaded for its output embeddings alone), as they are and centred over the group. CV over TARGET only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from head_sweep import group_folds
from select2think.local.head_only import llm_targets, recorded_prior
from select2think.local.objective import TrainConfig, load_groups, split_groups

K = 8  # the candidates S2T-Local chooses among


def features(logp: torch.Tensor) -> torch.Tensor:
    """[N, K, F] scalars per candidate, from the SLM's log-probs [N, K] in rank order."""
    n, k = logp.shape
    p = logp.softmax(-1)
    entropy = -(p * logp.log_softmax(-1)).sum(-1)
    margin = p[:, 0] - p[:, 1]
    rank = torch.eye(k).expand(n, k, k)
    gap = logp - logp[:, :1]
    return torch.cat(
        [logp[..., None], gap[..., None], rank, rank * entropy[:, None, None], rank * margin[:, None, None]], -1
    )


def lookahead(target: str, slm: str, dtype: str) -> torch.Tensor:
    """[N, K, 6]: entropy, top log-prob and top-2 margin of the SLM's next token after each candidate, as they
    are and minus the group's mean."""
    from head_sweep import training_features
    from select2think.models.loading import load_model
    from select2think.models.pair import tokenizer_size

    cfg = TrainConfig(slm=slm, groups=target, out="-", dtype=dtype, head_only=True)
    hidden = training_features(cfg, target)[0][:, :K]  # the same groups, in the same order, as `train`
    model, tokenizer, _ = load_model(slm, dtype, "cpu")
    emb = model.get_output_embeddings().weight.detach().float()[: tokenizer_size(tokenizer)]  # the text rows
    parts = []
    with torch.no_grad():
        for chunk in hidden.split(256):
            lg = (chunk.flatten(0, 1) @ emb.T).log_softmax(-1)
            top = lg.topk(2, -1).values
            parts.append(torch.stack([-(lg.exp() * lg).sum(-1), top[:, 0], top[:, 0] - top[:, 1]], -1))
    look = torch.cat(parts).reshape(len(hidden), K, 3)
    return torch.cat([look, look - look.mean(1, keepdim=True)], -1)


def standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-6)


def cross_validated(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, folds: int) -> tuple[float, float]:
    """(Agree@1, flips) of the linear selector on each held-out fold, trained on the others, over all groups."""
    hits = flipped = 0.0
    for f in range(folds):
        w, held = fit(x[fold != f], y[fold != f]), fold == f
        hits += agree(w, x[held], y[held]) * int(held.sum())
        flipped += flips(w, x[held]) * int(held.sum())
    return hits / len(y), flipped / len(y)


def fit(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> torch.Tensor:
    w = torch.zeros(x.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ w, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def training_set(directory: str) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """(training groups, their features, the LLM's pick among the top-8)."""
    cfg = TrainConfig(slm="-", groups=directory, out="-", head_only=True)
    train, _ = split_groups(load_groups(directory), cfg)
    return train, features(recorded_prior(train)[:, :K]), llm_targets(train)[:, :K].argmax(-1)


def agree(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w).argmax(-1) == y).float().mean())


def flips(w: torch.Tensor, x: torch.Tensor) -> float:
    """The share of groups where the selector overrules the SLM's top-1."""
    return float(((x @ w).argmax(-1) != 0).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="groups directory whose problems are scored")
    ap.add_argument("--extra", required=True, help="groups directory of another dataset, trained on whole")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--lookahead", action="store_true", help="add the SLM's next-token statistics after each candidate")
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="fp32", help="the dtype of TARGET's hidden-state cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    target, x, y = training_set(args.target)
    _, xe, ye = training_set(args.extra)
    fold, _ = group_folds(target, args.folds, TrainConfig.seed)
    cv_agree, cv_flips = cross_validated(x, y, fold, args.folds)
    w_extra = fit(xe, ye)
    result = {
        "target": args.target,
        "extra": args.extra,
        "target_groups": len(y),
        "extra_groups": len(ye),
        "slm_top1_agree": float((y == 0).float().mean()),
        "cv_agree_at_1": cv_agree,
        "cv_flips": cv_flips,
        "trained_on_extra_agree_at_1": agree(w_extra, x, y),
        "trained_on_extra_flips": flips(w_extra, x),
        "extra_fit_agree_at_1": agree(w_extra, xe, ye),
        "extra_slm_top1_agree": float((ye == 0).float().mean()),
    }
    if args.lookahead:
        both = standardised(torch.cat([x, lookahead(args.target, args.slm, args.dtype)], -1))
        result["lookahead_cv_agree_at_1"], result["lookahead_cv_flips"] = cross_validated(both, y, fold, args.folds)
        result["confidence_standardised_cv_agree_at_1"] = cross_validated(standardised(x), y, fold, args.folds)[0]
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
