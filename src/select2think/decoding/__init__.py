"""Decoding: triggers, selectors, the reference loop and its fast paths."""

from .api import GenerateResult, generate
from .config import DecodeConfig

__all__ = ["DecodeConfig", "GenerateResult", "generate"]
