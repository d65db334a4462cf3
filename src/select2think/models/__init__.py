"""Model registry, cache, loading and the checked SLM/LLM pair."""

from .pair import ModelPair
from .registry import REGISTRY, resolve

__all__ = ["REGISTRY", "ModelPair", "resolve"]
