"""Majority vote over extracted answers (maj@k), kept apart from pass@k."""

from __future__ import annotations

import re

from .grading import is_correct


def normalise(answer: str | None) -> str | None:
    """Canonical text for voting: no spaces, no thousands separators, no trailing zeros or $."""
    if answer is None:
        return None
    a = re.sub(r"\\(?:text|mathrm)\{[^}]*\}", "", answer)
    a = a.replace("\\$", "").replace("$", "").replace(" ", "").replace("\\!", "")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", a):
        a = a.replace(",", "")
        if "." in a:
            a = a.rstrip("0").rstrip(".")
    return a or None


def majority(answers: list[str | None]) -> str | None:
    """Most frequent normalised answer; ties go to the one that occurred first. None never wins."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        n = normalise(a)
        if n is None:
            continue
        counts[n] = counts.get(n, 0) + 1
        first.setdefault(n, i)
    if not counts:
        return None
    return max(counts, key=lambda n: (counts[n], -first[n]))


def pass_at_k(answers: list[str | None], gold: str | None) -> bool:
    return any(is_correct(a, gold) for a in answers)
