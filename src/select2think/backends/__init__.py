"""Engines behind one interface (base.py): transformers (hf.py) and llama.cpp (llamacpp.py)."""

from .base import Backend, Capabilities
from .loading import ENGINES, load_backend, load_pair

__all__ = ["ENGINES", "Backend", "Capabilities", "load_backend", "load_pair"]
