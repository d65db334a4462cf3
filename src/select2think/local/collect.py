"""`s2t collect`: the LLM's selections as training groups for S2T-Local.

S2T decodes each training problem (kl trigger, K = 16); both models are then teacher-forced over the
trajectory in one forward each, which recovers, at every step, the SLM's top-16, the LLM's
probabilities on them and the trigger statistic. Every triggered step becomes a group; every step
gives learned-trigger features (entropy, margin, top-8 probabilities, SLM final hidden state).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import load_dataset, refuse_test
from ..data.prompts import math_prompt
from ..decoding import DecodeConfig, generate
from ..decoding.calibrate import load_threshold
from ..decoding.teacher import step_logprobs
from ..decoding.triggers import KLTrigger, step_features
from ..decoding.vocab import Vocab
from ..errors import S2TError
from ..io import (
    append_line,
    atomic_path,
    differences,
    open_resume,
    read_json,
    read_jsonl,
    run_lock,
    sha256_of,
    sync,
    write_json,
)
from ..models.chat import encode_prompts
from ..progress import Progress

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
    backend: str = "hf"

    def __post_init__(self):
        if self.limit < 1:
            raise S2TError(f"--limit must be >= 1, got {self.limit}")
        if not 2 <= self.k <= 64:
            raise S2TError(f"k must be between 2 and 64, got {self.k}")
        if self.batch_size < 1:
            raise S2TError(f"--batch-size must be >= 1, got {self.batch_size}")

    def identity(self) -> dict:
        """What a rerun into the same directory must share (the limit may grow); the threshold file by its
        content, not its name."""
        d = {k: v for k, v in asdict(self).items() if k not in ("out", "limit", "batch_size", "device")}
        d["threshold_file"] = sha256_of(self.threshold_file)
        if Path(self.dataset).is_file():
            d["dataset"] = sha256_of(self.dataset)  # a local file by its content
        return d


def check_settings(cfg: CollectConfig, out: Path) -> None:
    """Record the settings on the first run; refuse a rerun under others, naming them."""
    path = out / "collect.json"
    if path.is_file():
        old = read_json(path, "collect settings")
        diff = differences(old.get("identity", {}) if isinstance(old, dict) else {}, cfg.identity())
        if diff:
            raise S2TError(f"{out} holds groups collected with other settings ({diff}): use another --out")
    elif (out / "groups.jsonl").is_file():
        raise S2TError(f"{out} holds groups of unknown settings (no collect.json): use another --out")
    else:
        write_json(path, {"identity": cfg.identity(), "threshold_file": str(cfg.threshold_file)})


def groups_for(pair, prompt_ids: list[int], gen: list[int], threshold: float, k: int, warmup: int):
    ids = prompt_ids + gen
    vocab = Vocab.of(pair)  # banned ids masked as decoding masks them
    s_lp, h = step_logprobs(pair.slm, prompt_ids, gen, vocab, hidden=True)
    assert h is not None
    l_lp, _ = step_logprobs(pair.require_llm(), prompt_ids, gen, vocab)
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
    feats = step_features(s_lp)  # what the learned trigger reads at decode time
    return groups, {
        "stat": stat.cpu().numpy(),
        "label": fired.cpu().numpy(),
        "features": feats.cpu().numpy().astype(np.float32),
        "hidden": h.cpu().numpy().astype(np.float16),
    }


def run_collect(cfg: CollectConfig, progress: bool = True) -> Path:
    from ..backends import load_pair

    if not Path(cfg.threshold_file).is_file():
        raise S2TError(f"threshold file not found: {cfg.threshold_file} (make one with `s2t calibrate`)")
    threshold = load_threshold(cfg.threshold_file, "kl", cfg.slm, cfg.llm)
    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    refuse_test(ds, "training")
    out = Path(cfg.out)
    with run_lock(out):
        check_settings(cfg, out)
        (out / "features").mkdir(parents=True, exist_ok=True)
        path = out / "groups.jsonl"
        done = {r["item"] for r in read_jsonl(path)}
        items = [it for it in ds.take(cfg.limit) if it.id not in done]
        if not items:
            return out
        pair = load_pair(cfg.slm, cfg.llm, dtype=cfg.dtype, device=cfg.device, backend=cfg.backend)
        dcfg = DecodeConfig(
            policy="s2t",
            trigger="kl",
            threshold=threshold,
            k=cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            warmup=cfg.warmup,
        )
        total = len(ds.take(cfg.limit))
        with Progress("collect", total, total - len(items), progress) as bar, open_resume(path) as f:
            for start in range(0, len(items), cfg.batch_size):
                chunk = items[start : start + cfg.batch_size]
                prompt_ids = encode_prompts(pair.tokenizer, [math_prompt(it.question) for it in chunk], True)
                res = generate(pair, [""] * len(chunk), dcfg, prompt_ids=prompt_ids, batch_size=len(chunk))
                for it, p_ids, g in zip(chunk, prompt_ids, res.generations, strict=True):
                    groups, feats = groups_for(pair, p_ids, g.token_ids, threshold, cfg.k, cfg.warmup)
                    with atomic_path(out / "features" / f"{it.id}.npz") as tmp, open(tmp, "wb") as fz:
                        np.savez_compressed(fz, **feats)
                    append_line(f, {"item": it.id, "groups": groups})
                sync(f)
                bar.advance(len(chunk))
    return out
