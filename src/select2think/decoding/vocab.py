"""From an engine's raw logits to the text vocabulary: a decoding step, the same for every engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Vocab:
    """`size`: the tokenizer's ids (padding rows beyond it are never proposed); `banned`: ids below it that
    may not be generated (S2T-Local's reserved special tokens)."""

    size: int
    banned: tuple[int, ...] = ()

    @classmethod
    def of(cls, pair) -> Vocab:
        return cls(pair.vocab_size, pair.banned_ids)

    def text_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw logits [..., V_all] -> [..., size] with banned ids at -inf (a new tensor)."""
        logits = raw[..., : self.size].clone()
        if self.banned:
            logits[..., list(self.banned)] = float("-inf")
        return logits

    def logprobs(self, raw: torch.Tensor) -> torch.Tensor:
        return self.text_logits(raw).log_softmax(-1)
