"""`s2t train`: LoRA + the 16 reserved lm_head rows learn to score candidates like the LLM.

Each group is one prefix plus K candidate tokens laid out as a tree (every candidate at the prefix's
next position, seeing the prefix and itself), so one forward scores all K; `layout="naive"` builds
K copies of the prefix instead and exists to measure the difference.

loss = CE(softmax(scores / T), LLM's best) + hinge(best - best negative) + KL(LLM || softmax(scores / T))
       + 0.1 * KL(adapted || base) on the text vocabulary (base = the same model, adapter disabled)

With `prior_weight` w > 0 (the default, w = T) a candidate's score is the head's plus w x its log-prob under
the model being trained (local_scorer.with_prior), exactly as decoding will pick it, and the reserved rows
start equal (zero), so the untrained selector is greedy and the loss only has to teach it where the SLM's
top-1 is wrong. w = 0 is the paper's head alone, starting from the model's own (unused) padding rows.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..decoding.config import LOCAL_MODES
from ..decoding.local_scorer import score_from_logits, with_prior
from ..errors import S2TError
from ..eval.runner import read_lines

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        if self.checkpoint_every < 1:
            raise S2TError(f"checkpoint_every must be >= 1 group, got {self.checkpoint_every}")


def tree_batch(context: list[int], cands: list[int], device, dtype):
    """input_ids [1, L+K], position_ids [1, L+K] and an additive 4D mask [1, 1, L+K, L+K]."""
    L, K = len(context), len(cands)
    ids = torch.tensor([context + cands], device=device)
    pos = torch.tensor([list(range(L)) + [L] * K], device=device)
    vis = torch.zeros(L + K, L + K, dtype=torch.bool, device=device)
    vis[:L, :L] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    vis[L:, :L] = True
    vis[L:, L:] = torch.eye(K, dtype=torch.bool, device=device)
    mask = torch.zeros(1, 1, L + K, L + K, dtype=dtype, device=device).masked_fill(~vis, torch.finfo(dtype).min)
    return ids, pos, mask


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


def group_scores(model, group: dict, reserved, vocab_size: int, cfg: TrainConfig):
    """(scores [K] as decoding picks by, raw candidate logits [K, V_all], head-only scores [K])."""
    cands = group["candidates"]
    raw = candidate_logits(model, group["context"], cands, cfg.layout, with_prefix=cfg.prior_weight > 0)
    if cfg.prior_weight > 0:
        prefix, raw = raw[0], raw[1:]
        cand_logp = prefix[:vocab_size].log_softmax(-1)[torch.tensor(cands, device=raw.device)].detach()
    head = score_from_logits(raw, reserved)
    scores = with_prior(head, cand_logp, cfg.prior_weight) if cfg.prior_weight > 0 else head
    return scores, raw, head


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


def group_loss(model, group: dict, reserved, vocab_size: int, cfg: TrainConfig):
    scores, raw, _ = group_scores(model, group, reserved, vocab_size, cfg)
    q = torch.tensor(group["llm_probs"], device=scores.device)
    loss = selection_loss(scores[None], q[None], cfg)
    if cfg.w_base > 0:
        text = raw[:, :vocab_size].log_softmax(-1)
        with torch.no_grad(), model.disable_adapter():
            base = candidate_logits(model, group["context"], group["candidates"], cfg.layout)[
                :, :vocab_size
            ].log_softmax(-1)
        loss = loss + cfg.w_base * (text.exp() * (text - base)).sum(-1).mean()
    return loss, scores.detach(), q / q.sum()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().float()
    rb = b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den else 0.0


def load_groups(groups_dir: str | Path, max_groups: int | None = None) -> list[dict]:
    path = Path(groups_dir) / "groups.jsonl"
    if not path.is_file():
        raise S2TError(f"no groups.jsonl in {groups_dir}: run `s2t collect` first")
    groups = [dict(g, item=r["item"]) for r in read_lines(path) for g in r["groups"]]
    if not groups:
        raise S2TError(f"{path} holds no groups")
    return groups[:max_groups] if max_groups else groups


class ReservedRows(torch.nn.Module):
    """The 16 reserved lm_head rows as their own trainable [16, H] fp32 parameter, written over the head's
    output by a forward hook. The full head (tied to the input embeddings in small Qwen models) stays
    frozen, so no dense [V, H] gradient or optimizer state is ever built for the 99.99% of rows that
    must not move. `zero` starts every row at 0: all 16 logits equal, every candidate scores 0.5."""

    def __init__(self, head: torch.nn.Linear, reserved, zero: bool = False):
        super().__init__()
        self.register_buffer("ids", torch.tensor(list(reserved), device=head.weight.device), persistent=False)
        init = head.weight.detach()[list(reserved)].float().clone()
        self.weight = torch.nn.Parameter(init.zero_() if zero else init)
        self.handle = head.register_forward_hook(self._override)

    def _override(self, module, args, out):
        rows = args[0].to(self.weight.dtype) @ self.weight.T  # [..., 16]
        return out.float().index_copy(-1, self.ids, rows)


def prepare_model(slm_model, reserved, cfg: TrainConfig):
    """Wrap in LoRA; the reserved rows are the only other trainable weights."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        slm_model,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGETS,
            bias="none",
        ),
    )
    rows = ReservedRows(model.get_output_embeddings(), reserved, zero=cfg.prior_weight > 0)
    return model, rows


def save_selector(model, rows: ReservedRows, reserved, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_embedding_layers=False)
    save_file(
        {"reserved_ids": torch.tensor(reserved), "weight": rows.weight.detach().float().contiguous()},
        out / "reserved_rows.safetensors",
    )
    (out / "selector.json").write_text(json.dumps(meta, indent=2))


TIED = 1e-3  # a group whose K scores all lie within this is tied: argmax falls back to the SLM's top-1


def evaluate(model, groups, reserved, vocab_size, cfg) -> dict:
    """Agree@1 and Spearman with the LLM on held-out groups, beside the bar to clear: how often the SLM's
    own top-1 (candidate 0, candidates being in SLM order) is already the LLM's choice. `tied` counts
    groups whose head scores are all equal: the collapse where one reserved row wins every softmax (and the
    untrained head of a selector with a prior, which then picks as greedy does)."""
    agree, slm_agree, tied, rhos = 0, 0, 0, []
    model.eval()
    with torch.no_grad():
        for g in groups:
            s, _, head = group_scores(model, g, reserved, vocab_size, cfg)
            q = torch.tensor(g["llm_probs"], device=s.device)
            agree += int(s.argmax() == q.argmax())
            slm_agree += int(q.argmax() == 0)
            tied += int(float(head.max() - head.min()) < TIED)
            rhos.append(spearman(s, q))
    model.train()
    n = max(len(groups), 1)
    return {
        "agree_at_1": agree / n,
        "slm_top1_agree": slm_agree / n,
        "spearman": sum(rhos) / n,
        "tied": tied / n,
        "n": len(groups),
    }


def split_groups(groups: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation holds whole problems, `val_fraction` of them, drawn with the seed."""
    items = sorted({g["item"] for g in groups})
    rng = random.Random(cfg.seed)
    val_items = set(rng.sample(items, max(1, int(len(items) * cfg.val_fraction)))) if len(items) > 1 else set()
    train = [g for g in groups if g["item"] not in val_items]
    return train, [g for g in groups if g["item"] in val_items] or train[: max(1, len(train) // 10)]


def run_train(cfg: TrainConfig, progress: bool = True) -> dict:
    from rich.progress import Progress

    from ..models.pair import load_pair

    groups = load_groups(cfg.groups, cfg.max_groups)
    pair = load_pair(cfg.slm, None, dtype=cfg.dtype, device=cfg.device)
    if not pair.reserved_ids:
        raise S2TError(f"{cfg.slm} has no reserved ids for the score head")
    reserved = pair.reserved_ids
    train, val = split_groups(groups, cfg)
    if cfg.head_only:
        from .head_only import fit_head_only

        return fit_head_only(cfg, pair, groups, train, val, progress)
    torch.manual_seed(cfg.seed)
    model, rows = prepare_model(pair.slm, reserved, cfg)
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    params = [*lora, rows.weight]
    opt = torch.optim.AdamW(
        [
            {"params": lora, "lr": cfg.lr, "weight_decay": 0.01},
            {"params": [rows.weight], "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
    )
    out = Path(cfg.out)
    state_path = out / "train_state.pt"
    epoch, step, total, history = 0, 0, 0.0, []
    if state_path.is_file():  # resume, mid-epoch included
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(state_path, weights_only=False)
        set_peft_model_state_dict(model, load_file(out / "adapter_model.safetensors"))
        with torch.no_grad():
            rows.weight.copy_(load_file(out / "reserved_rows.safetensors")["weight"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        epoch, step, total, history = state["epoch"], state.get("step", 0), state.get("total", 0.0), state["history"]
    meta = {
        "slm": cfg.slm,
        "reserved_ids": list(reserved),
        "prior_weight": cfg.prior_weight,
        "config": asdict(cfg),
        "train_groups": len(train),
        "val_groups": len(val),
    }

    def checkpoint():
        save_selector(model, rows, reserved, out, {**meta, "history": history})
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "step": step,
                "total": total,
                "history": history,
                "rng": torch.get_rng_state(),
            },
            tmp,
        )
        tmp.replace(state_path)

    if not history:  # the untrained head, for reference
        history.append({"epoch": 0, "train_loss": None, **evaluate(model, val, reserved, pair.vocab_size, cfg)})
    t0 = time.perf_counter()
    with Progress(disable=not progress) as bar:
        while epoch < cfg.epochs:
            order = list(range(len(train)))
            random.Random(cfg.seed + epoch).shuffle(order)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(order), completed=step)
            while step < len(order):
                loss, _, _ = group_loss(model, train[order[step]], reserved, pair.vocab_size, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                total += loss.item()
                step += 1
                bar.advance(task)
                if step % cfg.checkpoint_every == 0 and step < len(order):
                    checkpoint()
            metrics = evaluate(model, val, reserved, pair.vocab_size, cfg)
            history.append({"epoch": epoch + 1, "train_loss": total / max(len(order), 1), **metrics})
            epoch, step, total = epoch + 1, 0, 0.0
            checkpoint()
    return {"history": history, "seconds": time.perf_counter() - t0}


def apply_selector(pair, path: str | Path, mode: str = "coupled"):
    """Load a trained selector into the pair's SLM, reserved rows set. Coupled mode merges the LoRA
    (no cost at generation); decoupled keeps it separate so the base model can generate with it off."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "selector.json").is_file() or not (path / "reserved_rows.safetensors").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no selector.json or reserved_rows.safetensors)")
    meta = json.loads((path / "selector.json").read_text())
    head_only = bool(meta.get("head_only"))
    if not head_only and not (path / "adapter_config.json").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no adapter_config.json)")
    if meta.get("slm") != pair.slm_name:
        raise S2TError(f"selector {path} was trained for {meta.get('slm')!r}, not {pair.slm_name!r}")
    rows = load_file(path / "reserved_rows.safetensors")
    reserved = tuple(int(i) for i in rows["reserved_ids"].tolist())
    if reserved != tuple(pair.reserved_ids or ()):
        raise S2TError(f"selector {path} uses reserved ids {reserved[:2]}..., the pair has {pair.reserved_ids}")
    if mode not in LOCAL_MODES:
        raise S2TError(f"unknown S2T-Local mode {mode!r}: use coupled or decoupled")
    if head_only and mode == "decoupled":
        raise S2TError(
            f"{path} is a head-only selector (no adapter): the base model generates in either mode, "
            "so use the coupled mode (the default)"
        )
    model = pair.slm if head_only else PeftModel.from_pretrained(pair.slm, path)
    if mode == "coupled" and not head_only:
        model = model.merge_and_unload()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[list(reserved)] = rows["weight"].to(head.weight.dtype).to(head.weight.device)
        # and score in fp32 as training did: a bf16 head rounds logits near 10 to 1/32, enough to tie candidates
        ReservedRows(head, reserved).weight.requires_grad_(False).copy_(rows["weight"])
    pair.slm = model.eval()
    pair.selector_prior = float(meta.get("prior_weight", 0.0))  # selectors from before the prior had none
    return pair
