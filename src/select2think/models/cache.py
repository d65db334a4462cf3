"""The on-disk cache: reassembled GGUF files and their one-time safetensors conversions.

Every write goes to a temporary name in the same directory and is renamed into place only when
complete, so a run killed mid-write never leaves a file or directory that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import S2TError
from .registry import ModelSource


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


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it onto `final` only if the block completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


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
    return dest


def gguf_path(source: ModelSource) -> Path:
    """A verified GGUF file for a packaged or local GGUF source."""
    if source.kind == "gguf":
        assert source.location is not None  # resolve() sets it for every gguf source
        return Path(source.location)
    if source.kind == "wheel-gguf":
        path = package_file(source, 0)
        if source.sha256 is not None and sha256_of(path) != source.sha256:
            raise S2TError(f"checksum mismatch for {path}: reinstall {source.packages[0]}")
        return path
    if source.kind == "chunks":
        dest = cache_root() / "gguf" / f"{source.name}.gguf"
        if dest.is_file():
            return dest
        parts = [package_file(source, i) for i in range(len(source.packages))]
        return assemble(parts, dest, source.sha256)
    raise S2TError(f"model {source.name!r} is not a GGUF model")


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
