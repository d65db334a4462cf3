"""`s2t collect`: the LLM's selections as training groups for S2T-Local.

S2T decodes each training problem (kl trigger, K = 16); both models are then teacher-forced over the
trajectory in one forward each, which recovers, at every step, the SLM's top-16, the LLM's
probabilities on them and the trigger statistic. Every triggered step becomes a group; every step
gives learned-trigger features (entropy, margin, top-8 probabilities, SLM final hidden state).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..decoding import DecodeConfig, generate
from ..decoding.api import encode_prompts
from ..decoding.calibrate import load_threshold
from ..decoding.triggers import EntropyTrigger, KLTrigger, MarginTrigger
from ..errors import S2TError
from ..eval.datasets import load_dataset, refuse_test
from ..eval.prompts import math_prompt
from ..eval.runner import read_lines

GROUP_K = 16
CONTEXT = 511


@dataclass
class CollectConfig:
    slm: str
    llm: str
    dataset: str
    out: str
    threshold_file: str
    limit: int = 200
    k: int = GROUP_K
    max_new_tokens: int = 512
    warmup: int = 3
    batch_size: int = 4
    dtype: str = "bf16"
    device: str = "auto"


@torch.no_grad()
def teacher_forced(model, ids: list[int], n_gen: int, vocab_size: int, hidden: bool = False):
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=hidden)
    start = len(ids) - n_gen - 1
    logp = out.logits[0, start : start + n_gen, :vocab_size].float().log_softmax(-1)
    h = out.hidden_states[-1][0, start : start + n_gen].float() if hidden else None
    return logp, h


def groups_for(pair, prompt_ids: list[int], gen: list[int], threshold: float, k: int, warmup: int):
    ids = prompt_ids + gen
    s_lp, h = teacher_forced(pair.slm, ids, len(gen), pair.vocab_size, hidden=True)
    l_lp, _ = teacher_forced(pair.llm, ids, len(gen), pair.vocab_size)
    stat = KLTrigger().statistic(s_lp, l_lp)
    fired = (stat > threshold) & (torch.arange(len(gen), device=stat.device) >= warmup)
    top_p, top_i = s_lp.topk(k, dim=-1)
    groups = []
    for t in fired.nonzero().flatten().tolist():
        cands = top_i[t].tolist()
        groups.append(
            {
                "step": t,
                "context": ids[: len(prompt_ids) + t][-CONTEXT:],
                "candidates": cands,
                "llm_probs": l_lp[t, top_i[t]].exp().tolist(),
                "slm_probs": top_p[t].exp().tolist(),
            }
        )
    feats = torch.cat(
        [EntropyTrigger().statistic(s_lp)[:, None], (1 - MarginTrigger().statistic(s_lp))[:, None], top_p[:, :8].exp()],
        dim=1,
    )
    return groups, {
        "stat": stat.cpu().numpy(),
        "label": fired.cpu().numpy(),
        "features": feats.cpu().numpy().astype(np.float32),
        "hidden": h.cpu().numpy().astype(np.float16),
    }


def run_collect(cfg: CollectConfig, progress: bool = True) -> Path:
    from rich.progress import Progress

    from ..models.pair import load_pair

    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    refuse_test(ds, "training")
    if not 2 <= cfg.k <= 64:
        raise S2TError(f"k must be between 2 and 64, got {cfg.k}")
    out = Path(cfg.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    path = out / "groups.jsonl"
    done = {r["item"] for r in read_lines(path)}
    items = [it for it in ds.take(cfg.limit) if it.id not in done]
    if not items:
        return out
    pair = load_pair(cfg.slm, cfg.llm, dtype=cfg.dtype, device=cfg.device)
    threshold = load_threshold(cfg.threshold_file, "kl", cfg.slm, cfg.llm)
    dcfg = DecodeConfig(
        policy="s2t", trigger="kl", threshold=threshold, k=cfg.k, max_new_tokens=cfg.max_new_tokens, warmup=cfg.warmup
    )
    with Progress(disable=not progress) as bar, open(path, "a") as f:
        task = bar.add_task("collect", total=len(items))
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            prompt_ids = encode_prompts(pair.tokenizer, [math_prompt(it.question) for it in chunk], True)
            res = generate(pair, [""] * len(chunk), dcfg, prompt_ids=prompt_ids, batch_size=len(chunk))
            for it, p_ids, g in zip(chunk, prompt_ids, res.generations, strict=True):
                groups, feats = groups_for(pair, p_ids, g.token_ids, threshold, cfg.k, cfg.warmup)
                np.savez_compressed(out / "features" / f"{it.id}.npz", **feats)
                f.write(json.dumps({"item": it.id, "groups": groups}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.advance(task, len(chunk))
    return out
