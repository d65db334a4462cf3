"""The one place files are read and written: JSONL with resume, atomic writes, sha256, a run lock.

Readers never write. A JSONL file is appended to by the one command that owns it (under `run_lock`);
a kill can tear only its last line, which readers ignore and `open_resume` (the owner) cuts off.
A malformed line anywhere else is an error naming the file and the line.
Every other file is written whole to an unpredictable temporary name beside it, fsynced and renamed
into place, so a kill never leaves a half-written file and a planted symlink is never followed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import S2TError

LOCK_NAME = ".s2t.lock"


def _parse_line(path: Path, n: int, line: bytes):
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise S2TError(f"{path}:{n}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise S2TError(f"{path}:{n}: malformed JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list:
    """Every finished line of a JSONL file (blank lines skipped; [] if it does not exist). A torn last
    line (no newline: its writer was killed) is ignored; any other malformed line is an S2TError
    naming the file and line. Never modifies the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise S2TError(f"cannot read {path}: {e.strerror}") from None
    lines = raw.split(b"\n")
    lines.pop()  # after the last newline: empty, or a torn line
    return [_parse_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]


def open_resume(path: str | Path) -> IO[str]:
    """Open a JSONL file its owner appends to: a torn last line is cut off first (only that: a malformed
    complete line is an error, as for readers). Returns a text file open for appending."""
    path = Path(path)
    read_jsonl(path)  # validates every complete line
    if path.is_file():
        raw = path.read_bytes()
        keep = raw.rfind(b"\n") + 1
        if keep < len(raw):
            with open(path, "r+b") as f:
                f.truncate(keep)
    return open(path, "a", encoding="utf-8")


def append_line(f: IO[str], row) -> None:
    """One JSON line; callers `sync` after each finished batch."""
    f.write(json.dumps(row) + "\n")


def sync(f: IO) -> None:
    f.flush()
    os.fsync(f.fileno())


def read_json(path: str | Path, what: str = "file"):
    """A JSON file, or an S2TError naming it (missing, unreadable, not UTF-8, malformed)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise S2TError(f"{what} not found: {path}") from None
    except OSError as e:
        raise S2TError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise S2TError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise S2TError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_prefix(final: Path) -> str:
    return f".{final.name}."


def clean_tmp(final: Path) -> None:
    """Remove leftovers of killed atomic writes of `final` (`.NAME.*.tmp` siblings). Call it only while
    no other process can be writing `final` (under a lock)."""
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f"{tmp_prefix(final)}*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(final: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a new temporary sibling of `final` (unpredictable name, created by us, so never a planted
    symlink); when the block completes it is fsynced and renamed onto `final`; on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=tmp_prefix(final), suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        if is_dir and final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: str | Path, data: str | bytes) -> Path:
    """Write a whole file atomically (text is UTF-8)."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(final)


def write_json(final: str | Path, obj) -> Path:
    return atomic_write(final, json.dumps(obj, indent=2))


@contextlib.contextmanager
def run_lock(directory: str | Path, name: str = LOCK_NAME, wait: bool = False) -> Iterator[Path]:
    """An advisory exclusive lock on a run directory for as long as the block runs; a second writer is
    refused at once with one line (or waits, `wait=True`). The lock is the kernel's (flock): a killed
    holder releases it."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise S2TError(
                f"{directory} is in use by another s2t process (lock {path}); wait for it or use another --out"
            ) from None
        yield path
    finally:
        os.close(fd)


def differences(old: dict, new: dict) -> str:
    """`key: old -> new` for every key whose value differs, for refusing a resume under other settings."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file is unusable (missing, truncated, unreadable header), or None. Cheap: reads
    the header only and checks the file is as long as the header says."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as e:
        return f"{path.name} has an unreadable header ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    return None if size == expected else f"{path.name} is {size} bytes, its header says {expected}"


def check_safetensors(path: str | Path, hint: str = "") -> Path:
    """`path`, or an S2TError saying what is wrong with it (and `hint`, what to do)."""
    problem = safetensors_problem(path)
    if problem:
        raise S2TError(f"{Path(path).parent}: {problem}" + (f"; {hint}" if hint else ""))
    return Path(path)
