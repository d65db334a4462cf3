"""A small and a large model behind backends, sharing one tokenizer, checked once at load (`load_pair`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import S2TError
from ..models.pair import tokenizer_size
from .base import Backend


@dataclass
class ModelPair:
    """SLM (+ optional LLM) backends with the vocabulary facts every decoding step relies on.

    `vocab_size` is the tokenizer size: logits are cut to it, so padding rows are never proposed.
    `banned_ids` (the reserved ids that lie below it, if any) are masked too. `selector` is S2T-Local's
    score head once a selector is applied; `scorer` the adapted model's own backend in decoupled mode.
    """

    slm: Backend
    tokenizer: Any
    llm: Backend | None = None
    slm_name: str = ""
    llm_name: str = ""
    reserved_ids: tuple[int, ...] | None = None
    eos_ids: frozenset[int] = frozenset()
    selector: Any = None  # decoding.local_scorer.ReservedHead (apply_selector)
    scorer: Backend | None = None  # decoupled S2T-Local: the adapted model, while `slm` is the base
    sources: dict = field(default_factory=dict)
    engine: str = "hf"

    @property
    def vocab_size(self) -> int:
        return tokenizer_size(self.tokenizer)

    @property
    def banned_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.reserved_ids or ()) if i < self.vocab_size)

    def require_llm(self) -> Backend:
        if self.llm is None:
            raise S2TError("this policy needs an LLM: pass --llm")
        return self.llm

    def slm_module(self) -> torch.nn.Module:
        """The SLM as a transformers module (training and LoRA selectors need one)."""
        model = getattr(self.slm, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise S2TError(f"this needs the transformers backend (--backend hf), not {self.engine}")
        return model
