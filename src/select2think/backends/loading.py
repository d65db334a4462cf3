"""Load a model behind an engine (ENGINES), and a checked SLM/LLM pair: `load_pair(..., backend=...)`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import S2TError
from ..models.chat import eos_ids
from ..models.pair import check_tokenizers, pick_reserved_ids, tokenizer_size
from ..models.registry import REGISTRY, ModelSource, resolve
from .base import Backend
from .pair import ModelPair

if TYPE_CHECKING:  # the remote engine (and httpx) load only when a pair has a remote LLM
    from .remote import RemoteConfig

ENGINES = ("hf", "hf-static", "llama.cpp")  # hf-static: transformers on static buffers, CUDA graphs on a GPU
GGUF_KINDS = ("chunks", "wheel-gguf", "gguf", "tiny")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise S2TError(f"unknown backend {engine!r}: use one of {', '.join(ENGINES)}")
    return engine


def _llamacpp(source: ModelSource, name: str) -> tuple[Backend, Any, list]:
    from ..models.cache import gguf_path
    from ..models.tokenizers import gguf_tokenizer
    from .llamacpp import load_llamacpp

    if source.kind not in GGUF_KINDS:
        with_gguf = ", ".join(n for n, s in REGISTRY.items() if s.kind in GGUF_KINDS)
        raise S2TError(
            f"--backend llama.cpp needs a GGUF model; {name!r} has none (these do: {with_gguf}, or a .gguf path)"
        )
    if source.kind == "tiny":
        from ..models.tiny_gguf import tiny_gguf_path

        path = tiny_gguf_path(source.name)
    else:
        path = gguf_path(source)
    tokenizer = gguf_tokenizer(source, path)
    return load_llamacpp(path), tokenizer, []


def load_backend(
    name: str, engine: str = "hf", dtype: str = "bf16", device: str = "auto"
) -> tuple[Backend, Any, ModelSource, list]:
    """(backend, tokenizer, source, model EOS ids) for a model name, path or hub id."""
    from ..models.loading import load_model

    check_engine(engine)
    source = resolve(name)
    if engine == "llama.cpp":
        if device not in ("auto", "cpu"):
            raise S2TError(f"--backend llama.cpp runs on the CPU here; --device {device} is for hf or hf-static")
        backend, tokenizer, model_eos = _llamacpp(source, name)
        return backend, tokenizer, source, model_eos
    from .hf import HFBackend
    from .static import StaticHFBackend

    model, tokenizer, source = load_model(name, dtype=dtype, device=device)
    cfg = getattr(model, "generation_config", None)
    backend = StaticHFBackend(model) if engine == "hf-static" else HFBackend(model)
    return backend, tokenizer, source, [getattr(cfg, "eos_token_id", None)]


def load_pair(
    slm: str,
    llm: str | None = None,
    dtype: str = "bf16",
    device: str = "auto",
    backend: str = "hf",
    remote: RemoteConfig | None = None,
) -> ModelPair:
    """Load and check an SLM/LLM pair (the LLM is optional: greedy and S2T-Local need none). With `remote`
    the LLM is a server's (backends/remote.py), named by `remote.model`, else by `llm`, else the only one served."""
    slm_b, slm_tok, slm_src, eos = load_backend(slm, backend, dtype, device)
    llm_b: Backend | None = None
    sources = {"slm": slm_src}
    size = tokenizer_size(slm_tok)
    if remote is not None:
        from .remote import connect

        server = connect(replace(remote, model=remote.model or llm), slm_tok, size)
        llm_b, llm = server, server.api.model
    elif llm is not None:
        llm_b, llm_tok, llm_src, llm_eos = load_backend(llm, backend, dtype, device)
        sources["llm"] = llm_src
        eos = eos + llm_eos
        check_tokenizers(slm, slm_tok, llm, llm_tok)
    for role, b in (("SLM", slm_b), ("LLM", llm_b)):
        if b is not None and b.vocab_rows < size:
            raise S2TError(f"{role} has {b.vocab_rows} output rows, fewer than the tokenizer's {size} ids")
    return ModelPair(
        slm=slm_b,
        llm=llm_b,
        tokenizer=slm_tok,
        slm_name=slm,
        llm_name=llm or "",
        reserved_ids=pick_reserved_ids(slm_tok, slm_b.vocab_rows),
        eos_ids=eos_ids(slm_tok, eos),
        sources=sources,
        engine=backend,
    )


def fastest_engine(*names: str | None) -> str:
    """llama.cpp when it is installed and every named model has a GGUF, else hf (with a line saying why)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("note: llama-cpp-python is not installed (`make llama` builds it); using the transformers backend")
        return "hf"
    if all(resolve(n).kind in GGUF_KINDS for n in names if n):
        return "llama.cpp"
    return "hf"
