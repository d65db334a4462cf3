"""JSON over HTTP to a model server: time-outs, retries with exponential back-off, one-line errors.

Connection errors, time-outs, 5xx and 429 are retried (the server restarting, a load balancer, a full
queue); any other 4xx is the request's fault and raises `HTTPRefused` at once. Nothing here knows what
the requests mean (backends/remote.py does).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import S2TError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class HTTPRefused(S2TError):
    """The server answered a 4xx other than 429: retrying the same request cannot help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 120.0  # per request: a cold 2k-token prefix on a CPU server takes tens of seconds
    retries: int = 4  # after the first try
    backoff_s: float = 0.5  # waits 0.5, 1, 2, 4 s between tries (or the server's Retry-After, if longer)

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise S2TError(f"the LLM server time-out must be > 0 s, got {self.timeout_s}")
        if not 0 <= self.retries <= 20:
            raise S2TError(f"LLM server retries must be between 0 and 20, got {self.retries}")
        if self.backoff_s < 0:
            raise S2TError(f"the LLM server back-off must be >= 0 s, got {self.backoff_s}")


def check_url(url: str) -> str:
    """The base URL without a trailing slash, after refusing what cannot be one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise S2TError(f"--llm-url must look like http://HOST:PORT/v1, got {url!r}")
    return url.rstrip("/")


def _one_line(resp: httpx.Response) -> str:
    """The server's own error message (OpenAI, vLLM and FastAPI shapes), on one short line."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text
    else:
        err = body.get("error", body) if isinstance(body, dict) else body
        text = err.get("message") or err.get("detail") or str(err) if isinstance(err, dict) else str(err)
    text = " ".join(str(text).split())
    return f"HTTP {resp.status_code}" + (f": {text[:200]}" if text else "")


def _wait(policy: RetryPolicy, attempt: int, resp: httpx.Response | None) -> float:
    wait = policy.backoff_s * 2**attempt
    after = resp.headers.get("retry-after", "") if resp is not None else ""
    return max(wait, min(float(after), 60.0)) if after.replace(".", "", 1).isdigit() else wait


class JSONClient:
    """GET and POST JSON under one base URL; `requests` counts every request sent (retries included)."""

    def __init__(self, base_url: str, policy: RetryPolicy):
        self.base = check_url(base_url)
        self.policy = policy
        # a host that drops packets fails fast at connect; answers may take long (a cold prefix on a CPU)
        timeout = httpx.Timeout(policy.timeout_s, connect=min(policy.timeout_s, 10.0))
        self.http = httpx.Client(timeout=timeout)
        self.requests = 0
        self._lock = threading.Lock()  # `requests` is bumped from the concurrent selection threads

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: dict) -> Any:
        return self.call("POST", path, body)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """The decoded JSON answer; `path` is under the base URL, or absolute (http://...)."""
        url = path if "://" in path else self.base + path
        problem = ""
        for attempt in range(self.policy.retries + 1):
            with self._lock:
                self.requests += 1
            resp = None
            try:
                resp = self.http.request(method, url, json=body)
            except httpx.TransportError as e:  # refused, reset, DNS, time-out
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if resp.status_code not in RETRY_STATUS:
                    return self._answer(resp, url)
                problem = _one_line(resp)
            if attempt < self.policy.retries:
                time.sleep(_wait(self.policy, attempt, resp))
        tries = self.policy.retries + 1
        raise S2TError(f"cannot reach the LLM server at {url}: {problem} ({tries} {'try' if tries == 1 else 'tries'})")

    def _answer(self, resp: httpx.Response, url: str) -> Any:
        if resp.is_error:
            raise HTTPRefused(f"the LLM server at {url} refused the request: {_one_line(resp)}", resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise S2TError(f"the LLM server at {url} answered something that is not JSON: {resp.text[:80]!r}") from None

    def close(self) -> None:
        self.http.close()
