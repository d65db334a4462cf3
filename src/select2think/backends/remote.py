"""The LLM on another machine, behind an OpenAI-compatible completions server (vLLM, `s2t serve`).

A selection-only engine (`Capabilities.selection_only`): it keeps each row's token ids and no KV cache (the
server's prefix cache holds that) and answers `select` with one completions request per asked row: the
row's whole prefix as token ids, max_tokens=1 at temperature 0, restricted to the row's K candidates by
`allowed_token_ids` (vLLM's extension) or else a +100 `logit_bias`, with `return_tokens_as_token_ids` so the
answer names the id. Both restrictions apply to a whole request, and each row has its own candidates, so
rows asked at the same step go as concurrent requests: one round trip of latency per trigger step.
No `prompt_logprobs` and no `echo`: vLLM skips its prefix cache for a request that wants prompt log-probs.
Exact ties (rare in floating point) go by the server's rule (vLLM: the lower id), not to the higher SLM rank.

Costs: `forwards` counts the steps that asked the server (one round trip each), `requests` the HTTP
requests (one per asked row, retries included), `tokens` / `row_tokens` the prompt tokens the server
computed: prompt_tokens - cached_tokens where it reports its cache hits (vLLM with
--enable-prompt-tokens-details), else the tokens the row gained since its last request (a prefix cache
hit's work, and what the in-process lazy LLM processes). `sent_tokens` counts every prompt token sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import S2TError
from .base import Backend, Capabilities
from .http import HTTPRefused, JSONClient, RetryPolicy, check_url

RESTRICTIONS = ("auto", "allowed_token_ids", "logit_bias")
BIAS = 100  # OpenAI's largest logit bias; every answer is checked to lie among the candidates anyway
# the tokenizer probe: digits, code, accents, CJK, Cyrillic and maths, so two different vocabularies part ways
PROBE = "Select to Think: 12 + 30 = 42, x² ≥ 0.\ndef f(n):\n    return n * (n - 1)  # café 東京 Привет. The answer is"


@dataclass(frozen=True)
class RemoteConfig:
    url: str  # the OpenAI base URL, http://HOST:PORT/v1
    model: str | None = None  # the served model's name; None: the server's only model
    restrict: str = "auto"  # auto: allowed_token_ids where the server honours it, else logit_bias
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    workers: int = 16  # concurrent requests when several rows are asked at one step

    def __post_init__(self) -> None:
        check_url(self.url)
        if self.restrict not in RESTRICTIONS:
            raise S2TError(f"unknown token restriction {self.restrict!r}: use one of {', '.join(RESTRICTIONS)}")
        if not 1 <= self.workers <= 256:
            raise S2TError(f"remote workers must be between 1 and 256, got {self.workers}")


def picked_id(answer: Any, url: str) -> int:
    """The token id a completions answer names ("token_id:123", from return_tokens_as_token_ids)."""
    try:
        token = answer["choices"][0]["logprobs"]["tokens"][0]
        if isinstance(token, str) and token.startswith("token_id:"):
            return int(token.removeprefix("token_id:"))
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    raise S2TError(
        f"the LLM server at {url} does not name the chosen token's id (return_tokens_as_token_ids with "
        "logprobs): S2T needs an OpenAI-compatible server that does, such as vLLM or `s2t serve`"
    )


@dataclass
class Completions:
    """One-token completions of token-id prompts, optionally restricted to candidate ids."""

    client: JSONClient
    model: str
    restrict: str = "allowed_token_ids"

    def body(self, prompt: list[int], cands: list[int] | None) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,  # the chosen token by id; not K: vLLM caps logprobs at --max-logprobs (20)
            "return_tokens_as_token_ids": True,
        }
        if cands is not None and self.restrict == "allowed_token_ids":
            body["allowed_token_ids"] = cands
        elif cands is not None:
            body["logit_bias"] = {str(c): BIAS for c in cands}
        return body

    def ask(self, prompt: list[int], cands: list[int] | None) -> tuple[int, dict]:
        """(the id the server chose, its whole answer)."""
        answer = self.client.post("/completions", self.body(prompt, cands))
        return picked_id(answer, self.client.base), answer


def served_model(client: JSONClient, name: str | None) -> str:
    """`name` after checking the server serves it (None: the server's only model)."""
    body = client.get("/models")
    data = body.get("data") if isinstance(body, dict) else None
    ids = [m["id"] for m in data if isinstance(m, dict) and "id" in m] if isinstance(data, list) else []
    if name is None and len(ids) == 1:
        return ids[0]
    if name is not None and name in ids:
        return name
    served = ", ".join(ids) or "no model"
    pick = "pick one with --llm-model" if name is None else f"not {name!r}"
    raise S2TError(f"the LLM server at {client.base} serves {served}: {pick}")


def check_tokenizer(api: Completions, tokenizer: Any, probe: list[int]) -> int:
    """Refuse a server whose tokenizer differs from ours; return its unrestricted answer to the probe.

    vLLM's /tokenize (at the root, beside /v1) must give our ids for the probe text. A server without it
    gets a weaker check: its text for the token it answers must be our text for that id."""
    root = api.client.base.removesuffix("/v1")
    try:
        got = api.client.post(root + "/tokenize", {"model": api.model, "prompt": PROBE, "add_special_tokens": False})
    except HTTPRefused as e:
        if e.status not in (404, 405):
            raise
    else:
        theirs = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(theirs, list):
            raise S2TError(f"the LLM server at {api.client.base} answered /tokenize without a list of tokens")
        if theirs != probe:
            at = next((i for i, (a, b) in enumerate(zip(probe, theirs, strict=False)) if a != b), None)
            where = f"id {probe[at]} vs {theirs[at]} at token {at}" if at is not None else "lengths differ"
            raise S2TError(
                f"tokenizers differ: the LLM server at {api.client.base} ({api.model}) tokenizes a probe "
                f"otherwise than the SLM ({where}); S2T needs a shared tokenizer"
            )
    top, answer = api.ask(probe, None)
    text = answer["choices"][0].get("text")
    ours = tokenizer.decode([top], skip_special_tokens=True)
    # stripped: a SentencePiece token's leading space shows only in context; a partial UTF-8 byte proves nothing
    if isinstance(text, str) and text.strip() != ours.strip() and "\ufffd" not in ours + text:
        raise S2TError(
            f"tokenizers differ: the LLM server at {api.client.base} ({api.model}) writes id {top} as "
            f"{text!r}, the SLM's tokenizer as {ours!r}; S2T needs a shared tokenizer"
        )
    return top


def pick_restriction(api: Completions, probe: list[int], top: int) -> str:
    """allowed_token_ids where the server honours it, else logit_bias: each is tried on an id other than the
    unrestricted answer, which the answer must then move to (a server may ignore unknown fields)."""
    other = next(t for t in probe if t != top)
    for way in RESTRICTIONS[1:]:
        try:
            if Completions(api.client, api.model, way).ask(probe, [other])[0] == other:
                return way
        except HTTPRefused:
            continue
    raise S2TError(
        f"the LLM server at {api.client.base} restricts no answer to given ids (neither allowed_token_ids "
        "nor logit_bias worked): S2T needs one of them"
    )


def connect(cfg: RemoteConfig, tokenizer: Any, vocab_size: int) -> RemoteLLM:
    """Check the server (model served, same tokenizer, a working restriction) and return its backend."""
    client = JSONClient(cfg.url, cfg.retry)
    try:
        api = Completions(client, served_model(client, cfg.model))
        probe = tokenizer.encode(PROBE, add_special_tokens=False)
        top = check_tokenizer(api, tokenizer, probe)
        api.restrict = pick_restriction(api, probe, top) if cfg.restrict == "auto" else cfg.restrict
    except BaseException:
        client.close()
        raise
    return RemoteLLM(api, vocab_size, cfg.workers)


class RemoteLLM(Backend):
    """Rows of token ids on this side; selections by the server. Only successful answers change counters,
    and nothing a request does changes a row (rows change by extend, truncate and retire alone)."""

    name = "remote"
    capabilities = Capabilities(full_logits=False, selection_only=True)

    def __init__(self, api: Completions, vocab_rows: int, workers: int = 16):
        super().__init__(vocab_rows, hidden_size=0)
        self.api = api
        self.url = api.client.base
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s2t-remote")
        self.rows: list[list[int]] = []
        self.seen: list[int] = []  # per row: its length at its last answered request (what the server cached)
        self.sent_tokens = 0

    def reset(self, batch_size: int) -> None:
        self.rows = [[] for _ in range(batch_size)]
        self.seen = [0] * batch_size
        self.sent_tokens = 0
        self._reset_counters(batch_size)

    def length(self, row: int) -> int:
        return len(self.rows[row])

    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        """Append each row's live tokens [B, n]; there are no logits to return (`logits=False` only)."""
        if logits:
            self.require("full_logits", "reading the LLM's logits")
        for r in live.any(-1).nonzero().flatten().tolist():
            self.rows[r].extend(tokens[r][live[r]].tolist())
        return None

    def truncate(self, row: int, length: int) -> None:
        del self.rows[row][length:]
        self.seen[row] = min(self.seen[row], length)

    def retire(self, rows: Sequence[int]) -> None:
        for r in rows:
            self.rows[r] = []
            self.seen[r] = 0

    def select(self, rows: Sequence[int], cands: torch.Tensor) -> torch.Tensor:
        """Ask the server once per listed row (concurrently) for its choice among cands [R, K]."""
        rows, lists = list(rows), cands.tolist()
        prompts = [list(self.rows[r]) for r in rows]
        before = self.api.client.requests
        if len(rows) == 1:
            answers = [self.api.ask(prompts[0], lists[0])]
        else:
            answers = list(self.pool.map(self.api.ask, prompts, lists))  # the first failure raises here
        for (tok, _), c in zip(answers, lists, strict=True):
            if tok not in c:
                raise S2TError(
                    f"the LLM server at {self.url} chose id {tok}, not one of the candidates {c} "
                    f"(restricted by {self.api.restrict})"
                )
        self.requests += self.api.client.requests - before
        self._count(rows, [self._computed(r, len(p), a) for r, p, (_, a) in zip(rows, prompts, answers, strict=True)])
        return torch.tensor([tok for tok, _ in answers], dtype=torch.long, device=cands.device)

    def _computed(self, row: int, sent: int, answer: dict) -> int:
        """Prompt tokens the server computed for this row's request (module docstring); marks the row seen."""
        usage = answer.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        prompt = usage.get("prompt_tokens")
        done = prompt - cached if isinstance(cached, int) and isinstance(prompt, int) else sent - self.seen[row]
        self.seen[row] = sent
        self.sent_tokens += sent
        return max(done, 0)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.api.client.close()
