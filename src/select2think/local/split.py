"""The split by problem: validation holds whole problems, never steps of a problem that trains, and never a
problem whose gsm_symbolic template trains (a template's problems differ only in names and numbers: a
selector trained on some of them agrees with the LLM on the others far more often than on a new template).
Selector training, the learned trigger and cross-validation all draw it here."""

from __future__ import annotations

import random
from collections.abc import Iterable

from ..data.datasets import gsm_symbolic_template


def split_unit(problem: str) -> str:
    """What validation draws whole: a gsm_symbolic problem's template, any other problem itself."""
    template = gsm_symbolic_template(problem)
    return problem if template is None else f"template:{template}"


def validation_problems(problems: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The problems of `fraction` of the distinct split units (at least one when there are two or more),
    drawn with `seed`."""
    items = sorted(set(problems))
    units = sorted({split_unit(p) for p in items})
    if len(units) < 2:
        return set()
    held = set(random.Random(seed).sample(units, max(1, int(len(units) * fraction))))
    return {p for p in items if split_unit(p) in held}
