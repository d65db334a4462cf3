"""Trigger thresholds as quantiles of the per-step statistic under greedy SLM decoding.

`calibrate` decodes a calibration split greedily with the SLM, teacher-forces the LLM over each
trajectory in one forward (only for triggers that need it), and stores the chosen quantile.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..backends.pair import ModelPair
from ..errors import S2TError
from ..models.chat import encode_prompts
from .api import generate
from .config import DecodeConfig
from .teacher import step_logprobs
from .triggers import Trigger, make_trigger
from .vocab import Vocab


@dataclass
class Calibration:
    trigger: str
    quantile: float
    threshold: float
    slm: str
    llm: str
    reverse_kl: bool
    warmup: int
    dataset: str
    n_prompts: int
    n_steps: int
    max_new_tokens: int
    created: str
    head: str = ""  # a learned trigger's weights, relative to the file (its threshold file is also its weights')

    def save(self, path: str | Path) -> None:
        from ..io import write_json

        write_json(path, {k: v for k, v in asdict(self).items() if k != "head" or v})


def check_quantile(q: float) -> None:
    if not 0.0 < q < 1.0:
        raise S2TError(f"quantile must be strictly between 0 and 1, got {q}")


def step_statistics(
    pair: ModelPair,
    prompts: list[str],
    trigger_name: str | Trigger,
    reverse_kl: bool = False,
    warmup: int = 3,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    chat_template: bool = True,
) -> np.ndarray:
    """Per-step trigger statistic along greedy SLM trajectories (warm-up steps excluded). `trigger_name`: a
    trigger's name, or a ready trigger (a learned head)."""
    trigger = make_trigger(trigger_name, reverse_kl) if isinstance(trigger_name, str) else trigger_name
    if trigger.needs_llm:
        pair.require_llm().require("full_logits", f"calibrating the {trigger.name} trigger")
    prompt_ids = encode_prompts(pair.tokenizer, prompts, chat_template)
    greedy = generate(
        pair,
        prompts,
        DecodeConfig(policy="greedy", max_new_tokens=max_new_tokens, chat_template=chat_template),
        batch_size=batch_size,
        prompt_ids=prompt_ids,
    )
    stats = []
    vocab = Vocab.of(pair)
    for p_ids, gen in zip(prompt_ids, greedy.generations, strict=False):
        g = gen.token_ids
        if len(g) <= warmup:
            continue
        s_lp, hidden = step_logprobs(pair.slm, p_ids, g, vocab, hidden=trigger.needs_hidden)
        l_lp = step_logprobs(pair.require_llm(), p_ids, g, vocab)[0] if trigger.needs_llm else None
        keys = [(0, i) for i in range(len(g))]
        stat = trigger.statistic(s_lp, l_lp, keys, hidden=hidden)[warmup:]
        stats.append(stat.cpu().numpy())
    if not stats:
        raise S2TError("calibration produced no steps: use more prompts or a larger max_new_tokens")
    return np.concatenate(stats)


def _in_batches(pair: ModelPair, prompts: list[str], args: tuple) -> np.ndarray:
    """`step_statistics` one batch at a time, with progress (same values: batches decode as single rows do)."""
    from ..progress import Progress

    batch_size, parts = args[-1], []
    name = args[0] if isinstance(args[0], str) else args[0].name
    with Progress(f"calibrate {name}", len(prompts)) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            try:
                parts.append(step_statistics(pair, chunk, *args))
            except S2TError as e:
                if "produced no steps" not in str(e):
                    raise
            bar.advance(len(chunk))
    if not parts:
        raise S2TError("calibration produced no steps: use more prompts or a larger max_new_tokens")
    return np.concatenate(parts)


def calibrate(pair: ModelPair, prompts: list[str], trigger: str | Trigger, quantile: float, *args, **kw) -> Calibration:
    """One quantile's threshold (`calibrate_many`'s other arguments)."""
    return calibrate_many(pair, prompts, trigger, [quantile], *args, **kw)[0]


def calibrate_many(
    pair: ModelPair,
    prompts: list[str],
    trigger: str | Trigger,
    quantiles: list[float],
    dataset: str = "",
    reverse_kl: bool = False,
    warmup: int = 3,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Calibration]:
    """One threshold per quantile, all from one decode of the calibration prompts. `progress`: report each
    batch (a bar on a terminal, a plain line every 30 s elsewhere)."""
    for q in quantiles:
        check_quantile(q)
    name = trigger if isinstance(trigger, str) else trigger.name
    if name in ("never", "always"):
        raise S2TError(f"trigger {name!r} has no threshold to calibrate")
    args = (trigger, reverse_kl, warmup, max_new_tokens, batch_size)
    values = _in_batches(pair, prompts, args) if progress else step_statistics(pair, prompts, *args)
    values = values[np.isfinite(values)]
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    return [
        Calibration(
            name,
            q,
            float(np.quantile(values, q)) if name != "random" else float(q),
            pair.slm_name,
            pair.llm_name if name == "kl" else "",
            reverse_kl,
            warmup,
            dataset,
            len(prompts),
            int(values.size),
            max_new_tokens,
            created,
        )
        for q in quantiles
    ]


def quantile_paths(out: str, quantiles: list[float]) -> list[str]:
    """Where each quantile's file goes: `out` itself for one, `out` with {q} filled in for several."""
    if len(quantiles) == 1 and "{q}" not in out:
        return [out]
    if "{q}" not in out:
        raise S2TError(f"several quantiles need {{q}} in --out (e.g. entropy_q{{q}}.json), got {out!r}")
    paths = [out.replace("{q}", f"{q:g}") for q in quantiles]
    if len(set(paths)) != len(paths):
        raise S2TError(f"--quantile repeats a value: {', '.join(f'{q:g}' for q in quantiles)}")
    return paths


def load_threshold(path: str | Path, trigger: str, slm: str, llm: str | None, reverse_kl: bool = False) -> float:
    """The threshold stored by `calibrate`, after checking it was made for this trigger and pair."""
    from ..io import read_json

    path = Path(path)
    if not path.is_file():
        raise S2TError(f"threshold file not found: {path} (make one with `s2t calibrate`)")
    data = read_json(path, "threshold file")
    if not isinstance(data, dict) or "threshold" not in data or "trigger" not in data:
        raise S2TError(f"{path} is not a threshold file from `s2t calibrate`")
    if data["trigger"] != trigger:
        raise S2TError(f"{path} was calibrated for trigger {data['trigger']!r}, not {trigger!r}")
    if data.get("slm") != slm:
        raise S2TError(f"{path} was calibrated for SLM {data.get('slm')!r}, not {slm!r}")
    value = data["threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise S2TError(f"{path}: threshold must be a finite number, got {value!r}")
    if trigger == "kl" and llm is None:
        raise S2TError(f"{path} holds a kl threshold, which needs the LLM it was calibrated with: pass --llm")
    if trigger == "kl" and data.get("llm") != llm:
        raise S2TError(f"{path} was calibrated for LLM {data.get('llm')!r}, not {llm!r}")
    if trigger == "kl" and bool(data.get("reverse_kl")) != reverse_kl:
        raise S2TError(f"{path} was calibrated with reverse_kl={data.get('reverse_kl')}, not {reverse_kl}")
    return float(value)
