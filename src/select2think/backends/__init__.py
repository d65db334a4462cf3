"""Language-model backends: a batched KV cache with prefill, extend and rollback."""

from .hf import HFBackend

__all__ = ["HFBackend"]
