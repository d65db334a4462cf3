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

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..backends.tree import additive, sibling_visibility
from ..decoding.config import LOCAL_MODES
from ..decoding.local_scorer import score_from_logits, with_prior
from ..errors import S2TError
from ..eval.runner import read_lines
from ..io import atomic_path, check_safetensors, differences, read_json, run_lock, sha256_of, write_json
from .split import validation_problems

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
    write_json(out / "selector.json", meta)


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
    val_items = validation_problems((g["item"] for g in groups), cfg.val_fraction, cfg.seed)
    train = [g for g in groups if g["item"] not in val_items]
    return train, [g for g in groups if g["item"] in val_items] or train[: max(1, len(train) // 10)]


STATE_JSON, STATE_TENSORS, LEGACY_STATE = "train_state.json", "train_state.safetensors", "train_state.pt"
RESUME_FREE = ("out", "device", "epochs", "checkpoint_every")  # may change between a run and its resumption


def train_identity(cfg: TrainConfig) -> dict:
    """What a resumed run must share with the run that wrote the state: every setting that changes the
    result, the groups by their content (sha256), not the directory's name."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE and k != "groups"}
    return {**d, "groups_sha256": sha256_of(Path(cfg.groups) / "groups.jsonl")}


def check_resume(cfg: TrainConfig) -> dict | None:
    """The saved state's JSON half if `cfg.out` holds one made with the same settings; None for a fresh
    run; an S2TError naming the differences otherwise. A pickled state (older versions) is never loaded."""
    out = Path(cfg.out)
    if (out / LEGACY_STATE).exists():
        raise S2TError(
            f"{out / LEGACY_STATE} is a pickled training state from an older version; it is never loaded "
            "(unpickling can run code): delete it to start over, or use another --out"
        )
    if not (out / STATE_JSON).is_file():
        return None
    meta = read_json(out / STATE_JSON, "training state")
    if not isinstance(meta, dict) or "identity" not in meta:
        raise S2TError(f"{out / STATE_JSON} is not a training state from `s2t train`")
    diff = differences(meta["identity"], train_identity(cfg))
    if diff:
        raise S2TError(
            f"{out} holds a training run with other settings ({diff}): use the same settings or another --out"
        )
    return meta


def save_state(out: Path, opt, scalars: dict) -> None:
    """Optimizer state and RNG as safetensors, everything else as JSON (no pickle)."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {"rng": torch.get_rng_state()}
    plain = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{i}.{k}"] = v
    with atomic_path(out / STATE_TENSORS) as tmp:
        save_file(tensors, tmp)
    files = ("adapter_model.safetensors", "reserved_rows.safetensors", STATE_TENSORS)
    hashes = {f: sha256_of(out / f) for f in files}
    write_json(out / STATE_JSON, {**scalars, "param_groups": sd["param_groups"], "scalars": plain, "sha256": hashes})


def load_state(out: Path, opt, meta: dict) -> None:
    from safetensors.torch import load_file

    hint = "the checkpoint is damaged: delete it to start over, or use another --out"
    tensors = load_file(check_safetensors(out / STATE_TENSORS, hint))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise S2TError(f"{out / STATE_JSON} does not fit this model's optimizer ({e}); {hint}") from None
    torch.set_rng_state(tensors["rng"])


def load_checkpoint(out: Path, model, rows, meta: dict) -> None:
    """The adapter and reserved rows a checkpoint saved, after checking they are the files it saved."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    hint = "the checkpoint is damaged: delete it to start over, or use another --out"
    for name, digest in meta.get("sha256", {}).items():
        check_safetensors(out / name, hint)
        if sha256_of(out / name) != digest:
            raise S2TError(f"{out / name} changed since the checkpoint was written; {hint}")
    try:
        set_peft_model_state_dict(model, load_file(out / "adapter_model.safetensors"))
        saved = load_file(out / "reserved_rows.safetensors")["weight"]
        with torch.no_grad():
            rows.weight.copy_(saved)
    except (RuntimeError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise S2TError(f"the checkpoint in {out} does not fit this model ({first}); {hint}") from None


def run_train(cfg: TrainConfig, progress: bool = True) -> dict:
    with run_lock(cfg.out):
        return _run_train(cfg, progress)


def _run_train(cfg: TrainConfig, progress: bool = True) -> dict:
    from rich.progress import Progress

    from ..backends import load_pair

    groups = load_groups(cfg.groups, cfg.max_groups)
    saved = None if cfg.head_only else check_resume(cfg)
    pair = load_pair(cfg.slm, None, dtype=cfg.dtype, device=cfg.device)
    if not pair.reserved_ids:
        raise S2TError(f"{cfg.slm} has no reserved ids for the score head")
    reserved = pair.reserved_ids
    train, val = split_groups(groups, cfg)
    if cfg.head_only:
        from .head_only import fit_head_only

        return fit_head_only(cfg, pair, groups, train, val, progress)
    torch.manual_seed(cfg.seed)
    model, rows = prepare_model(pair.slm_module(), reserved, cfg)
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
    epoch, step, total, history = 0, 0, 0.0, []
    if saved is not None:  # resume, mid-epoch included
        load_checkpoint(out, model, rows, saved)
        load_state(out, opt, saved)
        epoch, step, total, history = saved["epoch"], saved["step"], saved["total"], saved["history"]
    identity = train_identity(cfg)
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
        save_state(out, opt, {"identity": identity, "epoch": epoch, "step": step, "total": total, "history": history})

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
    """Load a trained selector into the pair: its reserved rows become S2T-Local's score head
    (`pair.selector`). A LoRA selector needs the transformers backend: coupled mode merges the LoRA (no
    cost at generation); decoupled keeps it separate, the base model generating with it off."""
    from safetensors.torch import load_file

    from ..decoding.local_scorer import ReservedHead

    path = Path(path)
    if not (path / "selector.json").is_file() or not (path / "reserved_rows.safetensors").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no selector.json or reserved_rows.safetensors)")
    meta = read_json(path / "selector.json", "selector metadata")
    head_only = bool(meta.get("head_only"))
    if not head_only and not (path / "adapter_config.json").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no adapter_config.json)")
    for name in ("reserved_rows.safetensors",) + (() if head_only else ("adapter_model.safetensors",)):
        check_safetensors(path / name, "retrain or re-copy the selector")
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
    if not head_only:
        _apply_lora(pair, path, mode)
    # scores in fp32 as training computed them: bf16 rounds logits near 10 to 1/32, enough to tie candidates
    pair.selector = ReservedHead(rows["weight"].float(), float(meta.get("prior_weight", 0.0)))
    return pair


def _apply_lora(pair, path: Path, mode: str) -> None:
    from peft import PeftModel

    from ..backends.hf import HFBackend

    if pair.engine != "hf":
        raise S2TError(f"{path} is a LoRA selector: it needs --backend hf (a head-only selector runs on any backend)")
    peft = PeftModel.from_pretrained(pair.slm_module(), path).eval()
    if mode == "coupled":
        pair.slm = HFBackend(peft.merge_and_unload().eval())
    else:
        adapted = HFBackend(peft)
        pair.slm, pair.scorer = adapted.without_adapter(), adapted
