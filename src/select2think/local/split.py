"""The split by problem: validation holds whole problems, never steps of a problem that trains. Selector
training, the learned trigger and cross-validation all draw it here."""

from __future__ import annotations

import random
from collections.abc import Iterable


def validation_problems(problems: Iterable[str], fraction: float, seed: int) -> set[str]:
    """`fraction` of the distinct problems (at least one when there are two or more), drawn with `seed`."""
    items = sorted(set(problems))
    if len(items) < 2:
        return set()
    return set(random.Random(seed).sample(items, max(1, int(len(items) * fraction))))
