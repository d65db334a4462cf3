"""The interface every engine implements: a batch of rows, each a token sequence with a KV cache.

Decoding speaks in rows and lengths only. How an engine lays its cache out (slot masks, sequence ids,
a static buffer) is its own business. Logits come back raw: one column per output row of the model
(`vocab_rows`, padding and reserved rows included); cutting them to the tokenizer and masking banned
ids is a decoding step (`decoding.vocab`).

Shapes: B = batch rows, n = tokens per row in one call, R = listed rows, K = siblings, V = vocab_rows,
H = hidden size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import S2TError


@dataclass(frozen=True)
class Capabilities:
    """What an engine can give; a policy that needs more says so in one line (`Backend.require`)."""

    full_logits: bool = True  # logits at every position of an extend (kl trigger, verify, teacher forcing)
    hidden_states: bool = False  # final hidden states (learned trigger, S2T-Local scores)
    sibling_scoring: bool = False  # K candidates at one position in one forward
    adapters: bool = False  # LoRA selectors (transformers + peft only)
    selection_only: bool = False  # answers only "which of these K ids comes first?" (`select`): a remote LLM
    admission: bool = False  # `admit`: a row starts over mid-batch (continuous batching)
    output_head: bool = False  # `head_logits`: siblings can be scored for hidden states alone


class Backend(ABC):
    """One model behind a batched, rollback-able cache. `reset(B)` starts a new batch of B empty rows.

    Counters (read by decoding's cost accounting): `forwards` model calls, `tokens` live tokens processed,
    per batch row `row_forwards` / `row_tokens`, and `requests` HTTP requests (remote engines; retries count).
    """

    name: str = "base"
    capabilities: Capabilities = Capabilities()

    def __init__(self, vocab_rows: int, hidden_size: int):
        self.vocab_rows = vocab_rows
        self.hidden_size = hidden_size
        self.n_params = 0  # weights in the model (the report's compute column prices tokens by it)
        self.context_length: int | None = None  # positions the model was trained for, if known
        self.want_hidden = False  # keep the final hidden states of the next forwards in `last_hidden`
        self.last_hidden: torch.Tensor | None = None  # [B, n, H] after extend, [R, K, H] after score_siblings
        self.forwards = 0
        self.tokens = 0
        self.requests = 0
        self.row_forwards: list[int] = []
        self.row_tokens: list[int] = []

    # -- the batch ---------------------------------------------------------------------------------
    @abstractmethod
    def reset(self, batch_size: int) -> None:
        """Drop every row; start `batch_size` empty rows (counters restart too)."""

    @abstractmethod
    def length(self, row: int) -> int:
        """Tokens in the row's cache."""

    @abstractmethod
    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        """Append each row's live tokens (tokens [B, n] long, live [B, n] bool, live tokens contiguous
        per row; retired rows must be all dead). Returns float32 raw logits [B, n, V] (positions of dead
        tokens are zeros nobody reads), [B, 1, V] with `last_only` (the last column: rows whose last
        token is dead get zeros there), or None with `logits=False` (a catch-up nobody reads)."""

    @abstractmethod
    def truncate(self, row: int, length: int) -> None:
        """Roll the row back: its cache keeps its first `length` tokens."""

    @abstractmethod
    def retire(self, rows: Sequence[int]) -> None:
        """Finished rows leave the batch; later calls skip them (no-op for rows already gone)."""

    def admit(self, row: int) -> None:
        """Row `row` (retired or not) starts over as an empty row while the other rows keep their caches, and
        its counters restart: continuous batching prefills a newcomer there with an extend in which only it is
        live. Engines without `capabilities.admission` decode fixed batches only."""
        raise S2TError(f"the {self.name} backend cannot admit a row mid-batch (continuous batching)")

    # -- siblings (S2T-Local) -----------------------------------------------------------------------
    def score_siblings(self, rows: Sequence[int], cands: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Raw logits [R, K, V] of K candidate tokens [R, K] each placed at the next position of its row
        (each sees the row's prefix and itself), or None with `logits=False` (a caller that reads only the
        siblings' hidden states: the output head over K x V was most of a triggered step's cost). The
        siblings stay provisional: `keep_siblings` makes one per row the row's next token; any other call
        first drops them all."""
        raise S2TError(f"the {self.name} backend cannot score sibling candidates")

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits [N, V] of final hidden states [N, H] (a kept sibling's next-token logits)."""
        raise S2TError(f"the {self.name} backend cannot apply its output head to hidden states")

    def keep_siblings(self, picks: dict[int, int]) -> None:
        """Row r keeps sibling `picks[r]` of the last `score_siblings` as its next token (its length grows
        by one); every other provisional sibling is dropped."""
        raise S2TError(f"the {self.name} backend cannot score sibling candidates")

    # -- selection (an engine without logits) -------------------------------------------------------
    def select(self, rows: Sequence[int], cands: torch.Tensor) -> torch.Tensor:
        """The id [R] among each listed row's candidates cands [R, K] that the model ranks first after the row's
        tokens, for `selection_only` engines (engines with logits are asked for those instead). A failed call
        changes no row."""
        raise S2TError(f"the {self.name} backend answers with logits, not selections")

    def hidden(self) -> torch.Tensor:
        """`last_hidden`, which the last forward kept because `want_hidden` was set."""
        if self.last_hidden is None:
            raise RuntimeError("no hidden states kept: set want_hidden before the forward")
        return self.last_hidden

    def spawn(self) -> Backend:
        """A second backend with its own cache on the same weights (reference paths score on it)."""
        raise S2TError(f"the {self.name} backend cannot open a second cache on the same weights")

    # -- shared helpers -----------------------------------------------------------------------------
    def require(self, capability: str, what: str) -> None:
        """One clear line when a policy needs something this engine lacks."""
        if not getattr(self.capabilities, capability):
            raise S2TError(f"{what} needs {capability.replace('_', ' ')}, which the {self.name} backend lacks")

    def _reset_counters(self, batch_size: int) -> None:
        self.forwards = 0
        self.tokens = 0
        self.requests = 0
        self.row_forwards = [0] * batch_size
        self.row_tokens = [0] * batch_size

    def _count(self, rows: Sequence[int], n_tokens: Sequence[int]) -> None:
        """One model call in which batch rows `rows` put `n_tokens` live tokens through the model."""
        self.forwards += 1
        for r, n in zip(rows, n_tokens, strict=True):
            self.tokens += n
            self.row_tokens[r] += n
            self.row_forwards[r] += n > 0
