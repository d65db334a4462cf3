"""`s2t demo`: the headline on a few GSM8K test problems: greedy SLM, LLM alone, S2T and, when the package
ships a selector for the SLM, S2T-Local (no LLM), side by side.

S2T's kl threshold is calibrated on gsm_symbolic:calib (never on the test set) and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from .backends.pair import ModelPair
from .data.datasets import load_dataset, load_gsm_symbolic
from .data.prompts import math_prompt
from .decoding import DecodeConfig, generate
from .decoding.calibrate import calibrate, load_threshold
from .decoding.state import DecodeStats
from .eval.grading import extract_answer, is_correct
from .local.bundle import bundled_trigger, shipped_bundle
from .local.selector import apply_selector
from .local.trigger_head import load_learned_trigger
from .models.cache import cache_root

LOCAL_DEMO_MODE = "coupled"


@dataclass
class DemoRow:
    policy: str
    correct: int
    total: int
    tokens: int
    llm_forwards: int
    trigger_rate: float
    wall_s: float


def demo_threshold(pair: ModelPair, quantile: float, n_calib: int, max_new_tokens: int, console: Console) -> float:
    name = f"{pair.slm_name}__{pair.llm_name}__{pair.engine}__kl_q{quantile}_n{n_calib}".replace("/", "_")
    path = cache_root() / "calibrations" / f"{name}.json"  # engines round differently: one file each
    if not path.is_file():
        console.print(f"calibrating the kl trigger on {n_calib} gsm_symbolic:calib problems (once; cached at {path})")
        calib = load_gsm_symbolic("calib", limit=n_calib)
        prompts = [math_prompt(i.question) for i in calib.items]
        cal = calibrate(
            pair, prompts, "kl", quantile, dataset="gsm_symbolic:calib", max_new_tokens=max_new_tokens, progress=True
        )
        cal.save(path)
    return load_threshold(path, "kl", pair.slm_name, pair.llm_name)


def run_demo(
    pair: ModelPair,
    n: int = 5,
    max_new_tokens: int = 512,
    quantile: float = 0.99,
    n_calib: int = 8,
    console: Console | None = None,
) -> list[DemoRow]:
    console = console or Console()
    items = load_dataset("gsm8k").take(n)
    prompts = [math_prompt(i.question) for i in items]
    threshold = demo_threshold(pair, quantile, n_calib, max_new_tokens, console)
    configs = [
        ("greedy (SLM)", DecodeConfig(policy="greedy", max_new_tokens=max_new_tokens)),
        ("llm (LLM alone)", DecodeConfig(policy="llm", max_new_tokens=max_new_tokens)),
        (
            f"s2t (kl q={quantile}, K=8)",
            DecodeConfig(policy="s2t", trigger="kl", threshold=threshold, k=8, max_new_tokens=max_new_tokens),
        ),
    ]
    rows = []

    def run(label: str, cfg: DecodeConfig, trigger=None) -> None:
        console.print(f"running {label} on {n} GSM8K test problems ...")
        st, correct = DecodeStats(), 0
        for k, (prompt, item) in enumerate(zip(prompts, items, strict=True), 1):  # one at a time: progress
            res = generate(pair, [prompt], cfg, batch_size=1, trigger=trigger)
            ok = is_correct(extract_answer(res.texts[0]), item.answer)
            st, correct = st + res.stats, correct + ok
            console.print(f"  {k}/{n}: {'right' if ok else 'wrong'}, {res.stats.generated_tokens} tokens")
        rows.append(DemoRow(label, correct, n, st.generated_tokens, st.llm_forwards, st.trigger_rate, st.wall_time_s))

    for label, cfg in configs:
        run(label, cfg)
    bundle = shipped_bundle(pair.slm_name)
    trigger_file = bundled_trigger(bundle) if bundle is not None else None
    if bundle is not None and trigger_file is not None:  # last: merging the selector rewrites the SLM's weights
        threshold = load_threshold(trigger_file, "learned", pair.slm_name, None)
        apply_selector(pair, bundle, mode=LOCAL_DEMO_MODE)
        run(
            f"s2t-local (shipped selector, learned trigger, {LOCAL_DEMO_MODE}; no LLM)",
            DecodeConfig(
                policy="s2t-local",
                trigger="learned",
                threshold=threshold,
                k=8,
                max_new_tokens=max_new_tokens,
                local_mode=LOCAL_DEMO_MODE,
            ),
            load_learned_trigger(trigger_file),
        )
    title = f"{pair.slm_name} vs {pair.llm_name} ({pair.engine}): GSM8K test[0:{n}], max_new_tokens={max_new_tokens}"
    table = Table(title=title)
    for col in ("policy", "correct", "tokens", "LLM forwards/token", "trigger rate", "time vs greedy"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    base = rows[0].wall_s or 1.0
    for r in rows:
        table.add_row(
            r.policy,
            f"{r.correct}/{r.total}",
            str(r.tokens),
            f"{r.llm_forwards / max(r.tokens, 1):.3f}",
            f"{r.trigger_rate:.1%}",
            f"{r.wall_s / base:.2f}x",
        )
    console.print(table)
    return rows
