"""Request bodies of the OpenAI API (the fields this server reads; unknown ones are ignored, as OpenAI-compatible
servers do), vLLM's extensions, the S2T extra fields, and OpenAI's error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .settings import S2TFields


class S2TBody(S2TFields):
    """The S2T fields of a request body, beside OpenAI's own."""

    def s2t(self) -> S2TFields:
        return S2TFields(**self.model_dump(include=set(S2TFields.model_fields)))


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(S2TBody):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM: the token is chosen among these ids only

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM: tokens rendered "token_id:123"
    prompt_logprobs: int | None = Field(default=None, ge=0)  # vLLM


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
