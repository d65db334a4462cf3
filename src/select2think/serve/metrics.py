"""Prometheus counters for /metrics, in a registry of the app's own (several apps may live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..decoding.state import DecodeStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, queued: Callable[[], int], running: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "s2t_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("s2t_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("s2t_generated_tokens", "Tokens generated for finished requests", registry=r)
        self.triggers = Counter("s2t_triggers", "Steps where the trigger fired", registry=r)
        self.flips = Counter("s2t_flips", "Emitted tokens that differ from the SLM's top-1", registry=r)
        self.cancelled = Counter("s2t_cancelled_requests", "Requests whose client left before the end", registry=r)
        self.slm_forwards = Counter("s2t_slm_forwards", "SLM model calls (one call serves a batch)", registry=r)
        self.llm_forwards = Counter("s2t_llm_forwards", "LLM model calls (one call serves a batch)", registry=r)
        self.llm_tokens = Counter("s2t_llm_tokens", "Tokens the LLM processed", registry=r)
        self.latency = Histogram(
            "s2t_request_latency_seconds",
            "Time from request to last token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Gauge("s2t_queued_rows", "Prompts waiting for a row of the batch", registry=r).set_function(queued)
        Gauge("s2t_running_rows", "Rows decoding now", registry=r).set_function(running)

    def finished(self, endpoint: str, prompt_tokens: int, stats: DecodeStats) -> None:
        """A request that completed: its tokens, triggers and latency."""
        self.requests.labels(endpoint, "200").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.triggers.inc(stats.triggers)
        self.flips.inc(stats.flips)
        self.latency.labels(endpoint).observe(stats.wall_time_s)

    def batch(self, stats: DecodeStats) -> None:
        """A decode batch ended: the model calls it made (shared by its rows, so counted here, not per request)."""
        self.slm_forwards.inc(stats.slm_forwards)
        self.llm_forwards.inc(stats.llm_forwards)
        self.llm_tokens.inc(stats.llm_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)
