"""Engines behind one interface (base.py): transformers (hf.py), llama.cpp (llamacpp.py) and, for the LLM only,
an OpenAI-compatible server (remote.py: selection only)."""

from .base import Backend, Capabilities
from .loading import ENGINES, load_backend, load_pair

__all__ = ["ENGINES", "Backend", "Capabilities", "load_backend", "load_pair"]
