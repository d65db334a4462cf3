"""Model registry, cache, loading and the checked SLM/LLM pair."""

from .pair import ModelPair, load_pair
from .registry import REGISTRY, resolve

__all__ = ["REGISTRY", "ModelPair", "load_pair", "resolve"]
