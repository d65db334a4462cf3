"""`s2t serve`: an OpenAI-compatible HTTP server (FastAPI) in front of one decode worker (`worker.py`).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming over SSE with
`"stream": true`), GET /health, GET /metrics (Prometheus text).

S2T settings are extra body fields, defaulting to the server's options: `policy`, `k`, `trigger`,
`threshold` or `calibration` (the name of a threshold file given as `--calibration NAME=FILE`), `reverse_kl`,
`warmup`. `temperature` 0 decodes greedily; above 0 samples, which only the SLM alone does (policy sample).
Every response carries OpenAI's `usage` and an `s2t` object: the request's decode statistics
(`DecodeStats.to_dict`: its rows' forwards are the model calls they took part in), policy and path.
Streams end with a chunk without choices that carries `s2t` (and `usage` with
`stream_options.include_usage`). Errors are OpenAI's body {"error": {"message", "type", "param", "code"}}:
400 for a bad request, 429 when more rows would wait than --max-queue, 500 when the decode failed (that
request only: the worker goes on). A client that disconnects frees its rows at their next step.

The remote-LLM contract. /v1/completions also serves another s2t process as its LLM, the way vLLM's
OpenAI server does, so one client works against both:
- `prompt`: a string, a list of token ids, or a list of either (one choice per prompt, `index` in order);
  strings are tokenized raw (no chat template, special tokens as the tokenizer adds them);
- `max_tokens` (default 16), `temperature` (0 = greedy), `stop`, `seed`;
- `logprobs: int`: per generated token its log-prob and the top-n, as legacy completions'
  `choices[i].logprobs` = {tokens, token_logprobs, top_logprobs, text_offset};
- `return_tokens_as_token_ids: true`: tokens (and `top_logprobs` keys) written "token_id:123";
- `allowed_token_ids: [ids]`: the token is chosen among these ids only; `logit_bias: {"id": bias}` is added
  to the logits (clamped to [-100, 100]); log-probs are those after the restriction and the bias;
- `prompt_logprobs: int` (vLLM's extension): `choices[i].prompt_logprobs` = [None, then per prompt position
  {"token_id": {"logprob", "rank", "decoded_token"}} holding the prompt's token and the top-n], the model's
  raw distribution (no bias), scored on a second cache of the same weights;
- `echo` is not supported.
Log-probs, `allowed_token_ids`, `logit_bias` and `prompt_logprobs` are those of the model that proposes every
token, so they need a single-model policy: greedy or sample (the SLM, or the one model of `s2t serve --model
NAME`) or llm (the LLM alone: `s2t serve --slm A --llm B --policy llm`). There, a request with `max_tokens: 1`,
`temperature: 0` and `allowed_token_ids: [...]` returns the argmax of the model's logits restricted to those ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..backends.pair import ModelPair
from ..decoding.api import Decoder
from ..decoding.config import DecodeConfig
from ..decoding.state import DecodeStats
from ..decoding.triggers import Trigger
from ..errors import S2TError
from ..models.chat import encode_chat, encode_prompts
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, Sampling, error_body
from .render import FINISH, Tokens, chat_choice, completion_choice, envelope, new_id, usage
from .settings import Resolver, ServeConfig, single_model
from .worker import Job, QueueFull, RowOptions, Worker

MAX_DECODERS = 64  # configurations kept ready (a queued job holds its own, so forgetting one is safe)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        code = {429: "rate_limit_exceeded"}.get(self.status)
        return JSONResponse(error_body(self.message, self.type, self.param, code), status_code=self.status)


class Disconnected(Exception):
    """The client went away while its request was decoding."""


class Service:
    """The models, the request resolution and the worker, shared by the routes."""

    def __init__(self, pair: ModelPair, config: ServeConfig):
        self.pair, self.config = pair, config
        self.resolver = Resolver(config, pair)
        self.worker = Worker(config.max_batch, config.max_queue)
        self.metrics = Metrics(self.worker.queued, self.worker.active)
        self.worker.on_batch = self.metrics.batch
        self.decoders: dict[str, Decoder] = {}

    # -- a request into a job ---------------------------------------------------------------------------
    def decoder(self, cfg: DecodeConfig, learned: Trigger | None) -> tuple[Decoder, str]:
        """One Decoder per batch configuration; rows of a batch may differ only in RowOptions."""
        key = repr(replace(cfg, max_new_tokens=1, stop=(), chat_template=True)) + f"/{id(learned)}"
        if key not in self.decoders:
            if len(self.decoders) >= MAX_DECODERS:  # requests may vary thresholds freely: forget the oldest
                self.decoders.pop(next(iter(self.decoders)))
            self.decoders[key] = Decoder(self.pair, cfg, learned)
        return self.decoders[key], key

    def job(
        self,
        body: Sampling,
        prompts: list[list[int]],
        chat: bool,
        max_new: int,
        top_n: int | None,
        prompt_top_n: int | None,
    ) -> tuple[Job, asyncio.Queue]:
        if body.n != 1:
            raise S2TError(f"n must be 1, got {body.n}")
        cfg, learned = self.resolver.resolve(
            body.s2t(),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            max_new_tokens=max_new,
            stop=body.stops(),
            chat_template=chat,
        )
        for what, asked in (
            ("log-probs", top_n is not None),
            ("prompt_logprobs", prompt_top_n is not None),
            ("logit_bias", bool(body.logit_bias)),
            ("allowed_token_ids", body.allowed_token_ids is not None),
        ):
            if asked:
                single_model(cfg, what)
        most = max(top_n or 0, prompt_top_n or 0)
        if most > self.config.max_logprobs:
            raise S2TError(f"at most {self.config.max_logprobs} log-probs per token, got {most}")
        dec, key = self.decoder(cfg, learned)
        self.check_lengths(dec, prompts, max_new)
        options = RowOptions(max_new, body.stops(), self.bias(body), top_n, prompt_top_n)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def post(event: tuple) -> None:  # from the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        return Job(dec, key, prompts, options, post, stream=body.stream), queue

    def bias(self, body: Sampling) -> torch.Tensor | None:
        """Additive logits [V]: -inf outside `allowed_token_ids`, plus `logit_bias`."""
        if body.allowed_token_ids is None and not body.logit_bias:
            return None
        size = self.pair.vocab_size
        banned = set(self.pair.banned_ids)
        bias = torch.zeros(size)
        if body.allowed_token_ids is not None:
            if not body.allowed_token_ids:
                raise HTTPError(400, "allowed_token_ids must not be empty", param="allowed_token_ids")
            self.check_ids(body.allowed_token_ids, "allowed_token_ids")
            if set(body.allowed_token_ids) <= banned:
                raise HTTPError(400, "allowed_token_ids holds only reserved ids", param="allowed_token_ids")
            bias.fill_(float("-inf"))
            bias[body.allowed_token_ids] = 0.0
        for key, value in (body.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise HTTPError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            self.check_ids([token], "logit_bias")
            bias[token] += max(-100.0, min(100.0, value))
        return bias

    def check_ids(self, ids: list[int], param: str) -> None:
        size = self.pair.vocab_size
        bad = [t for t in ids if not 0 <= t < size]
        if bad:
            raise HTTPError(400, f"token id {bad[0]} is outside the vocabulary [0, {size})", param=param)

    def check_lengths(self, dec: Decoder, prompts: list[list[int]], max_new: int) -> None:
        limits = [b.context_length for b in dec.backends if b.context_length]
        if limits:
            longest = max(len(p) for p in prompts)
            if longest + max_new > min(limits):
                raise HTTPError(
                    400,
                    f"the prompt ({longest} tokens) plus max_tokens ({max_new}) exceed the model's context of "
                    f"{min(limits)} tokens",
                    param="max_tokens",
                )

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """`prompt` as token ids per prompt: a string, a list of ids, or a list of either."""
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise HTTPError(400, "prompt must not be empty", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                out.extend(encode_prompts(self.pair.tokenizer, [item], chat_template=False))
            else:
                if not item:
                    raise HTTPError(400, "a token-id prompt must not be empty", param="prompt")
                self.check_ids(item, "prompt")
                out.append(list(item))
        return out

    def chat_prompt(self, body: ChatRequest) -> list[list[int]]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise HTTPError(400, "the messages hold no text", param="messages")
        return [encode_chat(self.pair.tokenizer, messages)]

    def submit(self, job: Job) -> None:
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise HTTPError(429, str(e), "rate_limit_error") from None

    def s2t(self, job: Job, stats: DecodeStats) -> dict:
        cfg = job.decoder.cfg
        return {
            **stats.to_dict(),
            "policy": cfg.policy,
            "path": job.decoder.path,
            "k": cfg.k,
            "trigger": cfg.trigger,
            "threshold": cfg.threshold,
        }


async def next_event(queue: asyncio.Queue, request: Request, job: Job) -> tuple:
    """The job's next event; a client that left cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise Disconnected() from None


def sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(pair: ModelPair, config: ServeConfig | None = None) -> FastAPI:
    service = Service(pair, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        service.worker.stop()

    app = FastAPI(title="select2think", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        service.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return e.response()

    @app.exception_handler(S2TError)
    async def _user_error(request: Request, e: S2TError) -> JSONResponse:
        return await _http_error(request, HTTPError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return await _http_error(request, HTTPError(400, message, param=".".join(loc) or None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return await _http_error(request, HTTPError(500, f"{type(e).__name__}: {e}", "server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = service.worker.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "worker stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        name = service.config.model_name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "select2think"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.echo:
            raise HTTPError(400, "echo is not supported", param="echo")
        prompts = service.completion_prompts(body.prompt)
        max_new = body.max_tokens or 16
        job, queue = service.job(body, prompts, False, max_new, body.logprobs, body.prompt_logprobs)
        tokens = Tokens(pair.tokenizer, body.return_tokens_as_token_ids)

        def choice(i: int, done: Any) -> dict:
            return completion_choice(i, done, tokens, body.logprobs is not None, body.prompt_logprobs is not None)

        def chunk(i: int, text: str, token: int | None, entry: Any, finish: str | None) -> dict:
            lp = tokens.completion([token], [entry]) if entry is not None and token is not None else None
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        return await respond("text_completion", "cmpl", body, request, job, queue, choice, chunk)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        prompts = service.chat_prompt(body)
        max_new = body.max_completion_tokens or body.max_tokens or service.config.max_new_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        job, queue = service.job(body, prompts, True, max_new, top_n, None)
        tokens = Tokens(pair.tokenizer)

        def choice(i: int, done: Any) -> dict:
            return chat_choice(i, done, tokens, body.logprobs)

        def chunk(i: int, text: str, token: int | None, entry: Any, finish: str | None) -> dict:
            lp = tokens.chat([token], [entry]) if entry is not None and token is not None else None
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": finish}

        return await respond("chat.completion", "chatcmpl", body, request, job, queue, choice, chunk)

    async def respond(kind, prefix, body, request, job, queue, choice, chunk):
        t0 = time.perf_counter()
        rid, model = new_id(prefix), service.config.model_name
        prompt_tokens = sum(len(p) for p in job.prompts)
        endpoint = request.url.path
        service.submit(job)

        def closing(gens: list) -> tuple[dict, DecodeStats]:
            stats = DecodeStats.of_rows(gens, time.perf_counter() - t0)
            service.metrics.finished(endpoint, prompt_tokens, stats)
            return usage(prompt_tokens, stats.generated_tokens), stats

        if not body.stream:
            done: dict[int, Any] = {}
            try:
                while len(done) < len(job.prompts):
                    event = await next_event(queue, request, job)
                    if event[0] == "error":
                        raise HTTPError(event[1], event[2], "server_error")
                    if event[0] == "done":
                        done[event[1]] = event[2]
            except Disconnected:
                service.metrics.cancelled.inc()
                return Response(status_code=499)
            use, stats = closing([done[i].gen for i in range(len(done))])
            choices = [choice(i, done[i]) for i in range(len(done))]
            return envelope(kind, rid, model, choices, usage=use, s2t=service.s2t(job, stats))

        chunk_kind = kind + ".chunk" if kind == "chat.completion" else kind

        async def events() -> AsyncIterator[str]:
            gens: dict[int, Any] = {}
            finished = False
            try:
                if kind == "chat.completion":
                    for i in range(len(job.prompts)):
                        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield sse(envelope(chunk_kind, rid, model, [first]))
                while len(gens) < len(job.prompts):
                    event = await queue.get()
                    if event[0] == "error":
                        yield sse(error_body(event[2], "server_error"))
                        finished = True
                        return
                    if event[0] == "token":
                        _, i, text, token, entry = event
                        if text or entry is not None:
                            yield sse(envelope(chunk_kind, rid, model, [chunk(i, text, token, entry, None)]))
                    else:
                        _, i, fin, rest = event
                        gens[i] = fin.gen
                        reason = FINISH.get(fin.gen.finish_reason, fin.gen.finish_reason)
                        yield sse(envelope(chunk_kind, rid, model, [chunk(i, rest, None, None, reason)]))
                use, stats = closing([gens[i] for i in range(len(gens))])
                extra: dict[str, Any] = {"s2t": service.s2t(job, stats)}
                if body.stream_options is not None and body.stream_options.include_usage:
                    extra["usage"] = use
                yield sse(envelope(chunk_kind, rid, model, [], **extra))
                yield sse("[DONE]")
                finished = True
            finally:
                if not finished:  # the client left mid-stream: its rows stop at their next step
                    job.cancel()
                    service.metrics.cancelled.inc()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
