"""The on-disk cache: reassembled GGUF files and their one-time safetensors conversions.

Every write goes to a temporary name in the same directory and is renamed into place only when
complete, so a run killed mid-write never leaves a file or directory that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import S2TError
from ..io import atomic_path, clean_tmp, read_json, run_lock, sha256_of, write_json
from .registry import ModelSource

__all__ = ["atomic_path", "sha256_of"]  # re-exported: they live in select2think.io


def cache_root() -> Path:
    """`$S2T_CACHE`, or ~/.cache/select2think."""
    root = os.environ.get("S2T_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "select2think")
    return Path(root)


def package_file(source: ModelSource, index: int) -> Path:
    """Path of the index-th file shipped by the source's wheels; a clear error if not installed."""
    spec = source.packages[index]
    dist_name = spec.split("==")[0]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise S2TError(
            f"model {source.name!r} needs package {dist_name}, which is not installed: run "
            f"`{source.install_command}` (or `s2t models fetch {source.name}` after installing)"
        ) from None
    path = Path(str(dist.locate_file(source.files[index])))
    if not path.is_file():
        raise S2TError(f"package {dist_name} is installed but lacks {source.files[index]}; reinstall it")
    return path


def is_installed(source: ModelSource) -> bool:
    for i in range(len(source.packages)):
        try:
            package_file(source, i) if source.files else md.distribution(source.packages[i].split("==")[0])
        except (S2TError, md.PackageNotFoundError):
            return False
    return True


def force_hint(name: str) -> str:
    return f"run `s2t models fetch {name} --force` to rebuild it"


def cache_lock(name: str):
    """Held while a cached artifact of `name` is built or checked: leftovers of killed builds can then be
    removed safely, and two processes never build the same file at once (the second waits)."""
    simple = name.replace("/", "_") if len(name) < 100 else ""
    key = simple if simple and not simple.startswith(".") else hashlib.sha256(name.encode()).hexdigest()[:24]
    return run_lock(cache_root() / "locks", f"{key}.lock", wait=True)


def _sidecar(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return cache_root() / "verified" / f"{key}.json"


def _record(path: Path, digest: str) -> None:
    st = path.stat()
    write_json(_sidecar(path), {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})


def measured_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (size, mtime) in a small sidecar so an unchanged file is not rehashed."""
    st = path.stat()
    try:
        old = read_json(_sidecar(path))
    except S2TError:
        old = {}
    if isinstance(old, dict) and (old.get("size"), old.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
        return old["sha256"]
    digest = sha256_of(path)
    _record(path, digest)
    return digest


def check_gguf(path: Path, hint: str = "") -> Path:
    """A cheap look: the file exists, and starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise S2TError(f"cannot read GGUF file {path}: {e.strerror}") from None
    if len(head) < 8 or head[:4] != b"GGUF":
        what = "empty" if not head else "truncated" if len(head) < 8 else "not a GGUF file"
        raise S2TError(f"{path} is {what}" + (f"; {hint}" if hint else ""))
    return path


def verify(path: Path, sha256: str | None, size: int | None, hint: str) -> str:
    """The measured sha256 of `path`, after checking its size and hash against the expected ones."""
    if size is not None and path.stat().st_size != size:
        raise S2TError(f"{path} is {path.stat().st_size} bytes, expected {size}; {hint}")
    digest = measured_sha256(path)
    if sha256 is not None and digest != sha256:
        raise S2TError(f"{path} is corrupt: sha256 {digest[:12]}..., expected {sha256[:12]}...; {hint}")
    return digest


def assemble(parts: Iterable[Path], dest: Path, sha256: str | None) -> Path:
    """Concatenate `parts` into `dest` atomically, verifying sha256; a mismatch deletes the file."""
    if dest.is_file():
        return dest
    with atomic_path(dest) as tmp:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise S2TError(
                f"checksum mismatch for {dest.name}: expected sha256 {sha256}, got {digest}; "
                f"the bad file was deleted, reinstall the model packages"
            )
    _record(dest, digest)
    return dest


def gguf_path(source: ModelSource) -> Path:
    """A verified GGUF file for a packaged or local GGUF source (size and sha256 checked on every use,
    the hash remembered while the file is unchanged)."""
    if source.kind == "gguf":
        assert source.location is not None  # resolve() sets it for every gguf source
        path = Path(source.location)
        if not path.is_file():
            raise S2TError(f"GGUF file not found: {path}")
        return check_gguf(path)
    if source.kind == "wheel-gguf":
        path = check_gguf(package_file(source, 0), f"reinstall {source.packages[0]}")
        if source.sha256 is not None:
            verify(path, source.sha256, source.size_bytes, f"reinstall {source.packages[0]}")
        return path
    if source.kind == "chunks":
        dest = cache_root() / "gguf" / f"{source.name}.gguf"
        with cache_lock(source.name):
            clean_tmp(dest)
            if not dest.is_file():
                assemble([package_file(source, i) for i in range(len(source.packages))], dest, source.sha256)
            hint = force_hint(source.name)
            verify(check_gguf(dest, hint), source.sha256, source.size_bytes, hint)
        return dest
    raise S2TError(f"model {source.name!r} is not a GGUF model")


def gguf_sha256(source: ModelSource) -> str:
    """The measured sha256 of the source's GGUF (cached by size and mtime)."""
    return measured_sha256(gguf_path(source))


def converted_problem(path: Path) -> str | None:
    """Why a cached conversion is unusable (files missing, weights truncated), or None. Cheap."""
    for need in ("config.json", "s2t_source.json"):
        if not (path / need).is_file():
            return f"{need} is missing"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            return f"{index.name} is unreadable ({e})"
    else:
        names = ["model.safetensors"]
    from ..io import safetensors_problem

    return next((p for p in (safetensors_problem(path / n) for n in names) if p), None)


def remove_cached(source: ModelSource, dtype_name: str) -> None:
    """Delete a source's cached conversion and, for reassembled sources, its GGUF (`fetch --force`)."""
    with cache_lock(source.name):
        shutil.rmtree(converted_dir(source, dtype_name), ignore_errors=True)
        if source.kind == "chunks":
            dest = cache_root() / "gguf" / f"{source.name}.gguf"
            _sidecar(dest).unlink(missing_ok=True)
            dest.unlink(missing_ok=True)


def converted_dir(source: ModelSource, dtype_name: str) -> Path:
    """Where the safetensors conversion of a GGUF source lives."""
    if source.kind == "gguf":
        assert source.location is not None  # resolve() sets it for every gguf source
        st = os.stat(source.location)
        key = hashlib.sha256(f"{source.location}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        name = f"{Path(source.location).stem}-{key}"
    else:
        name = source.name
    return cache_root() / "models" / name / dtype_name
