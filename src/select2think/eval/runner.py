"""`s2t eval`: (item, policy) pairs decoded and graded, one flushed JSON line each.

Rerunning the same command resumes: finished lines are skipped and a line cut by a kill is dropped.
Results are keyed by the content (sha256) of the files a policy reads, so a recalibrated threshold file
of the same name is never mistaken for the one that made earlier results. A lock on `--out` refuses a
second writer.
`--shard i/n` takes items i, i+n, i+2n, ...; each shard writes its own file and `s2t report` merges.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.datasets import load_dataset
from ..data.prompts import math_prompt
from ..decoding import DecodeConfig, generate
from ..decoding.calibrate import load_threshold
from ..decoding.config import LOCAL_MODES, POLICIES
from ..errors import S2TError
from ..io import append_line, differences, open_resume, read_json, read_jsonl, run_lock, sha256_of, sync, write_json
from ..progress import Progress
from .grading import extract_answer, is_correct
from .vote import majority, pass_at_k

BASE_POLICIES = tuple(POLICIES)


@dataclass(frozen=True)
class PolicySpec:
    label: str
    policy: str  # a decoding policy
    samples: int = 1  # > 1: maj@k over sampled trajectories (pass@k recorded beside it)
    threshold_file: str | None = None
    adapter: str | None = None  # s2t-local's selector directory
    trigger: str | None = None  # the trigger the threshold file was calibrated for
    local_mode: str = "coupled"  # s2t-local: coupled | decoupled


def _threshold_trigger(path) -> str | None:
    """The trigger a threshold file was calibrated for (None if it is missing or not one)."""
    data = read_json(path, "threshold file") if Path(path).is_file() else None
    return data.get("trigger") if isinstance(data, dict) else None


def parse_policy(text: str) -> PolicySpec:
    """`greedy`, `llm`, `sample`, `maj@8`, `pass@8`, `s2t=kl99.json`, `takeover=kl99.json` (with the trigger
    the file was calibrated for), `s2t-local=SELECTOR_DIR[,entropy.json][,decoupled]` (a selector, an
    SLM-only trigger's thresholds, by default the learned trigger a bundle ships, and the mode: coupled by
    default)."""
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
        if thr is None and not Path(adapter).is_dir():
            raise S2TError(f"policy s2t-local: selector directory not found: {adapter}")
        if thr is None:
            raise S2TError(f"{adapter} ships no trigger: write s2t-local={adapter},THRESHOLDS.json")
        trigger = _threshold_trigger(thr)
        if trigger is None:
            raise S2TError(f"threshold file not found or not from `s2t calibrate`: {thr}")
        suffix = ",decoupled" if mode == "decoupled" else ""
        trig = "learned" if not files else Path(thr).stem
        label = f"s2t-local[{Path(adapter).name},{trig}{suffix}]"  # the selector, its trigger, its mode
        return PolicySpec(label, name, 1, str(thr), adapter, trigger, mode)
    if name in ("s2t", "takeover"):
        if not file:
            raise S2TError(f"policy {name} needs a threshold file: --policy {name}=FILE (from `s2t calibrate`)")
        trigger = _threshold_trigger(file) or "kl"  # the file's trigger (entropy, margin: a remote LLM's)
        return PolicySpec(f"{name}[{Path(file).stem}]", name, 1, file, None, trigger)
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
    backend: str = "hf"  # hf | llama.cpp: recorded with the run (results differ in rounding between engines)
    batch_size: int = 8  # rows decoded together (maj@k puts k rows per item)
    llm_url: str | None = None  # the LLM on a server (backends/remote.py); `llm` is then its served name

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise S2TError(f"--limit must be >= 1 (or left out for all items), got {self.limit}")
        if self.offset < 0:
            raise S2TError(f"--offset must be >= 0, got {self.offset}")
        if self.batch_size < 1:
            raise S2TError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise S2TError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

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
        if d.pop("llm_url"):  # shards may reach the same server by other addresses; its engine is what matters
            d["llm_engine"] = "remote"
        return d

    def remote(self):
        """The LLM's server, or None when the LLM runs in this process."""
        from ..backends.remote import RemoteConfig

        return RemoteConfig(url=self.llm_url, model=self.llm) if self.llm_url else None


def item_seed(run_seed: int, item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{item_id}".encode()).digest()[:4], "little")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("select2think", "torch", "transformers", "math-verify"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def check_inputs(spec: PolicySpec) -> None:
    """The policy's threshold file and selector exist (checked before any model loads)."""
    if spec.threshold_file and not Path(spec.threshold_file).is_file():
        raise S2TError(f"policy {spec.label}: threshold file not found: {spec.threshold_file}")
    if spec.adapter and not Path(spec.adapter).is_dir():
        raise S2TError(f"policy {spec.label}: selector directory not found: {spec.adapter}")


def _fingerprint(spec) -> dict:
    """sha256 of the files a policy reads besides the models (thresholds, a selector's weights), so that a
    run records which selector or calibration produced it, not just their names."""
    paths = [Path(spec.threshold_file)] if spec.threshold_file else []
    if spec.adapter:
        paths += sorted(p for p in Path(spec.adapter).iterdir() if p.is_file())
    return {str(p): sha256_of(p) for p in dict.fromkeys(paths)}  # a bundle's own trigger is listed once


def inputs_key(fingerprint: dict) -> str | None:
    """One hash of the inputs' contents (their names left out); None for a policy that reads no file."""
    if not fingerprint:
        return None
    return hashlib.sha256(json.dumps(sorted(fingerprint.values())).encode()).hexdigest()[:16]


def check_stale(rows: list[dict], keys: dict[str, str | None], specs, results: Path) -> None:
    """Refuse to resume a policy whose files changed content since its earlier results were written."""
    for s in specs:
        old = {r.get("inputs") for r in rows if r["policy"] == s.label}
        if old and old != {keys[s.label]}:
            files = ", ".join(filter(None, [s.threshold_file, s.adapter]))
            why = (
                "before input hashes were recorded"
                if None in old
                else f"from other contents of {files} (sha256 changed)"
            )
            raise S2TError(f"{results} holds results of {s.label} made {why}: use another --out")


def check_items(items, dataset: str) -> None:
    if not items:
        raise S2TError(f"dataset {dataset} gives no items for this --limit/--offset")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise S2TError(f"dataset {dataset}: item id {dup!r} appears more than once")
    for it in items:
        if it.answer is None or not str(it.answer).strip():
            raise S2TError(f"dataset {dataset}: item {it.id!r} has no answer to grade against")


def dataset_sha256(spec: str) -> str | None:
    """The content hash of a local dataset file (None for named datasets, which the package pins)."""
    return sha256_of(spec) if Path(spec).is_file() else None


def check_config(cfg: EvalConfig, out: Path) -> dict:
    """The run's recorded config ({} for a new run), after refusing other settings or an edited dataset."""
    path = out / "config.json"
    old = read_json(path, "run config") if path.is_file() else {}
    if old and old.get("identity") != cfg.identity():
        diff = differences(old.get("identity") or {}, cfg.identity())
        raise S2TError(f"{out} holds a run with other settings ({diff}); use another --out")
    if old.get("dataset_sha256") and old["dataset_sha256"] != dataset_sha256(cfg.dataset):
        raise S2TError(f"{cfg.dataset} changed content (sha256) since {out} was started; use another --out")
    return old


def _write_config(cfg: EvalConfig, out: Path, pair, specs) -> None:
    """The run's identity, models and versions. A resumed run keeps what earlier invocations recorded
    (an invocation without the LLM must not drop its size, which the report's compute column needs)
    and appends itself to `invocations` with its batch size."""
    path = out / "config.json"
    old = check_config(cfg, out)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    labels = [s.label for s in specs]
    meta = {
        "identity": cfg.identity(),
        "dataset_sha256": dataset_sha256(cfg.dataset),
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
            "name": getattr(src, "name", "") or (pair.llm_name if role == "llm" else pair.slm_name),
            "sha256": getattr(src, "sha256", None),
            "params": model.n_params or None,  # None: a remote LLM, whose size the server does not say
        }
    write_json(path, meta)


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
    pair, spec: PolicySpec, cfg: EvalConfig, items, threshold: float | None, trigger=None, on_item=None
) -> list[dict]:
    """Decode items (spec.samples rows each, `cfg.batch_size` rows at a time, a finished row's slot taking
    the next waiting row) and grade them: one result dict per item, each also handed to `on_item` as soon
    as its last row ends, so a stopped run keeps every finished item."""
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
    gens: dict[int, list] = {n: [] for n in range(len(items))}
    out: list[dict] = []
    clock = [time.perf_counter()]

    def finished(i: int, gen) -> None:
        n = i // spec.samples
        gens[n].append((i, gen))
        if len(gens[n]) == spec.samples:
            now = time.perf_counter()  # the time since the previous item ended: items' times sum to the run's
            out.append(grade(spec, items[n], [g for _, g in sorted(gens.pop(n), key=lambda x: x[0])], now - clock[0]))
            clock[0] = now
            if on_item is not None:
                on_item(out[-1])

    generate(
        pair,
        prompts,
        dcfg,
        batch_size=max(cfg.batch_size, spec.samples),
        row_seeds=seeds,
        trigger=trigger,
        on_finish=finished,
    )
    return out


def grade(spec: PolicySpec, item, gens: list, wall_time_s: float) -> dict:
    """One item's result line from its spec.samples generations."""
    answers = [extract_answer(g.text) for g in gens]
    if spec.samples > 1:
        pred = majority(answers)
        extra = {"answers": answers, "pass_at_k": pass_at_k(answers, item.answer)}
    else:
        pred, extra = answers[0], {"text": gens[0].text}
    stats = {k: sum(getattr(g, k) if k != "generated_tokens" else len(g.token_ids) for g in gens) for k in COST_KEYS}
    stats["wall_time_s"] = wall_time_s
    return {
        "item": item.id,
        "policy": spec.label,
        "gold": item.answer,
        "prediction": pred,
        "correct": is_correct(pred, item.answer),
        "finish": [g.finish_reason for g in gens],
        "stats": stats,
        **extra,
    }


def warn_long_prompts(pair, items, max_new_tokens: int) -> None:
    """A warning on stderr when prompts plus the generation budget exceed the SLM's context."""
    from ..models.chat import encode_prompts

    ctx = pair.slm.context_length
    if not ctx:
        return
    lengths = [len(ids) for ids in encode_prompts(pair.tokenizer, [math_prompt(it.question) for it in items], True)]
    long = [n for n in lengths if n + max_new_tokens > ctx]
    if long:
        print(
            f"warning: {len(long)} of {len(items)} prompts plus max_new_tokens {max_new_tokens} exceed the "
            f"SLM's context of {ctx} tokens (longest prompt {max(long)} tokens)",
            file=sys.stderr,
        )


def run_eval(cfg: EvalConfig, progress: bool = True) -> Path:
    from ..backends import load_pair

    specs = [parse_policy(p) for p in cfg.policies]
    if len({s.label for s in specs}) != len(specs):
        raise S2TError("the same policy is listed twice")
    shard_i, shard_n = cfg.shard_index()
    needs_llm = any(POLICIES[s.policy].needs_llm for s in specs)
    if needs_llm and not cfg.llm and not cfg.llm_url:
        raise S2TError("these policies need --llm (or --llm-url)")
    for s in specs:
        check_inputs(s)
    thresholds = {
        s.label: load_threshold(s.threshold_file, s.trigger, cfg.slm, cfg.llm)
        for s in specs
        if s.threshold_file and s.trigger
    }
    keys = {s.label: inputs_key(_fingerprint(s)) for s in specs}
    ds = load_dataset(cfg.dataset, limit=cfg.limit)
    items = ds.take(cfg.limit, cfg.offset)
    check_items(items, cfg.dataset)
    items = [it for idx, it in enumerate(items) if idx % shard_n == shard_i]
    out = Path(cfg.out)
    with run_lock(out):
        results = out / f"results.shard{shard_i}of{shard_n}.jsonl"
        check_config(cfg, out)
        rows = read_jsonl(results)
        check_stale(rows, keys, specs, results)
        # items another sharding of this run finished count as done: a run may change --shard and go on
        for other in sorted(out.glob("results.shard*of*.jsonl")):
            if other != results:
                theirs = read_jsonl(other)
                check_stale(theirs, keys, specs, other)
                rows = rows + theirs
        done = {(r["item"], r["policy"]) for r in rows}
        todo = [(it, s) for it in items for s in specs if (it.id, s.label) not in done]
        llm, remote = (cfg.llm, cfg.remote()) if needs_llm else (None, None)
        pair = load_pair(cfg.slm, llm, dtype=cfg.dtype, device=cfg.device, backend=cfg.backend, remote=remote)
        _write_config(cfg, out, pair, specs)
        warn_long_prompts(pair, [it for it, _ in todo], cfg.max_new_tokens)
        pairs = {s.label: pair for s in specs}
        heads = {}
        for s in specs:
            if s.trigger == "learned" and s.threshold_file:
                from ..local.trigger_head import load_learned_trigger

                heads[s.label] = load_learned_trigger(s.threshold_file)
        for s in specs:
            if s.adapter:  # the selector is merged into its own copy of the SLM; other policies keep the base model
                from ..local.selector import apply_selector

                pairs[s.label] = apply_selector(
                    load_pair(cfg.slm, None, dtype=cfg.dtype, device=cfg.device, backend=cfg.backend),
                    s.adapter,
                    mode=s.local_mode,
                )
        total = len(items) * len(specs)
        with Progress(f"eval {cfg.dataset}", total, total - len(todo), progress) as bar, open_resume(results) as f:
            for spec in specs:
                pending = [it for it, s in todo if s is spec]

                def write(row: dict, spec: PolicySpec = spec) -> None:
                    append_line(f, {**row, "inputs": keys[spec.label]} if keys[spec.label] else row)
                    sync(f)
                    bar.advance(1)

                pair_, thr, head = pairs[spec.label], thresholds.get(spec.label), heads.get(spec.label)
                run_policy_on_items(pair_, spec, cfg, pending, thr, head, on_item=write)
    return out
