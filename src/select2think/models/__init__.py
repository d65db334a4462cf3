"""Model registry, cache, loading and the checks that make two models a pair."""

from .registry import REGISTRY, resolve

__all__ = ["REGISTRY", "resolve"]
