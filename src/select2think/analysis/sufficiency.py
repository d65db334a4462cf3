"""`s2t analyze`: per-step SLM/LLM statistics along one model's greedy trajectory.

The trajectory model decodes greedily; both models are then teacher-forced over the trajectory in
one forward each per problem (not one per token). Per step we keep the SLM's top-64 (ids, probs),
the rank of the LLM's argmax in it (-1 = beyond 64), KL both ways on that support, entropy, margin.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import load_dataset
from ..data.prompts import math_prompt
from ..decoding import DecodeConfig, generate
from ..decoding.teacher import step_logprobs
from ..decoding.triggers import EntropyTrigger, KLTrigger, MarginTrigger
from ..decoding.vocab import Vocab
from ..errors import S2TError
from ..io import atomic_write, open_resume, read_jsonl, run_lock, write_json
from ..models.chat import encode_prompts
from ..progress import Progress

TOP = 64
KS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class AnalyzeConfig:
    slm: str
    llm: str
    dataset: str
    out: str
    limit: int | None = None
    trajectory: str = "slm"  # which model decodes; the other is teacher-forced
    max_new_tokens: int = 512
    warmup: int = 3
    batch_size: int = 8
    dtype: str = "bf16"
    device: str = "auto"
    backend: str = "hf"

    def __post_init__(self):
        if self.trajectory not in ("slm", "llm"):
            raise S2TError(f"--trajectory must be slm or llm, got {self.trajectory!r}")


def step_records(s_lp: torch.Tensor, l_lp: torch.Tensor) -> dict:
    """Per-step statistics for log-probs [T, V] of the SLM and LLM at the same positions."""
    top_lp, top_ids = s_lp.topk(TOP, dim=-1)
    llm_arg = l_lp.argmax(-1)
    match = top_ids == llm_arg[:, None]
    rank = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(llm_arg, -1))
    return {
        "top_ids": top_ids.tolist(),
        "top_probs": [[round(p, 6) for p in row] for row in top_lp.exp().tolist()],
        "slm_argmax": top_ids[:, 0].tolist(),
        "llm_argmax": llm_arg.tolist(),
        "llm_rank": rank.tolist(),
        "kl_sl": KLTrigger().statistic(s_lp, l_lp).tolist(),
        "kl_ls": KLTrigger(reverse=True).statistic(s_lp, l_lp).tolist(),
        "entropy": EntropyTrigger().statistic(s_lp).tolist(),
        "margin": (1 - MarginTrigger().statistic(s_lp)).tolist(),
    }


def analyze_problems(pair, prompt_ids: list[list[int]], trajectory: str, max_new_tokens: int) -> list[dict]:
    """Greedy trajectories for a batch of prompts, then one teacher-forced forward per model and problem."""
    cfg = DecodeConfig(policy="greedy" if trajectory == "slm" else "llm", max_new_tokens=max_new_tokens)
    gens = generate(pair, [""] * len(prompt_ids), cfg, prompt_ids=prompt_ids, batch_size=len(prompt_ids))
    out = []
    for ids, g in zip(prompt_ids, gens.generations, strict=True):
        s_lp, _ = step_logprobs(pair.slm, ids, g.token_ids, Vocab.of(pair))
        l_lp, _ = step_logprobs(pair.require_llm(), ids, g.token_ids, Vocab.of(pair))
        out.append({**step_records(s_lp, l_lp), "tokens": g.token_ids})
    return out


def run_analysis(cfg: AnalyzeConfig, progress: bool = True) -> dict:
    with run_lock(cfg.out):
        return _run_analysis(cfg, progress)


def _run_analysis(cfg: AnalyzeConfig, progress: bool = True) -> dict:
    from ..backends import load_pair

    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    items = ds.take(cfg.limit)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_path = out / "steps.jsonl"
    done = {r["item"] for r in read_jsonl(steps_path)}
    todo = [it for it in items if it.id not in done]
    if todo:
        pair = load_pair(cfg.slm, cfg.llm, dtype=cfg.dtype, device=cfg.device, backend=cfg.backend)
        prompts = encode_prompts(pair.tokenizer, [math_prompt(it.question) for it in todo], True)
        bar = Progress("analyze", len(items), len(items) - len(todo), progress)
        with bar, open_resume(steps_path) as f:
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                recs = analyze_problems(
                    pair, prompts[start : start + cfg.batch_size], cfg.trajectory, cfg.max_new_tokens
                )
                for it, rec in zip(chunk, recs, strict=True):
                    f.write(json.dumps({"item": it.id, **rec}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.advance(len(chunk))
    return summarise(out, cfg)


def summarise(out: Path, cfg: AnalyzeConfig) -> dict:
    rows = read_jsonl(out / "steps.jsonl")
    if not rows:
        raise S2TError(f"no analysed steps in {out}")
    cols = {
        k: np.concatenate([np.asarray(r[k][cfg.warmup :], dtype=float) for r in rows])
        for k in ("kl_sl", "llm_rank", "slm_argmax", "llm_argmax")
    }
    rank = cols["llm_rank"]
    kl = cols["kl_sl"]
    definitions = {
        "kl_top1%": kl > np.quantile(kl, 0.99),
        "kl_top10%": kl > np.quantile(kl, 0.90),
        "argmax_mismatch": cols["slm_argmax"] != cols["llm_argmax"],
        "all_steps": np.ones_like(kl, dtype=bool),
    }
    summary: dict[str, Any] = {
        "slm": cfg.slm,
        "llm": cfg.llm,
        "dataset": cfg.dataset,
        "trajectory": cfg.trajectory,
        "problems": len(rows),
        "steps": int(kl.size),
        "warmup_excluded": cfg.warmup,
        "note": "KL quantiles are taken over the analysed steps themselves (descriptive, not a tuned threshold)",
        "definitions": {},
    }
    for name, mask in definitions.items():
        r = rank[mask]
        hits = {k: float(np.mean((r >= 0) & (r < k))) if r.size else None for k in range(1, TOP + 1)}
        summary["definitions"][name] = {
            "divergence_rate": float(mask.mean()),
            "steps": int(mask.sum()),
            "hit_at_k": {k: hits[k] for k in KS},
            "hit_curve": hits,
        }
    write_json(out / "summary.json", summary)
    names = list(definitions)
    csv = ["k," + ",".join(names)]
    for k in range(1, TOP + 1):
        csv.append(f"{k}," + ",".join(f"{summary['definitions'][n]['hit_curve'][k]:.4f}" for n in names))
    atomic_write(out / "hit_at_k.csv", "\n".join(csv) + "\n")
    _plots(out, summary, rank, kl)
    return summary


def markdown(summary: dict) -> str:
    lines = [
        f"{summary['dataset']}: {summary['problems']} problems, {summary['steps']} steps "
        f"({summary['trajectory']} trajectory), SLM {summary['slm']}, LLM {summary['llm']}",
        "",
        "| divergence | rate | steps | " + " | ".join(f"Hit@{k}" for k in KS) + " |",
        "|---|---|---|" + "---|" * len(KS),
    ]
    for name, d in summary["definitions"].items():
        lines.append(
            f"| {name} | {d['divergence_rate']:.2%} | {d['steps']} | "
            + " | ".join("-" if d["hit_at_k"][k] is None else f"{d['hit_at_k'][k]:.1%}" for k in KS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _plots(out: Path, summary: dict, rank: np.ndarray, kl: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in summary["definitions"].items():
        ks = list(range(1, TOP + 1))
        ax.plot(ks, [d["hit_curve"][k] or 0 for k in ks], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Hit@K (LLM argmax in SLM top-K)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hit_at_k.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.where(rank < 0, TOP, rank), bins=(np.arange(TOP + 2) - 0.5).tolist())
    ax.set_yscale("log")
    ax.set_xlabel("rank of the LLM's token in the SLM's top-64 (64 = miss)")
    ax.set_ylabel("steps")
    fig.tight_layout()
    fig.savefig(out / "rank_histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(kl, np.where(rank < 0, TOP, rank), s=3, alpha=0.3)
    ax.set_xlabel("KL(p_S || p_L) on the SLM top-64")
    ax.set_ylabel("rank of the LLM's token (64 = miss)")
    fig.tight_layout()
    fig.savefig(out / "kl_vs_rank.png", dpi=120)
    plt.close(fig)
