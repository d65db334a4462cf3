"""Response bodies in OpenAI's shapes (and vLLM's, for its extensions): choices, log-probs, usage, chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .worker import Finished

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Tokens:
    """How token ids are written: their text, or "token_id:123" (vLLM's `return_tokens_as_token_ids`)."""

    def __init__(self, tokenizer: Any, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def name(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.text(token)

    # -- legacy completions: {tokens, token_logprobs, top_logprobs, text_offset} -------------------------
    def completion(self, ids: list[int], entries: list[tuple[float, list[tuple[int, float]]]], start: int = 0) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for token, (lp, top) in zip(ids, entries, strict=True):
            out["tokens"].append(self.name(token))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({**{self.name(t): v for t, v in top}, self.name(token): lp})
            out["text_offset"].append(offset)
            offset += len(self.text(token))
        return out

    # -- chat: {content: [{token, logprob, bytes, top_logprobs}]} ----------------------------------------
    def chat(self, ids: list[int], entries: list[tuple[float, list[tuple[int, float]]]]) -> dict:
        def one(token: int, lp: float) -> dict:
            name = self.name(token)
            return {"token": name, "logprob": lp, "bytes": list(name.encode("utf-8"))}

        return {
            "content": [
                {**one(t, lp), "top_logprobs": [one(u, v) for u, v in top]}
                for t, (lp, top) in zip(ids, entries, strict=True)
            ]
        }

    # -- vLLM's prompt_logprobs: None, then per position {"id": {logprob, rank, decoded_token}} ------------
    def prompt(self, scored: list[tuple[int, float, int, list[tuple[int, float]]]]) -> list[dict | None]:
        out: list[dict | None] = [None]
        for token, lp, rank, top in scored:
            entry = {str(token): {"logprob": lp, "rank": rank, "decoded_token": self.text(token)}}
            for j, (t, v) in enumerate(top):
                entry.setdefault(str(t), {"logprob": v, "rank": j + 1, "decoded_token": self.text(t)})
            out.append(entry)
        return out


def completion_choice(i: int, done: Finished, tokens: Tokens, logprobs: bool, prompt_logprobs: bool) -> dict:
    gen = done.gen
    choice: dict[str, Any] = {
        "index": i,
        "text": gen.text,
        "logprobs": tokens.completion(gen.token_ids, done.logprobs) if logprobs else None,
        "finish_reason": FINISH.get(gen.finish_reason, gen.finish_reason),
    }
    if prompt_logprobs:
        choice["prompt_logprobs"] = tokens.prompt(done.prompt_logprobs or [])
    return choice


def chat_choice(i: int, done: Finished, tokens: Tokens, logprobs: bool) -> dict:
    gen = done.gen
    return {
        "index": i,
        "message": {"role": "assistant", "content": gen.text},
        "logprobs": tokens.chat(gen.token_ids, done.logprobs) if logprobs else None,
        "finish_reason": FINISH.get(gen.finish_reason, gen.finish_reason),
    }
