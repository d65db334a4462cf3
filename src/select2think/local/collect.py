"""`s2t collect`: the LLM's selections as training groups for S2T-Local, in one pass per problem.

A trajectory is decoded with a step recorder (decoding.record) that keeps, at every committed step, the
SLM's top-K and top-64 log-probs, the LLM's log-probs on the top-K, the kl statistic, the learned
trigger's features and the SLM's final hidden state: nothing is teacher-forced a second time.

- `--trajectory s2t` (the paper's): S2T decodes (kl trigger under the calibrated threshold, K candidates);
  draft and verify has both models' log-probs at every committed step, and those are recorded.
- `--trajectory slm`: the SLM decodes greedily (no LLM while decoding); then ONE teacher-forced LLM
  forward per problem gives the LLM's log-probs at every step (decoding.teacher.step_logprobs), from which
  the kl statistic is computed on the recorded SLM top-64 (KLTrigger.on_support). Cheaper, and the
  trajectory is the one S2T-Local's SLM itself will be in.

Either way a group is every step where the kl statistic exceeds the calibrated threshold (after the
warm-up): (context, the SLM's top-K, the LLM's probabilities on them, the SLM's). Every step gives
learned-trigger features (entropy, margin, top-8 probabilities, the SLM's final hidden state at the
prefix) in `features/ITEM.npz`, with the kl firings and the LLM's log-probs on the top-K (`llm_top`), the
two labels a learned trigger can be trained on (`s2t train-trigger --label kl|flip`), and the trajectory with
every step's SLM top-K (`ids`, `prompt_len`, `top_i`, `top_logp`), from which `step_groups` builds a group at
any step (`s2t regroup`: the groups where an SLM-only trigger fires).

Candidates' hidden states (head-only training): the decode has the SLM's hidden state at each step's
prefix (the learned trigger's input), not the hidden states of the K candidate tokens placed after it,
and draft and verify's SLM cache has moved past a step by the time the LLM says it fired. So with
`--candidate-hidden` a second cache on the decoding SLM's weights passes over each finished trajectory
once, scoring every group's K candidates as siblings after their prefix, and writes their hidden states
(fp16) into `features/ITEM.npz` for the groups whose context is their whole prefix: the selector then
trains on the hidden states of the engine that will decode with it (llama.cpp's or transformers').
`local/head_only.py` reads those and runs its own forward (transformers) only for the rest.

Shards (`--shard i/n`) take items i, i+n, ... of the dataset and append to their own
`groups.shardIofN.jsonl` (one shard: `groups.jsonl`); `objective.load_groups` merges them. Features are one
file per item, so shards share `features/`. Rerunning a command resumes its shard; `collect.json` refuses
a rerun into the same directory under other settings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends.base import Backend
from ..data.datasets import load_dataset, refuse_test
from ..data.prompts import math_prompt
from ..decoding import DecodeConfig, generate
from ..decoding.calibrate import load_threshold
from ..decoding.record import Steps
from ..decoding.state import Generation
from ..decoding.teacher import step_logprobs
from ..decoding.triggers import TOP_SUPPORT, KLTrigger, step_features
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
from .head_only import recorded_prior
from .objective import CONTEXT, group_files

GROUP_K = 16
TRAJECTORIES = ("s2t", "slm")


def parse_shard(spec: str) -> tuple[int, int]:
    """`i/n` -> (i, n), 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise S2TError(f"--shard is written i/n with 0 <= i < n, got {spec!r}")
    return int(m[1]), int(m[2])


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
    trajectory: str = "s2t"
    shard: tuple[int, int] = field(default=(0, 1))
    candidate_hidden: bool = False  # also the candidates' hidden states for head-only training

    def __post_init__(self):
        if self.limit < 1:
            raise S2TError(f"--limit must be >= 1, got {self.limit}")
        if not 2 <= self.k <= 64:
            raise S2TError(f"k must be between 2 and 64, got {self.k}")
        if self.batch_size < 1:
            raise S2TError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.trajectory not in TRAJECTORIES:
            raise S2TError(f"--trajectory must be s2t or slm, got {self.trajectory!r}")
        if isinstance(self.shard, str):
            self.shard = parse_shard(self.shard)
        i, n = self.shard
        if not 0 <= i < n:
            raise S2TError(f"--shard is written i/n with 0 <= i < n, got {i}/{n}")

    def identity(self) -> dict:
        """What a rerun into the same directory must share (the limit may grow; shards differ only in which
        items they take); the threshold file by its content, not its name."""
        skip = ("out", "limit", "batch_size", "device", "shard")
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["threshold_file"] = sha256_of(self.threshold_file)
        if Path(self.dataset).is_file():
            d["dataset"] = sha256_of(self.dataset)  # a local file by its content
        return d

    @property
    def groups_name(self) -> str:
        i, n = self.shard
        return "groups.jsonl" if n == 1 else f"groups.shard{i}of{n}.jsonl"


def _shard_count(path: Path) -> int:
    m = re.fullmatch(r"groups\.shard\d+of(\d+)\.jsonl", path.name)
    return int(m[1]) if m else 1


def check_settings(cfg: CollectConfig, out: Path) -> None:
    """Record the settings on the first run; refuse a rerun under others, naming them, and shards of another
    count (their items would overlap)."""
    path = out / "collect.json"
    existing = group_files(out)
    if path.is_file():
        old = read_json(path, "collect settings")
        old_id = dict(old.get("identity", {})) if isinstance(old, dict) else {}
        old_id.setdefault("trajectory", "s2t")  # directories from before these options: s2t, no candidates
        old_id.setdefault("candidate_hidden", False)
        diff = differences(old_id, cfg.identity())
        if diff:
            raise S2TError(f"{out} holds groups collected with other settings ({diff}): use another --out")
    elif existing:
        raise S2TError(f"{out} holds groups of unknown settings (no collect.json): use another --out")
    else:
        write_json(path, {"identity": cfg.identity(), "threshold_file": str(cfg.threshold_file)})
    counts = {_shard_count(p) for p in existing} - {cfg.shard[1]}
    if counts:
        raise S2TError(
            f"{out} holds groups collected in {min(counts)} shard(s): --shard .../{cfg.shard[1]} would repeat "
            "items; use the same shard count or another --out"
        )


class GroupRecorder:
    """A step recorder that keeps, per row, only what groups and trigger features need from each step:
    the SLM's top-K ids and log-probs, its top-64 log-probs and ids (the kl statistic's support), the LLM's
    log-probs on the top-K (when it ran), the trigger statistic, the 10 trigger features and the SLM's
    final hidden state (fp16). A few kilobytes per step, never a [V] row."""

    wants_hidden = True

    def __init__(self, n_rows: int, k: int):
        self.k = k
        self.rows: list[dict[str, list] | None] = [
            {n: [] for n in ("step", "top_i", "top_p", "sup_i", "sup_p", "llm", "stat", "feat", "hidden")}
            for _ in range(n_rows)
        ]

    @torch.no_grad()
    def record(self, s: Steps) -> None:
        top_p, top_i = s.slm_logp.topk(self.k, dim=-1)
        sup_p, sup_i = s.slm_logp.topk(min(TOP_SUPPORT, s.slm_logp.shape[-1]), dim=-1)
        llm = s.llm_logp.gather(-1, top_i).cpu() if s.llm_logp is not None else None
        parts = {
            "top_i": top_i.cpu(),
            "top_p": top_p.float().cpu(),
            "sup_i": sup_i.cpu(),
            "sup_p": sup_p.float().cpu(),
            "stat": s.stat.float().cpu(),
            "feat": step_features(s.slm_logp).float().cpu(),
            "hidden": s.hidden.to(torch.float16).cpu() if s.hidden is not None else None,
        }
        for j, r in enumerate(s.rows):
            row = self.rows[r]
            assert row is not None, f"row {r} recorded after it finished"
            row["step"].append(s.steps[j])
            for name, value in parts.items():
                row[name].append(value[j] if value is not None else None)
            row["llm"].append(llm[j] if llm is not None else None)

    def finish(
        self,
        row: int,
        prompt_ids: list[int],
        gen: list[int],
        threshold: float,
        warmup: int,
        llm_logp: torch.Tensor | None = None,
    ) -> tuple[list[dict], dict]:
        """(groups, features) of one row. `llm_logp` [T, V]: the LLM's teacher-forced log-probs (the slm
        trajectory); without it the LLM's log-probs recorded during the decode are used (s2t)."""
        rec, self.rows[row] = self.rows[row], None  # a finished row's steps are not needed again
        if rec is None:
            raise RuntimeError(f"row {row} was finished already")
        if rec["step"] != list(range(len(gen))):
            raise RuntimeError(f"row {row}: recorded steps {rec['step'][:8]}... do not cover the {len(gen)} generated")
        top_i, top_p = torch.stack(rec["top_i"]), torch.stack(rec["top_p"])
        if llm_logp is None:
            if any(x is None for x in rec["llm"]):
                raise RuntimeError("the decode did not run the LLM at every step: use the slm trajectory")
            llm, stat = torch.stack(rec["llm"]), torch.stack(rec["stat"])
        else:
            llm_logp = llm_logp.float().cpu()
            llm = llm_logp.gather(-1, top_i)
            stat = KLTrigger().on_support(torch.stack(rec["sup_p"]), llm_logp.gather(-1, torch.stack(rec["sup_i"])))
        fired = (stat > threshold) & (torch.arange(len(gen)) >= warmup)
        ids = prompt_ids + gen
        feats = {
            "stat": stat.numpy(),
            "label": fired.numpy(),
            "features": torch.stack(rec["feat"]).numpy().astype(np.float32),
            "llm_top": llm.float().numpy(),  # the LLM's log-probs on the SLM's top-K at every step (flip labels)
            # enough to build a group at ANY step later (`step_groups`), e.g. where an SLM-only trigger fires
            "ids": np.asarray(ids, np.int32),
            "prompt_len": np.int32(len(prompt_ids)),
            "top_i": top_i.numpy().astype(np.int32),
            "top_logp": top_p.float().numpy(),
        }
        groups = step_groups(feats, fired.nonzero().flatten().tolist())
        if rec["hidden"] and rec["hidden"][0] is not None:
            feats["hidden"] = torch.stack(rec["hidden"]).numpy().astype(np.float16)
        return groups, feats


def step_groups(feats: dict, steps: list[int]) -> list[dict]:
    """A problem's training groups at `steps` from its features (`features/ITEM.npz` or `finish`'s dict):
    the context before the step, the SLM's top-K, the LLM's probabilities on them and the SLM's."""
    ids, n = [int(t) for t in feats["ids"]], int(feats["prompt_len"])
    return [
        {
            "step": int(t),
            "context": ids[: n + t][-CONTEXT:],
            "candidates": [int(c) for c in feats["top_i"][t]],
            "llm_probs": np.exp(feats["llm_top"][t].astype(np.float64)).tolist(),
            "slm_probs": np.exp(feats["top_logp"][t].astype(np.float64)).tolist(),
        }
        for t in steps
    ]


def decode_config(cfg: CollectConfig, threshold: float) -> DecodeConfig:
    if cfg.trajectory == "slm":
        return DecodeConfig(policy="greedy", max_new_tokens=cfg.max_new_tokens)
    return DecodeConfig(
        policy="s2t", trigger="kl", threshold=threshold, k=cfg.k, max_new_tokens=cfg.max_new_tokens, warmup=cfg.warmup
    )


Collected = tuple[list[int], list[dict], dict]  # a problem's generated ids, groups and features


def collect_batch(
    pair, prompt_ids: list[list[int]], cfg: CollectConfig, threshold: float, dcfg: DecodeConfig | None = None
) -> list[Collected]:
    """Decode a batch of prompts (token ids) and return per prompt (generated ids, groups, features)."""
    out: dict[int, Collected] = {}
    collect_rows(pair, prompt_ids, cfg, threshold, out.__setitem__, len(prompt_ids), dcfg)
    return [out[r] for r in range(len(prompt_ids))]


def collect_rows(
    pair,
    prompt_ids: list[list[int]],
    cfg: CollectConfig,
    threshold: float,
    on_problem: Callable[[int, Collected], None],
    batch_size: int,
    dcfg: DecodeConfig | None = None,
) -> None:
    """Decode prompts `batch_size` rows at a time, a finished row's slot taking the next prompt, and hand
    each problem's (generated ids, groups, features) to `on_problem` as soon as its row ends. The slm
    trajectory's teacher-forced LLM pass runs then too: the greedy decode never touches the LLM."""
    dcfg = dcfg or decode_config(cfg, threshold)
    rec = GroupRecorder(len(prompt_ids), cfg.k)
    rec.wants_hidden = pair.slm.capabilities.hidden_states
    vocab = Vocab.of(pair)

    if cfg.candidate_hidden:
        pair.slm.require("hidden_states", "--candidate-hidden")
        pair.slm.require("sibling_scoring", "--candidate-hidden")
        features_slm = pair.slm.spawn()  # the decode's cache stays untouched

    def finished(r: int, g: Generation) -> None:
        p_ids, l_lp = prompt_ids[r], None
        if cfg.trajectory == "slm":
            l_lp, _ = step_logprobs(pair.require_llm(), p_ids, g.token_ids, vocab)
        groups, feats = rec.finish(r, p_ids, g.token_ids, threshold, cfg.warmup, l_lp)
        if cfg.candidate_hidden:
            feats.update(candidate_features(features_slm, p_ids + g.token_ids, len(p_ids), groups))
        on_problem(r, (g.token_ids, groups, feats))

    generate(
        pair,
        [""] * len(prompt_ids),
        dcfg,
        prompt_ids=prompt_ids,
        batch_size=batch_size,
        recorder=rec,
        on_finish=finished,
    )


def candidate_features(slm: Backend, ids: list[int], prompt_len: int, groups: list[dict]) -> dict:
    """Head-only training's inputs for the groups whose context is the whole prefix (not cut to CONTEXT
    tokens; the others are left to head_only's own pass): their steps, candidates, the candidates' final
    hidden states (fp16) from the engine that decodes, and their SLM log-probs as the decode recorded them
    (head_only.recorded_prior). `slm` is a spawn of the decoding SLM (its own cache): one pass over
    the trajectory, and at each group one sibling forward of its K candidates."""
    whole = [g for g in groups if prompt_len + g["step"] <= CONTEXT]
    hidden = sibling_hidden(slm, ids, [prompt_len + g["step"] for g in whole], [g["candidates"] for g in whole])
    K = len(whole[0]["candidates"]) if whole else 0
    return {
        "cand_steps": np.array([g["step"] for g in whole], np.int64).reshape(len(whole)),
        "cand_ids": np.array([g["candidates"] for g in whole], np.int64).reshape(len(whole), K),
        "cand_hidden": hidden.numpy().astype(np.float16).reshape(len(whole), K, slm.hidden_size),
        "cand_logp": recorded_prior(whole).numpy().reshape(len(whole), K),
    }


@torch.no_grad()
def sibling_hidden(slm: Backend, ids: list[int], ends: list[int], cands: list[list[int]]) -> torch.Tensor:
    """[G, K, H] fp32: the final hidden state of each candidate cands[g] placed right after ids[: ends[g]]
    (ends ascending), in one pass over `ids` on `slm`'s cache (which it resets)."""
    out = torch.zeros(len(ends), len(cands[0]) if cands else 0, slm.hidden_size)
    slm.reset(1)
    done = 0
    try:
        for g, (end, cand) in enumerate(zip(ends, cands, strict=True)):
            if end > done:
                slm.want_hidden = False
                chunk = torch.tensor([ids[done:end]])
                slm.extend(chunk, torch.ones_like(chunk, dtype=torch.bool), logits=False)
                done = end
            slm.want_hidden = True
            slm.score_siblings([0], torch.tensor([cand]), logits=False)
            out[g] = slm.hidden()[0]
    finally:
        slm.want_hidden = False
    return out


def run_collect(cfg: CollectConfig, progress: bool = True) -> Path:
    from ..backends import load_pair

    if not Path(cfg.threshold_file).is_file():
        raise S2TError(f"threshold file not found: {cfg.threshold_file} (make one with `s2t calibrate`)")
    threshold = load_threshold(cfg.threshold_file, "kl", cfg.slm, cfg.llm)
    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    refuse_test(ds, "training")
    out = Path(cfg.out)
    i, n = cfg.shard
    with run_lock(out, name=f".s2t.collect.shard{i}of{n}.lock"):
        check_settings(cfg, out)
        (out / "features").mkdir(parents=True, exist_ok=True)
        path = out / cfg.groups_name
        done = {r["item"] for r in read_jsonl(path)}
        mine = ds.take(cfg.limit)[i::n]
        items = [it for it in mine if it.id not in done]
        if not items:
            return out
        pair = load_pair(cfg.slm, cfg.llm, dtype=cfg.dtype, device=cfg.device, backend=cfg.backend)
        if cfg.trajectory == "s2t":
            pair.require_llm().require("full_logits", "the kl trigger")
        dcfg = decode_config(cfg, threshold)
        desc = "collect" if n == 1 else f"collect shard {i}/{n}"
        with Progress(desc, len(mine), len(mine) - len(items), progress) as bar, open_resume(path) as f:

            def write(r: int, got: Collected) -> None:
                _, groups, feats = got
                with atomic_path(out / "features" / f"{items[r].id}.npz") as tmp, open(tmp, "wb") as fz:
                    np.savez_compressed(fz, **feats)
                append_line(f, {"item": items[r].id, "groups": groups})
                sync(f)
                bar.advance(1)

            prompt_ids = encode_prompts(pair.tokenizer, [math_prompt(it.question) for it in items], True)
            collect_rows(pair, prompt_ids, cfg, threshold, write, cfg.batch_size, dcfg)
    return out
