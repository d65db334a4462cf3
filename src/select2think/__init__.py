"""select2think: small language models that select like large ones (Select to Think)."""

from .backends import load_pair
from .backends.pair import ModelPair
from .decoding import DecodeConfig, GenerateResult, generate
from .errors import S2TError

__version__ = "0.1.0"
__all__ = ["DecodeConfig", "GenerateResult", "ModelPair", "S2TError", "generate", "load_pair"]
