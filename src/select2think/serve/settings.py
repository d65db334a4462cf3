"""The server's defaults (`s2t serve`'s options) and how one request's S2T fields resolve against them into a
`DecodeConfig` (validated there, in one place) and, for the learned trigger, a ready trigger object."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..backends.pair import ModelPair
from ..decoding.calibrate import load_threshold
from ..decoding.config import POLICIES, DecodeConfig
from ..decoding.triggers import Trigger
from ..errors import S2TError

SINGLE_MODEL = ("greedy", "sample", "llm")  # policies whose every token comes from one model's distribution


@dataclass
class ServeConfig:
    """Server-side defaults; a request may override the S2T ones with extra body fields."""

    policy: str = "greedy"
    k: int = 8
    trigger: str | None = None  # None: the policy's default
    threshold: float | None = None
    threshold_file: str | None = None
    reverse_kl: bool = False
    max_new_tokens: int = 512  # chat's default max_tokens (completions default to 16, as OpenAI's)
    temperature: float = 0.7  # for policy sample
    top_p: float = 0.95
    seed: int = 0
    local_mode: str = "coupled"
    fast: bool = True
    calibrations: dict[str, str] = field(default_factory=dict)  # name -> threshold file (`s2t calibrate`)
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # rows waiting for a place in the batch; more is 429
    max_logprobs: int = 20
    model_name: str = "s2t"  # the id /v1/models lists

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold_file is not None:
            raise S2TError("pass either --threshold or --threshold-file, not both")
        if not 1 <= self.max_batch <= 256:
            raise S2TError(f"--max-batch must be between 1 and 256, got {self.max_batch}")
        if self.max_queue < 0:
            raise S2TError(f"--max-queue must be >= 0, got {self.max_queue}")
        for name, path in self.calibrations.items():
            if not Path(path).is_file():
                raise S2TError(f"calibration {name!r}: no file {path}")
        if self.threshold_file is not None and not Path(self.threshold_file).is_file():
            raise S2TError(f"--threshold-file: no file {self.threshold_file}")
        self.default_config()  # refuse a bad default at startup, not at the first request

    def default_config(self) -> DecodeConfig:
        return DecodeConfig(
            policy=self.policy,
            k=self.k,
            trigger=self.trigger,
            threshold=self.threshold if self.threshold_file is None else 0.0,  # the file is read with the pair
            reverse_kl=self.reverse_kl,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            fast=self.fast,
            local_mode=self.local_mode,
        )


class S2TFields(BaseModel):
    """A request's S2T extra body fields (`extra_body=` in the openai client); None means the server's default."""

    model_config = ConfigDict(extra="ignore")

    policy: str | None = None
    k: int | None = None
    trigger: str | None = None
    threshold: float | None = None
    calibration: str | None = None
    reverse_kl: bool | None = None
    warmup: int | None = None


class Resolver:
    """Turns a request's fields into (DecodeConfig, learned trigger or None); calibration files are read
    once and checked against the served models (`load_threshold`)."""

    def __init__(self, serve: ServeConfig, pair: ModelPair):
        self.serve, self.pair = serve, pair
        self.files = dict(serve.calibrations)
        if serve.threshold_file is not None:
            self.files.setdefault("default", serve.threshold_file)
        self._thresholds: dict[tuple, float] = {}
        self._learned: dict[str, Trigger] = {}
        self.base = serve.default_config()
        if serve.threshold_file is not None:
            self.base.threshold = self._threshold("default", self.base.trigger or "never", serve.reverse_kl)
        elif self.base.trigger == "learned":
            raise S2TError("--trigger learned needs --threshold-file (from `s2t train-trigger`)")

    def resolve(
        self, fields: S2TFields, *, temperature: float | None, top_p: float | None, seed: int | None, **row: Any
    ) -> tuple[DecodeConfig, Trigger | None]:
        """`row`: max_new_tokens, stop, chat_template (the fields rows of one batch may differ in)."""
        base = self.base
        policy = fields.policy or base.policy
        if policy not in POLICIES:
            raise S2TError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        policy = self._sampling(policy, temperature)
        reverse_kl = base.reverse_kl if fields.reverse_kl is None else fields.reverse_kl
        trigger = fields.trigger or (base.trigger if policy == base.policy else None)
        threshold, name = fields.threshold, fields.calibration
        if name is not None and threshold is not None:
            raise S2TError("pass either threshold or calibration, not both")
        if name is not None:
            trigger = trigger or self._file_trigger(name)
        elif threshold is None and trigger == base.trigger and reverse_kl == base.reverse_kl:
            threshold, name = base.threshold, ("default" if "default" in self.files else None)
        trigger = trigger or POLICIES[policy].default_trigger
        if name is not None:
            threshold = self._threshold(name, trigger, reverse_kl)
        learned = None
        if trigger == "learned":
            if name is None:
                raise S2TError("trigger 'learned' needs a calibration: a learned trigger from `s2t train-trigger`")
            learned = self._learned_trigger(name)
        cfg = replace(
            base,
            policy=policy,
            k=base.k if fields.k is None else fields.k,
            trigger=trigger,
            threshold=threshold,
            reverse_kl=reverse_kl,
            warmup=base.warmup if fields.warmup is None else fields.warmup,
            temperature=base.temperature if temperature is None or temperature == 0 else temperature,
            top_p=base.top_p if top_p is None else top_p,
            seed=base.seed if seed is None else seed,
            **row,
        )
        return cfg, learned

    def _sampling(self, policy: str, temperature: float | None) -> str:
        """temperature 0 is greedy; above 0 samples, which only the SLM alone does (policy sample)."""
        if temperature is None:
            return policy
        if temperature < 0:
            raise S2TError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            return "greedy" if policy == "sample" else policy
        if policy in ("greedy", "sample"):
            return "sample"
        raise S2TError(f"policy {policy!r} decodes greedily: send temperature 0 or leave it out")

    def _file_trigger(self, name: str) -> str:
        from ..io import read_json

        meta = read_json(self._file(name), "calibration")
        if not isinstance(meta, dict) or not isinstance(meta.get("trigger"), str):
            raise S2TError(f"calibration {name!r} names no trigger")
        return meta["trigger"]

    def _file(self, name: str) -> str:
        if name not in self.files:
            known = ", ".join(sorted(self.files)) or "none (start the server with --calibration NAME=FILE)"
            raise S2TError(f"unknown calibration {name!r}: known are {known}")
        return self.files[name]

    def _threshold(self, name: str, trigger: str, reverse_kl: bool) -> float:
        key = (name, trigger, reverse_kl)
        if key not in self._thresholds:
            self._thresholds[key] = load_threshold(
                self._file(name), trigger, self.pair.slm_name, self.pair.llm_name or None, reverse_kl
            )
        return self._thresholds[key]

    def _learned_trigger(self, name: str) -> Trigger:
        if name not in self._learned:
            from ..local.trigger_head import load_learned_trigger

            self._learned[name] = load_learned_trigger(self._file(name))
        return self._learned[name]


def single_model(cfg: DecodeConfig, what: str) -> None:
    """Log-probs and logit shaping are the proposer's: only policies with one model's distribution offer them."""
    if cfg.policy not in SINGLE_MODEL:
        raise S2TError(f"{what} needs a single-model policy ({', '.join(SINGLE_MODEL)}), not {cfg.policy!r}")
