"""`s2t eval`: (item, policy) pairs decoded and graded, one flushed JSON line each.

Rerunning the same command resumes: finished lines are skipped and a line cut by a kill is dropped.
`--shard i/n` takes items i, i+n, i+2n, ...; each shard writes its own file and `s2t report` merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..decoding import DecodeConfig, generate
from ..decoding.calibrate import load_threshold
from ..decoding.config import LOCAL_MODES
from ..errors import S2TError
from .datasets import load_dataset
from .grading import extract_answer, is_correct
from .prompts import math_prompt
from .vote import majority, pass_at_k

BASE_POLICIES = ("greedy", "sample", "llm", "takeover", "s2t", "s2t-local")


@dataclass(frozen=True)
class PolicySpec:
    label: str
    policy: str  # a decoding policy
    samples: int = 1  # > 1: maj@k over sampled trajectories (pass@k recorded beside it)
    threshold_file: str | None = None
    adapter: str | None = None  # s2t-local's selector directory
    trigger: str | None = None  # the trigger the threshold file was calibrated for
    local_mode: str = "coupled"  # s2t-local: coupled | decoupled


def parse_policy(text: str) -> PolicySpec:
    """`greedy`, `llm`, `sample`, `maj@8`, `pass@8`, `s2t=kl99.json`, `takeover=kl99.json`,
    `s2t-local=SELECTOR_DIR[,entropy.json][,decoupled]` (a selector, an SLM-only trigger's thresholds,
    by default the learned trigger a bundle ships, and the mode: coupled by default)."""
    name, _, file = text.partition("=")
    if name.startswith(("maj@", "pass@")):
        try:
            k = int(name.split("@", 1)[1])
        except ValueError:
            raise S2TError(f"bad policy {text!r}: write maj@K with an integer K") from None
        if k < 1:
            raise S2TError(f"bad policy {text!r}: K must be >= 1")
        return PolicySpec(f"maj@{k}", "sample", k)
    if name not in BASE_POLICIES:
        raise S2TError(f"unknown policy {name!r}: use one of {', '.join(BASE_POLICIES)}, maj@K, pass@K")
    if name == "s2t-local":
        from ..local.bundle import bundled_trigger

        adapter, *rest = file.split(",")
        modes = [r for r in rest if r in LOCAL_MODES]
        files = [r for r in rest if r not in LOCAL_MODES]
        if not adapter or len(modes) > 1 or len(files) > 1 or len(rest) > 2:
            raise S2TError("policy s2t-local is written s2t-local=SELECTOR_DIR[,THRESHOLDS.json][,coupled|decoupled]")
        mode = modes[0] if modes else "coupled"
        thr = files[0] if files else bundled_trigger(adapter)
        if thr is None:
            raise S2TError(f"{adapter} ships no trigger: write s2t-local={adapter},THRESHOLDS.json")
        trigger = json.loads(Path(thr).read_text()).get("trigger") if Path(thr).is_file() else None
        if trigger is None:
            raise S2TError(f"threshold file not found or not from `s2t calibrate`: {thr}")
        suffix = ",decoupled" if mode == "decoupled" else ""
        trig = "learned" if not files else Path(thr).stem
        label = f"s2t-local[{Path(adapter).name},{trig}{suffix}]"  # the selector, its trigger, its mode
        return PolicySpec(label, name, 1, str(thr), adapter, trigger, mode)
    if name in ("s2t", "takeover"):
        if not file:
            raise S2TError(f"policy {name} needs a threshold file: --policy {name}=FILE (from `s2t calibrate`)")
        return PolicySpec(f"{name}[{Path(file).stem}]", name, 1, file, None, "kl")
    return PolicySpec(name, name)


@dataclass
class EvalConfig:
    slm: str
    llm: str | None
    dataset: str
    out: str
    policies: list[str] = field(default_factory=lambda: ["greedy"])
    limit: int | None = None
    offset: int = 0
    shard: str = "0/1"
    seed: int = 0
    max_new_tokens: int = 512
    k: int = 8
    temperature: float = 0.7
    top_p: float = 0.95
    dtype: str = "bf16"
    device: str = "auto"
    batch_size: int = 8  # rows decoded together (maj@k puts k rows per item)

    def shard_index(self) -> tuple[int, int]:
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise S2TError(f"--shard must look like i/n, got {self.shard!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise S2TError(f"--shard i/n needs 0 <= i < n, got {self.shard!r}")
        return i, n

    def identity(self) -> dict:
        """What must match for a rerun to resume into the same directory (the shard may differ)."""
        d = asdict(self)
        d.pop("shard")
        d.pop("device")
        d.pop("batch_size")
        d.pop("policies")
        return d


def item_seed(run_seed: int, item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{item_id}".encode()).digest()[:4], "little")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("select2think", "torch", "transformers", "math-verify"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def read_lines(path: Path) -> list[dict]:
    """Finished lines; a trailing partial line (killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def _fingerprint(spec) -> dict:
    """sha256 of the files a policy reads besides the models (thresholds, a selector's weights), so that a
    run records which selector or calibration produced it, not just their names."""
    from ..models.cache import sha256_of

    paths = [Path(spec.threshold_file)] if spec.threshold_file else []
    if spec.adapter:
        paths += sorted(p for p in Path(spec.adapter).iterdir() if p.is_file())
    return {str(p): sha256_of(p) for p in dict.fromkeys(paths)}  # a bundle's own trigger is listed once


def _write_config(cfg: EvalConfig, out: Path, pair, specs) -> None:
    """The run's identity, models and versions. A resumed run keeps what earlier invocations recorded
    (an invocation without the LLM must not drop its size, which the report's compute column needs)
    and appends itself to `invocations` with its batch size."""
    path = out / "config.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old and old.get("identity") != cfg.identity():
        raise S2TError(f"{out} holds a run with a different configuration; use another --out")
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    labels = [s.label for s in specs]
    meta = {
        "identity": cfg.identity(),
        "policies": sorted(set(old.get("policies", [])) | set(labels)),
        "versions": _versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "started": old.get("started", now),
        "models": dict(old.get("models", {})),
        "invocations": [
            *old.get("invocations", []),
            {
                "at": now,
                "policies": labels,
                "batch_size": cfg.batch_size,
                "inputs": {s.label: _fingerprint(s) for s in specs if s.threshold_file or s.adapter},
            },
        ],
    }
    for role, model in (("slm", pair.slm), ("llm", pair.llm)):
        if model is None:
            continue
        src = pair.sources.get(role)
        meta["models"][role] = {
            "name": getattr(src, "name", ""),
            "sha256": getattr(src, "sha256", None),
            "params": sum(p.numel() for p in model.parameters()),
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


COST_KEYS = (
    "generated_tokens",
    "slm_forwards",
    "llm_forwards",
    "slm_tokens",
    "llm_tokens",
    "triggers",
    "flips",
    "hits",
    "hit_checked",
)


def run_policy_on_items(
    pair, spec: PolicySpec, cfg: EvalConfig, items, threshold: float | None, trigger=None
) -> list[dict]:
    """Decode a batch of items (spec.samples rows each) and grade them; one result dict per item."""
    dcfg = DecodeConfig(
        policy=spec.policy,
        k=cfg.k,
        trigger=spec.trigger,
        threshold=threshold,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        local_mode=spec.local_mode,
    )
    prompts = [math_prompt(it.question) for it in items for _ in range(spec.samples)]
    seeds = [(item_seed(cfg.seed, it.id), j) for it in items for j in range(spec.samples)]
    res = generate(pair, prompts, dcfg, batch_size=len(prompts), row_seeds=seeds, trigger=trigger)
    out = []
    for n, it in enumerate(items):
        gens = res.generations[n * spec.samples : (n + 1) * spec.samples]
        answers = [extract_answer(g.text) for g in gens]
        if spec.samples > 1:
            pred = majority(answers)
            extra = {"answers": answers, "pass_at_k": pass_at_k(answers, it.answer)}
        else:
            pred, extra = answers[0], {"text": gens[0].text}
        stats = {
            k: sum(getattr(g, k) if k != "generated_tokens" else len(g.token_ids) for g in gens) for k in COST_KEYS
        }
        stats["wall_time_s"] = res.stats.wall_time_s * spec.samples / len(prompts)
        out.append(
            {
                "item": it.id,
                "policy": spec.label,
                "gold": it.answer,
                "prediction": pred,
                "correct": is_correct(pred, it.answer),
                "finish": [g.finish_reason for g in gens],
                "stats": stats,
                **extra,
            }
        )
    return out


def run_eval(cfg: EvalConfig, progress: bool = True) -> Path:
    from ..models.pair import load_pair

    specs = [parse_policy(p) for p in cfg.policies]
    if len({s.label for s in specs}) != len(specs):
        raise S2TError("the same policy is listed twice")
    shard_i, shard_n = cfg.shard_index()
    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    items = ds.take(cfg.limit, cfg.offset)
    items = [it for idx, it in enumerate(items) if idx % shard_n == shard_i]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"results.shard{shard_i}of{shard_n}.jsonl"
    done = {(r["item"], r["policy"]) for r in read_lines(results)}
    todo = [(it, s) for it in items for s in specs if (it.id, s.label) not in done]
    needs_llm = any(s.policy in ("llm", "takeover", "s2t") for s in specs)
    if needs_llm and not cfg.llm:
        raise S2TError("these policies need --llm")
    pair = load_pair(cfg.slm, cfg.llm if needs_llm else None, dtype=cfg.dtype, device=cfg.device)
    _write_config(cfg, out, pair, specs)
    thresholds = {
        s.label: load_threshold(s.threshold_file, s.trigger, cfg.slm, cfg.llm)
        for s in specs
        if s.threshold_file and s.trigger
    }
    pairs = {s.label: pair for s in specs}
    heads = {}
    for s in specs:
        if s.trigger == "learned" and s.threshold_file:
            from ..local.trigger_head import load_learned_trigger

            heads[s.label] = load_learned_trigger(s.threshold_file)
    for s in specs:
        if s.adapter:  # the selector is merged into its own copy of the SLM; other policies keep the base model
            from ..local.train import apply_selector

            pairs[s.label] = apply_selector(
                load_pair(cfg.slm, None, dtype=cfg.dtype, device=cfg.device), s.adapter, mode=s.local_mode
            )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress
    ) as bar:
        task = bar.add_task(
            f"eval {cfg.dataset}", total=len(items) * len(specs), completed=len(items) * len(specs) - len(todo)
        )
        with open(results, "a") as f:
            for spec in specs:
                pending = [it for it, s in todo if s is spec]
                per_batch = max(1, cfg.batch_size // spec.samples)
                for start in range(0, len(pending), per_batch):
                    chunk = pending[start : start + per_batch]
                    for row in run_policy_on_items(
                        pairs[spec.label], spec, cfg, chunk, thresholds.get(spec.label), heads.get(spec.label)
                    ):
                        f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    bar.advance(task, len(chunk))
    return out
