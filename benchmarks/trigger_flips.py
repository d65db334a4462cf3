"""Can an SLM-only statistic tell, among the steps where the kl trigger fired, those where S2T changes the
token (the LLM's pick among the SLM's top-8 is not its top-1) from those where the LLM call was wasted?
ROC AUC of entropy, negative margin and a learned trigger's logit over a collection's groups
(docs/results.md, "The frontier").

    python benchmarks/trigger_flips.py --groups /work/data/collect_slm --trigger learned.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from select2think.decoding.triggers import EntropyTrigger, MarginTrigger, statistic_from_features
from select2think.local.objective import load_groups
from select2think.local.trigger_head import load_learned_trigger


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ranks; ties broken by order)."""
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(len(score))
    pos = int(label.sum())
    return float((ranks[label].sum() - pos * (pos - 1) / 2) / (pos * (len(label) - pos)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=Path, required=True, help="a directory from `s2t collect`")
    ap.add_argument("--trigger", type=Path, help="a learned trigger from `s2t train-trigger`")
    ap.add_argument("--k", type=int, default=8, help="S2T's candidates")
    args = ap.parse_args()
    head = load_learned_trigger(args.trigger) if args.trigger else None
    triggers = {"entropy": EntropyTrigger(), "1 - margin": MarginTrigger()} | ({"learned": head} if head else {})
    scores: dict[str, list[float]] = {name: [] for name in triggers}
    flips: list[bool] = []
    by_item: dict[str, list[dict]] = {}
    for g in load_groups(args.groups):
        by_item.setdefault(g["item"], []).append(g)
    for item, groups in by_item.items():
        z = np.load(args.groups / "features" / f"{item}.npz")
        steps = [g["step"] for g in groups]
        feats, hidden = torch.from_numpy(z["features"]), torch.from_numpy(z["hidden"].astype(np.float32))
        for name, trig in triggers.items():
            scores[name] += statistic_from_features(trig, feats, hidden)[steps].tolist()
        flips += [int(np.argmax(g["llm_probs"][: args.k])) != 0 for g in groups]
    y = np.array(flips)
    out = {"groups": len(y), "flip_rate": float(y.mean())}
    out |= {f"auc_{n}": auc(np.array(s), y) for n, s in scores.items() if s}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
