"""Whether a small and a large model can form a pair: one tokenizer, and rows to reserve for S2T-Local."""

from __future__ import annotations

from typing import Any

from ..errors import S2TError

N_RESERVED = 16


def tokenizer_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens).

    GGUF files pad the vocabulary to the embedding size with placeholder tokens named `[PAD<id>]`;
    those trailing placeholders are padding rows, not real tokens, and are not counted.
    """
    cached = getattr(tokenizer, "_s2t_size", None)
    if cached is not None:
        return cached
    n = len(tokenizer)
    while n > 0 and tokenizer.convert_ids_to_tokens(n - 1) == f"[PAD{n - 1}]":
        n -= 1
    tokenizer._s2t_size = n
    return n


def first_token_mismatch(tok_a: Any, tok_b: Any) -> tuple[int, str | None, str | None] | None:
    """The first id below both tokenizers' sizes at which they differ, or None if they agree.

    Sizes may differ only if one is a prefix of the other; then the first extra id is the mismatch.
    """
    n_a, n_b = tokenizer_size(tok_a), tokenizer_size(tok_b)
    ids = list(range(max(n_a, n_b)))
    a = tok_a.convert_ids_to_tokens(ids[:n_a]) + [None] * (len(ids) - n_a)
    b = tok_b.convert_ids_to_tokens(ids[:n_b]) + [None] * (len(ids) - n_b)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i, x, y
    return None


def pick_reserved_ids(tokenizer: Any, embedding_rows: int, n: int = N_RESERVED) -> tuple[int, ...] | None:
    """Ids for S2T-Local's score head: unused padding rows first, else unused special tokens.

    Padding rows (ids >= tokenizer size) are never produced by the tokenizer. Special tokens are
    usable when they are not BOS/EOS/PAD/UNK and do not appear in the chat template.
    """
    size = tokenizer_size(tokenizer)
    padding = list(range(size, embedding_rows))
    if len(padding) >= n:
        return tuple(padding[:n])
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = tokenizer.chat_template or "" if isinstance(tokenizer.chat_template, (str, type(None))) else ""
    specials = []
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        tid = tokenizer.convert_tokens_to_ids(token.content)
        if token.special and tid not in used and token.content not in template and tid < embedding_rows:
            specials.append(tid)
    candidates = padding + sorted(specials, reverse=True)
    return tuple(candidates[:n]) if len(candidates) >= n else None


def check_tokenizers(slm_name: str, slm_tok: Any, llm_name: str, llm_tok: Any) -> None:
    """Raise S2TError naming the first differing id if the tokenizers disagree."""
    mismatch = first_token_mismatch(slm_tok, llm_tok)
    if mismatch is not None:
        i, a, b = mismatch
        raise S2TError(
            f"tokenizers differ: id {i} is {a!r} in {slm_name} but {b!r} in {llm_name} "
            f"(sizes {tokenizer_size(slm_tok)} vs {tokenizer_size(llm_tok)}); S2T needs a shared tokenizer"
        )
