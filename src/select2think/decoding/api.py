"""`generate`: prompts in, texts and statistics out, through the reference loop or a fast path."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import S2TError
from ..models.pair import ModelPair
from .config import DecodeConfig
from .fast import decode_draft_verify, decode_lazy
from .local_loop import decode_local
from .local_scorer import require_reserved
from .loop import decode_reference
from .policy import Policy
from .state import DecodeStats, Generation, RowState


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


def eos_ids(pair: ModelPair, extra=()) -> set[int]:
    """EOS ids from the tokenizer, both models' generation configs, and chat end markers."""
    tok = pair.tokenizer
    ids = {tok.eos_token_id} | set(extra)
    for model in (pair.slm, pair.llm):
        cfg = getattr(model, "generation_config", None) if model is not None else None
        eos = getattr(cfg, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return {i for i in ids if i is not None}


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise S2TError("empty prompt: every prompt must contain text")
        if chat_template and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        out.append(list(ids))
    return out


def path_for(cfg: DecodeConfig, policy: Policy) -> str:
    if cfg.policy == "s2t-local":
        return ("local-tree" if cfg.fast else "local-reference") + (
            "-decoupled" if cfg.local_mode == "decoupled" else ""
        )
    if not cfg.fast or cfg.policy in ("greedy", "sample", "llm"):
        return "reference"
    return "draft-verify" if policy.trigger.needs_llm else "lazy-llm"


def generate(
    pair: ModelPair,
    prompts: list[str] | str,
    config: DecodeConfig | None = None,
    batch_size: int = 8,
    row_seeds: list | None = None,
    prompt_ids: list[list[int]] | None = None,
    on_commit=None,
    trigger=None,
    **overrides,
) -> GenerateResult:
    """Decode `prompts` with the configured policy. Batched output equals unbatched output."""
    cfg = config or DecodeConfig(**overrides)
    if isinstance(prompts, str):
        prompts = [prompts]
    if cfg.uses_llm:
        pair.require_llm()
    policy = Policy.from_config(cfg, trigger)  # `trigger`: a ready object (e.g. a learned head)
    encoded = prompt_ids if prompt_ids is not None else encode_prompts(pair.tokenizer, prompts, cfg.chat_template)
    seeds = row_seeds if row_seeds is not None else list(range(len(encoded)))
    eos = eos_ids(pair, cfg.extra_eos)
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else min(eos)
    path = path_for(cfg, policy)

    def make_row():
        return RowState(pair.tokenizer, eos, cfg.stop, cfg.max_new_tokens, on_commit)

    total = DecodeStats()
    gens: list[Generation] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        chunk_seeds = seeds[start : start + batch_size]
        common = (pair.tokenizer, pair.vocab_size, pair.banned_ids, chunk, policy, make_row, chunk_seeds, pad_id)
        if cfg.policy == "llm":
            rows, st = decode_reference(pair.llm, None, *common)
            st.llm_forwards, st.llm_tokens, st.slm_forwards, st.slm_tokens = st.slm_forwards, st.slm_tokens, 0, 0
            for r in rows:  # the proposer was the LLM
                g = r.gen
                g.llm_forwards, g.llm_tokens, g.slm_forwards, g.slm_tokens = g.slm_forwards, g.slm_tokens, 0, 0
        elif cfg.policy == "s2t-local":
            rows, st = decode_local(
                pair.slm,
                pair.vocab_size,
                pair.banned_ids,
                require_reserved(pair),
                chunk,
                policy,
                make_row,
                chunk_seeds,
                pad_id,
                k=cfg.k,
                fast=cfg.fast,
                mode=cfg.local_mode,
                prior_weight=pair.selector_prior,
            )
        elif path == "reference":
            rows, st = decode_reference(pair.slm, pair.llm if policy.needs_llm else None, *common)
        elif path == "draft-verify":
            rows, st = decode_draft_verify(pair.slm, pair.llm, *common, draft_len=cfg.draft_len)
        else:
            rows, st = decode_lazy(pair.slm, pair.llm, *common)
        gens.extend(r.finish() for r in rows)
        for f in (
            "slm_forwards",
            "llm_forwards",
            "slm_tokens",
            "llm_tokens",
            "generated_tokens",
            "triggers",
            "flips",
            "hits",
            "hit_checked",
            "wall_time_s",
        ):
            setattr(total, f, getattr(total, f) + getattr(st, f))
    return GenerateResult([g.text for g in gens], gens, total, cfg, path)
