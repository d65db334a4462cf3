"""Tokenizers: converted once from GGUF files and cached (the llama.cpp engine and the tiny test models use
them; a safetensors conversion carries its own)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from ..errors import S2TError
from .cache import atomic_path, converted_dir, gguf_path
from .registry import ModelSource, resolve


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def gguf_tokenizer(source: ModelSource, gguf: Path | None = None):
    """The tokenizer of a GGUF model, converted once and cached (the llama.cpp backend decodes text with
    it; a safetensors conversion already made holds the same tokenizer and is used when present)."""
    from transformers import AutoTokenizer

    from .cache import cache_root

    if source.kind == "tiny":
        return smollm2_tokenizer()
    converted = converted_dir(source, "bf16") if source.kind in ("chunks", "wheel-gguf", "gguf") else None
    if converted is not None and (converted / "tokenizer_config.json").is_file():
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(converted)
    gguf = gguf or gguf_path(source)
    key = source.name if source.kind != "gguf" else converted_dir(source, "bf16").parent.name
    dest = cache_root() / "tokenizers" / key.replace("/", "_")
    if not (dest / "tokenizer_config.json").is_file():
        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # a damaged GGUF fails anywhere inside the reader
            raise S2TError(
                f"cannot read the tokenizer of GGUF file {gguf}: {(str(e).splitlines() or [''])[0]}"
            ) from None
        with atomic_path(dest, is_dir=True) as tmp:
            tok.save_pretrained(tmp)
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(dest)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, converted from the packaged GGUF once and cached."""
    return gguf_tokenizer(resolve("smollm2-135m-instruct"))
