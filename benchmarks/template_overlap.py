"""Which GSM8K test problems are the source questions of gsm_symbolic's templates? (GSM-Symbolic wrote its
templates from GSM8K test questions.) Word overlap against a few instances of every template.

    .venv/bin/python benchmarks/template_overlap.py --limit 200 --out docs/measurements/selector/template_overlap.json

A test problem counts as a template's source when its words (lower case, 3+ letters, no numbers) overlap
an instance's with a Jaccard index above --threshold.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import reasoning_gym

from select2think.data.datasets import load_dataset, template_name


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="GSM8K test[0:limit]")
    ap.add_argument("--draws", type=int, default=4000, help="gsm_symbolic instances drawn to find the templates")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    source = reasoning_gym.create_dataset("gsm_symbolic", size=args.draws, seed=0)
    by_template: dict[str, list[set[str]]] = {}
    for i in range(args.draws):
        name = template_name(source[i])
        if len(by_template.setdefault(name, [])) < 5:
            by_template[name].append(words(source[i]["question"]))
    rows = []
    for item in load_dataset("gsm8k").items[: args.limit]:
        w = words(item.question)
        best = max(len(w & t) / len(w | t) for ts in by_template.values() for t in ts)
        rows.append({"item": item.id, "jaccard": round(best, 3)})
    sources = [r["item"] for r in rows if r["jaccard"] > args.threshold]
    result = {"templates": len(by_template), "test_problems": len(rows), "sources": sources, "rows": rows}
    print(f"{len(sources)} of {len(rows)} GSM8K test problems are template sources ({len(by_template)} templates)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
