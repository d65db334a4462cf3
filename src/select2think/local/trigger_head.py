"""A learned trigger so that S2T-Local needs no LLM: a logistic head on SLM features predicts, at each
step of the collected trajectories, one of two labels:

- `kl`: the kl trigger fired there during collection (the LLM's distribution differs from the SLM's);
- `flip`: the LLM's choice among the SLM's top-k is not the SLM's top-1, i.e. S2T would change the token
  there. Only these steps change a decode, so a trigger that finds them wastes fewer LLM calls.

Entropy and margin triggers at the same firing rate are the baselines, on the same label. The result is a
JSON file usable wherever a threshold file is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..decoding.triggers import LearnedTrigger
from ..errors import S2TError
from ..io import atomic_path, check_safetensors, read_json, write_json
from .split import validation_problems

LABELS = ("kl", "flip")


def step_labels(z, label: str, k: int = 8, warmup: int = 3) -> np.ndarray | None:
    """One problem's per-step labels (see the module's docstring), false in the first `warmup` steps, where
    no trigger fires; None where its file predates `llm_top`."""
    if label == "kl":
        return z["label"]
    if label != "flip":
        raise S2TError(f"unknown label {label!r}: use one of {', '.join(LABELS)}")
    if "llm_top" not in z:
        return None
    if z["llm_top"].shape[1] < k:
        raise S2TError(f"--k {k} is more candidates than were collected ({z['llm_top'].shape[1]})")
    flip = z["llm_top"][:, :k].argmax(1) != 0  # ties keep the top-1, as S2T's selection does
    flip[:warmup] = False
    return flip


def load_features(groups_dir: str | Path, label: str = "kl", k: int = 8):
    """(features [N, F], labels [N], problem ids [N], problems skipped for lack of the label)."""
    files = sorted((Path(groups_dir) / "features").glob("*.npz"))
    if not files:
        raise S2TError(f"no features in {groups_dir}/features: run `s2t collect` first")
    meta = Path(groups_dir) / "collect.json"
    warmup = read_json(meta, "collect settings")["identity"].get("warmup", 3) if meta.is_file() else 3
    xs, ys, owners, skipped = [], [], [], 0
    for f in files:
        z = np.load(f)
        if "hidden" not in z:
            raise S2TError(f"{f} has no hidden states: collect with a backend that gives them (hf)")
        y = step_labels(z, label, k, warmup)
        if y is None:
            skipped += 1
            continue
        xs.append(np.concatenate([z["features"], z["hidden"].astype(np.float32)], axis=1))
        ys.append(y.astype(np.float32))
        owners.append(np.full(len(y), f.stem))  # the problem's id
    if not xs:
        raise S2TError(f"no problem in {groups_dir} has --label {label}: it was collected before flips were recorded")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(owners), skipped


def precision_recall(pred: np.ndarray, label: np.ndarray) -> dict:
    tp = float((pred & label).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max(label.sum(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12), "fired": float(pred.mean())}


def train_trigger_head(
    groups_dir: str | Path,
    out: str | Path,
    slm: str,
    epochs: int = 300,
    lr: float = 0.05,
    l2: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    label: str = "kl",
    k: int = 8,
) -> dict:
    X, y, owner, skipped = load_features(groups_dir, label, k)
    if y.sum() == 0:
        raise S2TError(f"the collected steps hold no positive {label!r} label to learn from")
    val_ids = validation_problems(owner.tolist(), val_fraction, seed)
    val = np.isin(owner, list(val_ids))
    train = ~val if val.any() else np.ones_like(val)
    Xt = torch.tensor(X[train])
    yt = torch.tensor(y[train])
    mean, std = Xt.mean(0), Xt.std(0).clamp_min(1e-6)
    Z = (Xt - mean) / std
    w = torch.zeros(Z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = (len(yt) - yt.sum()) / yt.sum().clamp_min(1)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, yt, pos_weight=pos_weight)
            + l2 * w.square().sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    rate = float(yt.mean())
    head = LearnedTrigger(w.detach(), b.detach(), mean, std)
    threshold = float(np.quantile(head.logit(Xt).numpy(), 1 - rate))
    metrics: dict[str, Any] = {
        "label": label,
        "problems": len(set(owner.tolist())),
        "skipped_problems": skipped,
        "train_rate": rate,
        "val_steps": int(val.sum()),
    }
    if val.any():
        Xv = torch.tensor(X[val])
        lv = y[val].astype(bool)
        learned = head.logit(Xv).numpy() > threshold
        metrics["learned"] = precision_recall(learned, lv)
        for name, col, sign in (("entropy", 0, 1.0), ("margin", 1, -1.0)):
            thr = np.quantile(sign * X[train][:, col], 1 - rate)
            metrics[name] = precision_recall(sign * X[val][:, col] > thr, lv)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    weights = out.with_suffix(".safetensors")
    with atomic_path(weights) as tmp:
        save_file({"weight": w.detach(), "bias": b.detach(), "mean": mean, "std": std}, tmp)
    meta = {
        "trigger": "learned",
        "threshold": threshold,
        "slm": slm,
        "llm": "",
        "head": weights.name,
        "quantile": 1 - rate,
        "label": label if label == "kl" else f"flip@{k}",
        "metrics": metrics,
    }
    write_json(out, meta)
    return metrics


def load_learned_trigger(path: str | Path) -> LearnedTrigger:
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_json(path, "trigger file")
    if not isinstance(meta, dict) or meta.get("trigger") != "learned" or "head" not in meta:
        raise S2TError(f"{path} is not a learned trigger from `s2t train-trigger`")
    t = load_file(check_safetensors(path.parent / meta["head"]))
    return LearnedTrigger(t["weight"], t["bias"], t["mean"], t["std"])
