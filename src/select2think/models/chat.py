"""Text in and out of token ids: the chat template and the EOS ids, in one place for every engine."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import S2TError

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def eos_ids(tokenizer, model_eos: Iterable[int | list[int] | None] = ()) -> frozenset[int]:
    """EOS ids from the tokenizer, the models' own EOS settings and the chat end markers it knows."""
    ids: set[int | None] = {tokenizer.eos_token_id}
    for eos in model_eos:
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for marker in END_MARKERS:
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return frozenset(i for i in ids if i is not None)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ({"role", "content"} turns) ready for the assistant's reply: the chat
    template when the tokenizer has one, else the turns' contents as raw text, one blank line apart."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids per prompt: a user turn in the chat template (when the tokenizer has one), else raw text."""
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise S2TError("empty prompt: every prompt must contain text")
        if chat_template:
            out.append(encode_chat(tokenizer, [{"role": "user", "content": p}]))
        else:
            out.append(list(tokenizer(p, add_special_tokens=True)["input_ids"]))
    return out
