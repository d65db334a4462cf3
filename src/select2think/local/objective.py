"""S2T-Local's training objective and its data: the settings, the tree layout of a group, candidate scores
(the same score as decoding's: decoding.local_scorer), the loss, and the groups split by problem. Both ways of
training (LoRA + rows in train.py, rows alone in head_only.py) use these."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends.tree import additive, sibling_visibility
from ..decoding.local_scorer import gated_pick, score_from_logits, with_prior
from ..errors import S2TError
from ..io import read_jsonl, sha256_of
from .split import validation_problems

CONTEXT = 511  # a group keeps at most this many tokens of its prefix (collect cuts, training reads)


@dataclass
class TrainConfig:
    slm: str
    groups: str
    out: str
    epochs: int = 2
    lr: float = 2e-4
    head_lr: float = 1e-4  # Adam moves every element ~lr per step; the rows' elements are ~0.01
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    temperature: float = 0.1
    prior_weight: float = 0.1  # the SLM's log-prob joins each score (see module doc); 0 = the paper's head alone
    head_only: bool = False  # no LoRA: only the reserved rows learn, on cached hidden states (local/head_only.py)
    head_batch: int = 32  # groups per step of head-only training
    keep: str = "best"  # head-only: the best validation epoch's rows, or the last epoch's (unbiased validation)
    margin: float = 0.1
    w_ce: float = 1.0
    w_hinge: float = 1.0
    w_list: float = 1.0
    w_base: float = 0.1
    val_fraction: float = 0.1
    max_groups: int | None = None
    seed: int = 0
    checkpoint_every: int = 100  # groups; a killed run resumes from the last checkpoint
    group_batch: int = 32  # LoRA: groups per optimizer step, of one problem, in one tree forward (shared_trajectories)
    init_rows: str | None = None  # LoRA: start the reserved rows from this selector's (e.g. a head-only one)
    val_every: int = 0  # LoRA: validate every this many training groups (0: after each epoch); the best is kept
    gate: float = 0.0  # overrule the SLM's top-1 only when the pick leads it by more (decoding.local_scorer.gated_pick)
    layout: str = "tree"
    dtype: str = "fp32"
    device: str = "auto"

    def __post_init__(self):
        if self.layout not in ("tree", "naive"):
            raise S2TError(f"layout must be tree or naive, got {self.layout!r}")
        if self.epochs < 1:
            raise S2TError(f"epochs must be >= 1, got {self.epochs}")
        if self.prior_weight < 0:
            raise S2TError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.keep not in ("best", "last"):
            raise S2TError(f"keep must be best or last, got {self.keep!r}")
        if self.head_batch < 1:
            raise S2TError(f"head_batch must be >= 1 group, got {self.head_batch}")
        if not 0.0 <= self.gate < float("inf"):
            raise S2TError(f"gate must be a number >= 0, got {self.gate}")
        if self.val_every < 0:
            raise S2TError(f"val_every must be >= 0 groups, got {self.val_every}")
        if self.group_batch < 1:
            raise S2TError(f"group_batch must be >= 1 group, got {self.group_batch}")
        if self.checkpoint_every < 1:
            raise S2TError(f"checkpoint_every must be >= 1 group, got {self.checkpoint_every}")


def tree_batch(context: list[int], cands: list[int], device, dtype):
    """input_ids [1, L+K], position_ids [1, L+K] and an additive 4D mask [1, 1, L+K, L+K]."""
    L, K = len(context), len(cands)
    ids = torch.tensor([context + cands], device=device)
    pos = torch.tensor([list(range(L)) + [L] * K], device=device)
    vis = torch.zeros(L + K, L + K, dtype=torch.bool, device=device)
    vis[:L, :L] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    vis[L:] = sibling_visibility(torch.ones(1, L, dtype=torch.bool, device=device), K)[0]  # as decoding scores
    return ids, pos, additive(vis[None], dtype)


def candidate_logits(
    model, context: list[int], cands: list[int], layout: str = "tree", with_prefix: bool = False
) -> torch.Tensor:
    """Raw logits [K, V_all] at each candidate's position ([1 + K, V_all] `with_prefix`: row 0 is the
    prefix's own next-token logits, which the candidates came from). Only those positions go through the
    vocabulary projection, and as one 2D matmul: a 3D [1, K, H] input makes `linear` batch the [V, H]
    head through a contiguous copy of it (~0.3 s per call for a 152k vocabulary on this CPU)."""
    return model.get_output_embeddings()(candidate_hidden(model, context, cands, layout, with_prefix)).float()


def candidate_hidden(
    model, context: list[int], cands: list[int], layout: str = "tree", with_prefix: bool = False
) -> torch.Tensor:
    """Final hidden states [K, H] ([1 + K, H] `with_prefix`) that `candidate_logits` projects."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    backbone = model.get_decoder()
    K = len(cands)
    if layout == "tree":
        ids, pos, mask = tree_batch(context, cands, device, dtype)
        hidden = backbone(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state[0]
        return hidden[-K - 1 :] if with_prefix else hidden[-K:]
    batch = torch.tensor([[*context, c] for c in cands], device=device)
    out = backbone(input_ids=batch).last_hidden_state
    return torch.cat([out[:1, -2], out[:, -1]]) if with_prefix else out[:, -1]


def trajectory_tree(ids: list[int], prefix_lens: list[int], cands: list[list[int]], device, dtype):
    """Many groups of one trajectory in one layout: input_ids [1, L + G*K], position_ids [1, L + G*K] and an
    additive mask [1, 1, L + G*K, L + G*K]. The trajectory's L tokens are causal; group g's K candidates sit at
    position prefix_lens[g], each seeing the trajectory's first prefix_lens[g] tokens and itself: for each
    group, exactly `tree_batch(ids[:prefix_lens[g]], cands[g])`."""
    L, G, K = len(ids), len(cands), len(cands[0])
    n = L + G * K
    vis = torch.zeros(n, n, dtype=torch.bool, device=device)
    vis[:L, :L] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    eye = torch.eye(K, dtype=torch.bool, device=device)
    for g, P in enumerate(prefix_lens):
        s = L + g * K
        vis[s : s + K, :P] = True
        vis[s : s + K, s : s + K] = eye
    flat = [c for group in cands for c in group]
    ids_t = torch.tensor([ids + flat], device=device)
    pos = torch.tensor([list(range(L)) + [P for P in prefix_lens for _ in range(K)]], device=device)
    return ids_t, pos, additive(vis[None], dtype)


def trajectory_hidden(
    model, ids: list[int], prefix_lens: list[int], cands: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates' final hidden states [G, K, H], the prefixes' [G, H]) for G groups of one trajectory `ids`
    (group g: candidates cands[g] after the first prefix_lens[g] tokens) in one tree forward: what
    `candidate_hidden(model, ids[:P], cands, "tree", with_prefix=True)` gives each group (gradients flow)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    L = max(prefix_lens)
    ids_t, pos, mask = trajectory_tree(ids[:L], prefix_lens, cands, device, dtype)
    out = model.get_decoder()(input_ids=ids_t, position_ids=pos, attention_mask=mask).last_hidden_state[0]
    return out[L:].reshape(len(cands), len(cands[0]), -1), out[[P - 1 for P in prefix_lens]]


def shared_trajectories(groups: list[dict], size: int) -> list[list[int]]:
    """Indices of `groups` in batches that one tree forward over a trajectory scores (`batch_logits`): up to
    `size` groups of one problem, in file order, whose contexts are whole prefixes (shorter than the CONTEXT
    cut) of that problem's longest; every other group alone."""
    by_item: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    for i, g in enumerate(groups):
        if len(g["context"]) < CONTEXT:
            by_item.setdefault(g["item"], []).append(i)
        else:
            alone.append([i])
    batches = []
    for idx in by_item.values():
        ids = max((groups[i]["context"] for i in idx), key=len)
        fits = [ids[: len(groups[i]["context"])] == groups[i]["context"] for i in idx]
        shared = [i for i, ok in zip(idx, fits, strict=True) if ok]
        alone += [[i] for i, ok in zip(idx, fits, strict=True) if not ok]
        batches += [shared[a : a + size] for a in range(0, len(shared), size)]
    return batches + alone


def prefix_logp(model, prefix_hidden: torch.Tensor, cands: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The SLM's log-probs [G, K] of candidates cands [G, K] from the prefix's final hidden states [G, H] (the
    prior in each candidate's score)."""
    logits = model.get_output_embeddings()(prefix_hidden).float()[:, :vocab_size]
    return logits.log_softmax(-1).gather(-1, cands.to(logits.device))


def batch_logits(model, groups: list[dict], layout: str = "tree") -> torch.Tensor:
    """Raw logits [G, 1 + K, V_all] (row 0 of each: the prefix's next-token logits, which the candidates came
    from). Tree layout: one forward over the longest context, of which every group's context must be a prefix
    (`shared_trajectories` batches them so); naive: K prefix copies per group."""
    if layout == "tree":
        ids = max((g["context"] for g in groups), key=len)
        if any(ids[: len(g["context"])] != g["context"] for g in groups):
            raise ValueError("a tree batch's contexts must all be prefixes of its longest (shared_trajectories)")
        lens, cands = [len(g["context"]) for g in groups], [g["candidates"] for g in groups]
        hidden, prefix = trajectory_hidden(model, ids, lens, cands)
        h = torch.cat([prefix[:, None], hidden], 1)
    else:
        h = torch.stack([candidate_hidden(model, g["context"], g["candidates"], layout, True) for g in groups])
    G, rows, H = h.shape
    return model.get_output_embeddings()(h.reshape(G * rows, H)).float().reshape(G, rows, -1)  # 2D: see above


def batch_scores(model, groups: list[dict], reserved, vocab_size: int, cfg: TrainConfig):
    """(scores [G, K] as decoding picks by, raw logits [G, 1 + K, V_all] (`batch_logits`), head-only scores
    [G, K])."""
    raw = batch_logits(model, groups, cfg.layout)
    head = score_from_logits(raw[:, 1:], reserved)
    if not cfg.prior_weight:
        return head, raw, head
    cands = torch.tensor([g["candidates"] for g in groups], device=raw.device)
    cand_logp = raw[:, 0, :vocab_size].log_softmax(-1).gather(-1, cands).detach()
    return with_prior(head, cand_logp, cfg.prior_weight), raw, head


def selection_loss(scores: torch.Tensor, llm_probs: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean over groups of CE + hinge + listwise KL, for scores and LLM probabilities [G, K]."""
    q = llm_probs / llm_probs.sum(-1, keepdim=True)
    best = q.argmax(-1, keepdim=True)
    logp = (scores / cfg.temperature).log_softmax(-1)
    ce = -logp.gather(-1, best).squeeze(-1)
    others = scores.scatter(-1, best, float("-inf")).max(-1).values
    hinge = torch.relu(cfg.margin - (scores.gather(-1, best).squeeze(-1) - others))
    listwise = (q * (q.clamp_min(1e-12).log() - logp)).sum(-1)
    return (cfg.w_ce * ce + cfg.w_hinge * hinge + cfg.w_list * listwise).mean()


def batch_loss(model, groups: list[dict], reserved, vocab_size: int, cfg: TrainConfig):
    """The selection loss, plus `w_base` x KL(adapted || base) on the text vocabulary at each prefix's position
    and each candidate's, averaged over the groups (so a batch's loss is the mean of its groups' alone): the
    prefix's row is the distribution the SLM generates from (coupled mode merges the LoRA) and the prior in
    every score, so neither may drift while the head learns. -> (loss, scores [G, K], LLM targets [G, K])."""
    scores, raw, _ = batch_scores(model, groups, reserved, vocab_size, cfg)
    q = torch.tensor([g["llm_probs"] for g in groups], device=scores.device)
    loss = selection_loss(scores, q, cfg)
    if cfg.w_base > 0:
        text = raw[..., :vocab_size].log_softmax(-1)
        with torch.no_grad(), model.disable_adapter():
            base = batch_logits(model, groups, cfg.layout)[..., :vocab_size].log_softmax(-1)
        loss = loss + cfg.w_base * (text.exp() * (text - base)).sum(-1).mean()
    return loss, scores.detach(), q / q.sum(-1, keepdim=True)


def selection_metrics(scores: torch.Tensor, q: torch.Tensor, head: torch.Tensor, gate: float = 0.0) -> dict:
    """Validation numbers for scores as decoding picks by, the LLM's probabilities and the head's own scores
    [N, K] (candidates in the SLM's rank order): Agree@1 beside the bar to clear (how often the SLM's top-1,
    candidate 0, is already the LLM's choice); flips (picks other than the SLM's top-1), those that chose
    the LLM's choice and those that broke an SLM top-1 that was already it; `tied`: groups whose head scores
    are all equal (the collapse where one reserved row wins every softmax; an untrained head with a prior)."""
    pick, best = gated_pick(scores, gate), q.argmax(-1)
    flip = pick != 0
    n = max(len(q), 1)

    def share(mask: torch.Tensor) -> float:
        return float(mask.float().sum()) / n

    return {
        "agree_at_1": share(pick == best),
        "slm_top1_agree": share(best == 0),
        "spearman": sum(spearman(a, b) for a, b in zip(scores, q, strict=True)) / n,
        "tied": share((head.max(-1).values - head.min(-1).values) < TIED),
        "flips": share(flip),
        "flips_right": share(flip & (pick == best)),
        "flips_broke": share(flip & (best == 0)),
        "gate": gate,
        "n": len(q),
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().float()
    rb = b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den else 0.0


def group_files(groups_dir: str | Path) -> list[Path]:
    """The groups files `s2t collect` wrote in a directory: `groups.jsonl` (one shard) and/or
    `groups.shardIofN.jsonl`, in shard order."""
    d = Path(groups_dir)
    shards = sorted(d.glob("groups.shard*of*.jsonl"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
    return [p for p in [d / "groups.jsonl", *shards] if p.is_file()]


def groups_sha256(groups_dir: str | Path) -> str:
    """The groups' content: one file's sha256, or (shards) the sha256 of the files' names and sha256s."""
    files = group_files(groups_dir)
    if len(files) == 1:
        return sha256_of(files[0])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name} {sha256_of(p)}\n".encode())
    return h.hexdigest()


def load_groups(groups_dir: str | Path, max_groups: int | None = None) -> list[dict]:
    """Every group of every shard, in shard order."""
    files = group_files(groups_dir)
    if not files:
        raise S2TError(f"no groups.jsonl in {groups_dir}: run `s2t collect` first")
    groups = [dict(g, item=r["item"]) for path in files for r in read_jsonl(path) for g in r["groups"]]
    if not groups:
        raise S2TError(f"{groups_dir} holds no groups")
    return groups[:max_groups] if max_groups else groups


TIED = 1e-3  # a group whose K scores all lie within this is tied: argmax falls back to the SLM's top-1


def split_groups(groups: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation holds whole problems, `val_fraction` of them, drawn with the seed."""
    val_items = validation_problems((g["item"] for g in groups), cfg.val_fraction, cfg.seed)
    train = [g for g in groups if g["item"] not in val_items]
    return train, [g for g in groups if g["item"] in val_items] or train[: max(1, len(train) // 10)]
