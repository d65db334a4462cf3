"""`generate`: prompts in, texts and statistics out, through the reference loop or a fast path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..backends.base import Backend
from ..backends.pair import ModelPair
from ..errors import S2TError
from ..models.chat import encode_prompts
from .config import DecodeConfig
from .fast import decode_draft_verify, decode_lazy
from .local_loop import decode_local
from .local_scorer import ReservedHead
from .loop import decode_reference
from .offline import PromptQueue
from .policy import Policy
from .record import Offset, StepRecorder
from .state import Batch, DecodeStats, Generation, RowState
from .triggers import Trigger
from .vocab import Vocab

__all__ = ["Decoder", "GenerateResult", "encode_prompts", "generate", "path_for"]


@dataclass
class GenerateResult:
    texts: list[str]
    generations: list[Generation]
    stats: DecodeStats
    config: DecodeConfig | None = None
    path: str = ""  # which execution path ran

    def to_dict(self) -> dict:
        return {
            "texts": self.texts,
            "path": self.path,
            "stats": self.stats.to_dict(),
            "generations": [g.to_dict() for g in self.generations],
        }


def path_for(cfg: DecodeConfig, policy: Policy) -> str:
    """The execution path `generate` takes (config.POLICIES says which kind)."""
    kind = cfg.info.path
    if kind == "local":
        return ("local-tree" if cfg.fast else "local-reference") + (
            "-decoupled" if cfg.local_mode == "decoupled" else ""
        )
    if kind != "fast" or not cfg.fast:
        return "reference"
    return "draft-verify" if policy.trigger.needs_llm else "lazy-llm"


def local_head(pair: ModelPair, cfg: DecodeConfig) -> ReservedHead:
    """The applied selector's head, or (no selector applied) the SLM's own reserved rows, untrained."""
    pair.slm.require("hidden_states", "S2T-Local")
    if pair.selector is not None:
        return ReservedHead(pair.selector.rows, pair.selector.prior_weight, cfg.k, pair.selector.gate)
    if not pair.reserved_ids:
        raise S2TError(f"{pair.slm_name} has no 16 unused rows or special tokens to reserve for S2T-Local")
    output_rows = getattr(pair.slm, "output_rows", None)
    if output_rows is None:
        raise S2TError(f"s2t-local on the {pair.engine} backend needs a trained selector (--adapter)")
    return ReservedHead(output_rows(pair.reserved_ids), 0.0, cfg.k)


def check_llm_engine(pair: ModelPair, cfg: DecodeConfig, policy: Policy, path: str) -> None:
    """One line when the LLM's engine cannot serve this run. A selection-only LLM (a remote server) answers
    only "which of these candidates comes first?": enough for s2t with an SLM-only trigger on the lazy path."""
    llm = pair.llm
    if not cfg.uses_llm or llm is None or llm.capabilities.full_logits:
        return
    what = "the llm policy (the LLM decoding alone)" if cfg.info.path == "llm-alone" else policy.full_llm_use(path)
    if what is not None:
        raise S2TError(
            f"{what} needs the LLM's full distribution, which the {llm.name} backend lacks (it only selects): "
            "use policy s2t with an SLM-only trigger (entropy, margin, random, always) and the fast path"
        )


class Decoder:
    """What `generate` sets up once for a configuration (the policy, the S2T-Local head, the stop ids, the
    execution path), and `run` to decode one `Batch` with it. The server keeps one per configuration and
    decodes continuous batches through it."""

    def __init__(self, pair: ModelPair, cfg: DecodeConfig, trigger: Trigger | None = None):
        if cfg.uses_llm:
            pair.require_llm()
        self.pair, self.cfg = pair, cfg
        self.head = local_head(pair, cfg) if cfg.info.path == "local" else None
        self.policy = Policy.from_config(cfg, trigger, self.head)  # `trigger`: a ready object (a learned head)
        self.eos = frozenset(pair.eos_ids) | frozenset(cfg.extra_eos)
        tok = pair.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos)
        self.path = path_for(cfg, self.policy)
        check_llm_engine(pair, cfg, self.policy, self.path)
        self.vocab = Vocab.of(pair)

    @property
    def proposer(self) -> Backend:
        """The backend whose distribution every step starts from (the LLM when it decodes alone)."""
        return self.pair.require_llm() if self.cfg.info.path == "llm-alone" else self.pair.slm

    @property
    def backends(self) -> list[Backend]:
        """Every backend a decode with this configuration runs."""
        llm = [self.pair.require_llm()] if self.policy.needs_llm or self.cfg.info.path == "llm-alone" else []
        scorer = [self.pair.scorer] if self.pair.scorer is not None and self.cfg.local_mode == "decoupled" else []
        return [self.proposer, *(b for b in llm if b is not self.proposer), *scorer]

    def row(
        self,
        max_new_tokens: int | None = None,
        stop: tuple[str, ...] | None = None,
        on_commit: Callable[[RowState], None] | None = None,
        **kw: Any,
    ) -> RowState:
        """A fresh row; the limits default to the configuration's (`kw`: RowState's bias, top_n)."""
        return RowState(
            self.pair.tokenizer,
            self.eos,
            self.cfg.stop if stop is None else stop,
            self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
            on_commit,
            **kw,
        )

    def run(self, batch: Batch) -> tuple[list[RowState], DecodeStats]:
        pair, cfg, head = self.pair, self.cfg, self.head
        if cfg.info.path == "llm-alone":
            return decode_reference(pair.require_llm(), None, batch, role="llm")
        if cfg.info.path == "local":
            assert head is not None
            scorer = pair.scorer if cfg.local_mode == "decoupled" else None
            if cfg.local_mode == "decoupled" and scorer is None:
                raise S2TError(
                    "decoupled S2T-Local needs the selector loaded unmerged: "
                    "apply_selector(pair, path, mode='decoupled')"
                )
            return decode_local(pair.slm, scorer, head, batch, fast=cfg.fast)
        if self.path == "draft-verify":
            return decode_draft_verify(pair.slm, pair.require_llm(), batch, draft_len=cfg.draft_len)
        with hidden_kept(pair.slm, self.policy.trigger.needs_hidden, "the learned trigger"):
            if self.path == "lazy-llm":
                return decode_lazy(pair.slm, pair.require_llm(), batch)
            return decode_reference(pair.slm, pair.llm if batch.policy.needs_llm else None, batch)


@contextmanager
def hidden_kept(backend: Backend, wanted: bool, why: str) -> Iterator[None]:
    """`backend` keeps its final hidden states for the duration when `wanted` (and as before after it)."""
    before = backend.want_hidden
    if wanted:
        backend.require("hidden_states", why)
        backend.want_hidden = True
    try:
        yield
    finally:
        backend.want_hidden = before


def generate(
    pair: ModelPair,
    prompts: list[str] | str,
    config: DecodeConfig | None = None,
    batch_size: int = 8,
    row_seeds: list | None = None,
    prompt_ids: list[list[int]] | None = None,
    on_commit: Callable[[RowState], None] | None = None,
    trigger: Trigger | None = None,
    recorder: StepRecorder | None = None,
    on_finish: Callable[[int, Generation], None] | None = None,
    continuous: bool = True,
    **overrides: Any,
) -> GenerateResult:
    """Decode `prompts` with the configured policy. Batched output equals unbatched output.

    With more prompts than `batch_size` > 1 and `continuous` (on engines that admit rows mid-batch), a finished
    row's slot takes the next prompt at once (decoding.offline); otherwise prompts go in fixed batches.
    `on_finish(i, generation)` is called as prompt i's row finishes.
    `recorder` (decoding.record) sees every committed step: its row (the prompt's index), step, token,
    both models' log-probs, the trigger statistic, whether it fired, and (if it `wants_hidden`) the SLM's
    final hidden state. The SLM-proposer paths support it (reference, draft-verify, lazy-llm)."""
    cfg = config or DecodeConfig(**overrides)
    if isinstance(prompts, str):
        prompts = [prompts]
    dec = Decoder(pair, cfg, trigger)
    if recorder is not None and cfg.info.path in ("local", "llm-alone"):
        raise S2TError(f"recording decode steps is not supported for policy {cfg.policy}")
    encoded = prompt_ids if prompt_ids is not None else encode_prompts(pair.tokenizer, prompts, cfg.chat_template)
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise S2TError(f"prompt {empty[0]} has no tokens: there is nothing to decode from")
    seeds = row_seeds if row_seeds is not None else list(range(len(encoded)))
    refill = (  # batch 1 decodes each prompt alone, in a fresh cache
        continuous and 1 < batch_size < len(encoded) and all(b.capabilities.admission for b in dec.backends)
    )
    with hidden_kept(pair.slm, recorder is not None and recorder.wants_hidden, "recording hidden states"):
        if refill:
            queue = PromptQueue(encoded, seeds, lambda: dec.row(on_commit=on_commit), on_finish)
            gens, total = _continuous(dec, queue, batch_size, recorder)
        else:
            gens, total = _fixed(dec, encoded, seeds, batch_size, on_commit, on_finish, recorder)
    return GenerateResult([g.text for g in gens], gens, total, cfg, dec.path)


def _fixed(
    dec: Decoder,
    encoded: list[list[int]],
    seeds: list,
    size: int,
    on_commit: Callable[[RowState], None] | None,
    on_finish: Callable[[int, Generation], None] | None,
    recorder: StepRecorder | None,
) -> tuple[list[Generation], DecodeStats]:
    """The prompts in consecutive batches of `size`, each decoded to its last row's end."""
    total, gens = DecodeStats(), []
    for start in range(0, len(encoded), size):
        chunk = encoded[start : start + size]
        rec = Offset(recorder, start) if recorder is not None else None
        rows = [dec.row(on_commit=on_commit) for _ in chunk]
        rows, st = dec.run(Batch(chunk, dec.vocab, dec.policy, rows, seeds[start : start + size], dec.pad_id, rec))
        for r in rows:
            gens.append(r.finish())
            if on_finish is not None:
                on_finish(len(gens) - 1, gens[-1])
        total = total + st
    return gens, total


def _continuous(
    dec: Decoder, queue: PromptQueue, size: int, recorder: StepRecorder | None
) -> tuple[list[Generation], DecodeStats]:
    """Every prompt of `queue` through one continuous batch of `size` slots."""

    def make(prompts: list[list[int]], rows: list[RowState], seeds: list) -> Batch:
        return Batch(prompts, dec.vocab, dec.policy, rows, seeds, dec.pad_id)

    rows, stats = dec.run(queue.batch(size, make, recorder))
    for row in rows:
        if not row.vacant:
            queue.leave(row)
    gens = [queue.done[i] for i in range(len(queue.prompts))]
    return gens, stats.with_rows(gens)  # the loop counted only the rows still in the batch at its end
