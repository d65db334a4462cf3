"""Answer extraction and comparison, with math-verify."""

from __future__ import annotations

import re


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i != -1:
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, numeric_fallback: bool = True) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if numeric_fallback:
        nums = _NUMBER.findall(text)
        if nums:
            return nums[-1].replace(",", "")
    return None


def is_correct(prediction: str | None, gold: str | None, timeout_s: int = 5) -> bool:
    """math-verify equivalence (with a per-item timeout); exact text match if it cannot parse."""
    if prediction is None or gold is None:
        return False
    from math_verify import parse, verify

    pred = prediction.replace(",", "") if re.fullmatch(r"[-\d,.\s$]+", prediction) else prediction
    try:
        g = parse(f"${gold}$", parsing_timeout=timeout_s)
        p = parse(f"${pred}$", parsing_timeout=timeout_s)
        if p and g:
            return bool(verify(g, p, timeout_seconds=timeout_s))
    except Exception:
        pass
    return pred.strip() == gold.strip()
