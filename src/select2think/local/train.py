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
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import S2TError
from ..io import atomic_path, check_safetensors, differences, read_json, run_lock, sha256_of, write_json
from .head_only import computed, head_metrics, llm_targets
from .objective import TrainConfig, batch_loss, groups_sha256, load_groups, shared_trajectories, split_groups
from .selector import save_selector

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def evaluate(model, rows: ReservedRows, groups, vocab_size, cfg) -> dict:
    """objective.selection_metrics on held-out groups: their candidates' hidden states and prior through the
    adapted backbone (one tree forward per 32 groups of a problem), scored by the rows as decoding scores."""
    model.eval()
    feats = computed(model, groups, vocab_size, cfg.layout)
    model.train()
    hidden, logp = torch.stack([h for h, _ in feats]), torch.stack([p for _, p in feats])
    return head_metrics(rows.weight.detach(), hidden, logp, llm_targets(groups), cfg.prior_weight, cfg.gate)


def initial_rows(cfg: TrainConfig, reserved) -> torch.Tensor:
    """The reserved rows of the selector `cfg.init_rows` (e.g. a head-only one), checked to mean the same."""
    from safetensors.torch import load_file

    src = Path(str(cfg.init_rows))
    meta = read_json(src / "selector.json", "selector settings")
    saved = load_file(check_safetensors(src / "reserved_rows.safetensors", "not a selector directory"))
    if saved["reserved_ids"].tolist() != list(reserved) or meta.get("slm") != cfg.slm:
        raise S2TError(f"{src} is a selector for another model's reserved rows: --init-rows takes one of {cfg.slm}")
    if meta.get("prior_weight") != cfg.prior_weight:
        raise S2TError(f"{src} was trained with prior weight {meta.get('prior_weight')}, not {cfg.prior_weight}")
    return saved["weight"].float()


STATE_JSON, STATE_TENSORS, LEGACY_STATE = "train_state.json", "train_state.safetensors", "train_state.pt"
# may change between a run and its resumption
RESUME_FREE = ("out", "device", "epochs", "checkpoint_every", "gate", "val_every")
BEST = "best"  # the selector at the best validation point, beside the run's latest state


def train_identity(cfg: TrainConfig) -> dict:
    """What a resumed run must share with the run that wrote the state: every setting that changes the
    result, the groups by their content (sha256), not the directory's name."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE and k != "groups"}
    return {**d, "groups_sha256": groups_sha256(cfg.groups)}


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
    if cfg.init_rows and saved is None:
        with torch.no_grad():
            rows.weight.copy_(initial_rows(cfg, reserved))
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
    # a step is a batch: groups of one problem, scored by one tree forward over its trajectory
    batches = [[train[i] for i in b] for b in shared_trajectories(train, cfg.group_batch)]
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
        "gate": cfg.gate,
        "config": asdict(cfg),
        "train_groups": len(train),
        "val_groups": len(val),
    }

    def checkpoint():
        save_selector(model, rows, reserved, out, {**meta, "history": history})
        save_state(out, opt, {"identity": identity, "epoch": epoch, "step": step, "total": total, "history": history})

    def validate(train_loss: float | None) -> None:
        """Score the held-out problems; a new best becomes the selector in `out/best`."""
        metrics = evaluate(model, rows, val, pair.vocab_size, cfg)
        history.append({"epoch": epoch, "step": done, "groups_seen": seen(), "train_loss": train_loss, **metrics})
        if metrics["agree_at_1"] > max((h["agree_at_1"] for h in history[:-1]), default=float("-inf")):
            save_selector(model, rows, reserved, out / BEST, {**meta, "history": history, "kept": history[-1]})

    def seen() -> int:
        return epoch * len(train) + done

    def crossed(every: int, n: int) -> bool:  # did the last n groups pass a multiple of `every`?
        return bool(every) and done // every > (done - n) // every

    done = 0  # groups of this epoch trained on
    if not history:  # the untrained head, for reference
        validate(None)
    t0 = time.perf_counter()
    with Progress(disable=not progress) as bar:
        while epoch < cfg.epochs:
            order = list(range(len(batches)))
            random.Random(cfg.seed + epoch).shuffle(order)
            done = sum(len(batches[i]) for i in order[:step])
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(train), completed=done)
            while step < len(order):
                batch = batches[order[step]]
                loss, _, _ = batch_loss(model, batch, reserved, pair.vocab_size, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                total += loss.item() * len(batch)
                step, done = step + 1, done + len(batch)
                bar.advance(task, len(batch))
                if crossed(cfg.val_every, len(batch)) and step < len(order):
                    validate(total / done)
                if crossed(cfg.checkpoint_every, len(batch)) and step < len(order):
                    checkpoint()
            loss = total / max(done, 1)
            epoch, step, done, total = epoch + 1, 0, 0, 0.0
            validate(loss)
            checkpoint()
    return {"history": history, "seconds": time.perf_counter() - t0, "best": str(out / BEST)}
