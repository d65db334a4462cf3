"""Decoding configuration: one dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import S2TError

LOCAL_MODES = ("coupled", "decoupled")  # s2t-local: adapter generates and scores | adapter only scores


@dataclass(frozen=True)
class PolicyInfo:
    """What a policy is: the one table that config, CLI, eval and `generate` read."""

    default_trigger: str
    needs_llm: bool  # the LLM is loaded and runs
    selector: str  # what picks the token where the trigger fires
    path: str  # reference | llm-alone | fast (draft-verify if the trigger needs the LLM, else lazy-llm) | local


POLICIES: dict[str, PolicyInfo] = {
    "greedy": PolicyInfo("never", False, "slm-top1", "reference"),
    "sample": PolicyInfo("never", False, "sample", "reference"),
    "llm": PolicyInfo("never", True, "slm-top1", "llm-alone"),
    "takeover": PolicyInfo("kl", True, "llm-argmax", "fast"),
    "s2t": PolicyInfo("kl", True, "llm-restricted-argmax", "fast"),
    "s2t-local": PolicyInfo("entropy", False, "reserved-head", "local"),
}


@dataclass
class DecodeConfig:
    policy: str = "greedy"
    k: int = 8  # S2T candidates: the SLM's top-K
    trigger: str | None = None  # default per policy (kl for takeover/s2t)
    threshold: float | None = None  # trigger fires when statistic > threshold
    warmup: int = 3  # the first `warmup` generated tokens never trigger
    reverse_kl: bool = False
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    fast: bool = True  # fast paths; False runs the reference step-by-step loop
    draft_len: int = 16  # draft-and-verify block length
    chat_template: bool = True
    extra_eos: tuple[int, ...] = field(default=())
    local_mode: str = "coupled"  # s2t-local: coupled (adapter generates and scores) | decoupled (scores only)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise S2TError(f"unknown policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.trigger is None:
            self.trigger = POLICIES[self.policy].default_trigger
        if not 1 <= self.k <= 64:
            raise S2TError(f"k must be between 1 and 64, got {self.k}")
        if self.max_new_tokens < 1:
            raise S2TError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.warmup < 0:
            raise S2TError(f"warmup must be >= 0, got {self.warmup}")
        if not 1 <= self.draft_len <= 256:
            raise S2TError(f"draft_len must be between 1 and 256, got {self.draft_len}")
        if self.trigger == "learned" and self.policy not in ("s2t", "takeover", "s2t-local"):
            raise S2TError("the learned trigger is for s2t, takeover and s2t-local")
        if self.policy == "s2t-local" and self.trigger == "kl":
            raise S2TError("s2t-local never runs the LLM: use an SLM-only trigger (entropy, margin, random, always)")
        if (
            self.policy in ("takeover", "s2t", "s2t-local")
            and self.trigger not in ("never", "always")
            and self.threshold is None
        ):
            raise S2TError(
                f"trigger {self.trigger!r} needs a threshold: "
                "pass --threshold-file (from `s2t calibrate`) or --threshold"
            )
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise S2TError(f"threshold must be a finite number, got {self.threshold}")
        if self.local_mode not in LOCAL_MODES:
            raise S2TError(f"unknown S2T-Local mode {self.local_mode!r}: use coupled or decoupled")
        self.stop = tuple(self.stop)

    @property
    def info(self) -> PolicyInfo:
        return POLICIES[self.policy]

    @property
    def uses_llm(self) -> bool:
        return self.info.needs_llm
