"""`s2t train --head-only`: the 16 reserved rows alone, fit on cached final hidden states.

With the backbone frozen, a candidate's final hidden state never changes during training, and the prior
(the SLM's log-prob of it) is the one the collection's decode recorded (`recorded_prior`). So the
backbone runs once per problem (one tree forward over its trajectory, `computed`), the results are cached
beside the groups (`GROUPS/head_features/...`, in chunks: a killed run keeps what it computed, later
runs reuse it), and each epoch after that is a few small matrix products: many epochs in seconds
instead of a backbone forward per group per epoch. Groups collected with `s2t collect
--candidate-hidden` (same SLM and dtype) bring their candidates' hidden states along, from the engine that
collected (so a llama.cpp collection trains the rows on llama.cpp's states, the ones it decodes with)
(`CollectedCandidates`). Validation runs every epoch and the best epoch's rows are kept (the
untrained rows, i.e. greedy, if no epoch beats them), or with `keep="last"` the last epoch's: choose the
settings by cross-validation on the training problems (benchmarks/head_sweep.py) and the validation
score stays an unbiased estimate. The selector has no adapter: its
`reserved_rows.safetensors` and `selector.json` are all of it (about 60 KB for a 0.5B SLM).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..decoding.local_scorer import reserved_scores, with_prior
from ..io import atomic_path, read_json, write_json
from .objective import (
    TrainConfig,
    candidate_hidden,
    prefix_logp,
    selection_loss,
    selection_metrics,
    shared_trajectories,
    trajectory_hidden,
)

FEATURES = "head_features"


def feature_dir(cfg: TrainConfig) -> Path:
    """Where a groups directory keeps the hidden states of one SLM, dtype and layout."""
    return Path(cfg.groups) / FEATURES / f"{cfg.slm.replace('/', '_')}_{cfg.dtype}_{cfg.layout}"


class CollectedCandidates:
    """The candidates' hidden states and log-probs `s2t collect --candidate-hidden` wrote beside the groups
    (features/ITEM.npz), where they stand for what this module would compute: the same SLM and dtype, the
    tree layout, and the same candidates (on transformers, equal to its own pass; on llama.cpp, that engine's
    states). `self(group)` -> (hidden [K, H] fp32, logp [K]) or None."""

    def __init__(self, cfg: TrainConfig):
        self.dir = Path(cfg.groups) / "features"
        meta = Path(cfg.groups) / "collect.json"
        ident = read_json(meta, "collect settings").get("identity", {}) if meta.is_file() else {}
        self.usable = (
            cfg.layout == "tree"
            and ident.get("candidate_hidden") is True
            and ident.get("slm") == cfg.slm
            and ident.get("dtype") == cfg.dtype
        )
        self.item: str | None = None
        self.by_step: dict[int, int] = {}

    def __call__(self, group: dict):
        if not self.usable:
            return None
        if group["item"] != self.item:
            self.item, self.by_step = group["item"], {}
            path = self.dir / f"{group['item']}.npz"
            z = np.load(path) if path.is_file() else None
            if z is not None and "cand_steps" in z:
                self.z = {k: z[k] for k in ("cand_ids", "cand_hidden", "cand_logp")}
                self.by_step = {int(t): i for i, t in enumerate(z["cand_steps"])}
        i = self.by_step.get(group["step"])
        if i is None or self.z["cand_ids"][i].tolist() != group["candidates"]:
            return None
        return torch.from_numpy(self.z["cand_hidden"][i].astype(np.float32)), torch.from_numpy(self.z["cand_logp"][i])


@torch.no_grad()
def computed(
    model, groups: list[dict], vocab_size: int, layout: str = "tree"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden [K, H] fp32, logp [K]) per group, by the backbone. In the tree layout the groups of one problem
    whose context is their whole prefix share one trajectory, so one tree forward per 32 of them
    (objective.shared_trajectories) replaces a forward over the prefix per group; the naive layout gives each
    group its own K prefix copies."""
    out: list = [None] * len(groups)
    if layout == "tree":
        for idx in shared_trajectories(groups, 32):
            part = [groups[i] for i in idx]
            ids = max((g["context"] for g in part), key=len)
            cands = [g["candidates"] for g in part]
            hidden, prefix = trajectory_hidden(model, ids, [len(g["context"]) for g in part], cands)
            logp = prefix_logp(model, prefix, torch.tensor(cands), vocab_size)
            for j, i in enumerate(idx):
                out[i] = hidden[j].float(), logp[j]
        return out
    for i, g in enumerate(groups):
        hid = candidate_hidden(model, g["context"], g["candidates"], layout, with_prefix=True)
        out[i] = hid[1:].float(), prefix_logp(model, hid[:1], torch.tensor([g["candidates"]]), vocab_size)[0]
    return out


@torch.no_grad()
def group_features(model, groups: list[dict], vocab_size: int, cfg: TrainConfig, progress: bool = True):
    """Candidates' final hidden states [N, K, H] fp32 and their SLM log-probs [N, K], cached per chunk of
    `cfg.checkpoint_every` groups (a chunk is reused only if it holds the same groups)."""
    from rich.progress import Progress

    out = feature_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    collected = CollectedCandidates(cfg)
    hidden, logp = [], []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("candidate hidden states", total=len(groups))
        for start in range(0, len(groups), cfg.checkpoint_every):
            part = groups[start : start + cfg.checkpoint_every]
            keys = [[g["item"], g["step"]] for g in part]
            path = out / f"{start:07d}.pt"
            chunk = torch.load(path, weights_only=True) if path.is_file() else None
            if chunk is None or chunk["keys"] != keys:
                got = [collected(g) for g in part]
                missing = [i for i, x in enumerate(got) if x is None]
                for i, x in zip(
                    missing, computed(model, [part[i] for i in missing], vocab_size, cfg.layout), strict=True
                ):
                    got[i] = x
                bar.advance(task, len(part))
                chunk = {
                    "keys": keys,
                    "hidden": torch.stack([x[0].to(device) for x in got]).cpu(),
                    "logp": torch.stack([x[1].to(device) for x in got]).cpu(),
                }
                with atomic_path(path) as tmp:
                    torch.save(chunk, tmp)
            else:
                bar.advance(task, len(part))
            hidden.append(chunk["hidden"])
            logp.append(chunk["logp"])
    return torch.cat(hidden), torch.cat(logp)


def recorded_prior(groups: list[dict]) -> torch.Tensor:
    """The SLM's log-probs [N, K] of each group's candidates as the collection's decode computed them. With
    the backbone frozen this is the prior decoding adds, from the engine and precision that will decode (a
    recomputation in another engine or dtype can order near-ties differently, making the untrained
    selector flip where greedy would not)."""
    return torch.tensor([g["slm_probs"] for g in groups], dtype=torch.float32).clamp_min(1e-30).log()


def llm_targets(groups: list[dict]) -> torch.Tensor:
    """The LLM's probabilities [N, K] over each group's candidates, renormalised: what the head learns."""
    q = torch.tensor([g["llm_probs"] for g in groups], dtype=torch.float32)
    return q / q.sum(-1, keepdim=True)


def head_scores(rows: torch.Tensor, hidden: torch.Tensor, logp: torch.Tensor, prior_weight: float):
    """(scores as decoding picks by, head scores) [N, K]: what local_scorer computes from the same rows."""
    head = reserved_scores(hidden, rows)
    return with_prior(head, logp, prior_weight), head


def head_metrics(rows, hidden, logp, q, prior_weight, gate: float = 0.0) -> dict:
    """The same validation numbers as train.evaluate, from cached features."""
    with torch.no_grad():
        s, head = head_scores(rows, hidden, logp, prior_weight)
    return selection_metrics(s, q, head, gate)


def train_rows(init: torch.Tensor, hidden, logp, q, tr: torch.Tensor, cfg: TrainConfig):
    """Fit the reserved rows from `init` on the groups indexed by `tr`: yields (epoch, rows, mean training
    loss) after each of `cfg.epochs` epochs (the rows are the live parameter: clone to keep them)."""
    rows = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([rows], lr=cfg.head_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        total = 0.0
        for idx in tr[torch.randperm(len(tr), generator=gen)].split(cfg.head_batch):
            scores, _ = head_scores(rows, hidden[idx], logp[idx], cfg.prior_weight)
            loss = selection_loss(scores, q[idx], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([rows], cfg.max_grad_norm)
            opt.step()
            total += loss.item() * len(idx)
        yield epoch, rows, total / max(len(tr), 1)


def fit_head_only(
    cfg: TrainConfig, pair, groups: list[dict], train: list[dict], val: list[dict], progress: bool = True
) -> dict:
    """`train` and `val` are sublists of `groups`, whose (file) order the feature cache follows."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    reserved = list(pair.reserved_ids)
    model = pair.slm_module().eval()
    hidden, _ = group_features(model, groups, pair.vocab_size, cfg, progress)
    logp, q = recorded_prior(groups), llm_targets(groups)
    where = {id(g): i for i, g in enumerate(groups)}
    tr, va = (torch.tensor([where[id(g)] for g in part], dtype=torch.long) for part in (train, val))
    init = model.get_output_embeddings().weight.detach()[reserved].float().cpu()
    start = torch.zeros_like(init) if cfg.prior_weight > 0 else init.clone()

    def scored(rows) -> dict:
        return head_metrics(rows, hidden[va], logp[va], q[va], cfg.prior_weight, cfg.gate)

    history = [{"epoch": 0, "train_loss": None, **scored(start)}]
    best_epoch, best_rows = 0, start.clone()
    for epoch, trained, loss in train_rows(start, hidden, logp, q, tr, cfg):
        history.append({"epoch": epoch, "train_loss": loss, **scored(trained)})
        if cfg.keep == "last" or history[-1]["agree_at_1"] > history[best_epoch]["agree_at_1"]:
            best_epoch, best_rows = epoch, trained.detach().clone()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "reserved_rows.safetensors") as tmp:
        save_file({"reserved_ids": torch.tensor(reserved), "weight": best_rows.contiguous()}, tmp)
    from dataclasses import asdict

    meta = {
        "slm": cfg.slm,
        "reserved_ids": reserved,
        "prior_weight": cfg.prior_weight,
        "gate": cfg.gate,
        "head_only": True,
        "best_epoch": best_epoch,
        "config": asdict(cfg),
        "train_groups": len(train),
        "val_groups": len(val),
        "history": history,
    }
    write_json(out / "selector.json", meta)
    return {"history": history, "best_epoch": best_epoch, "seconds": time.perf_counter() - t0}
