"""Accuracy of each policy on the items every policy of a run finished (a run stopped part way, or sharded),
with Wilson 95% intervals, paired against the run's own greedy (fixed, broken, exact McNemar p), beside
other runs' policies on the items they share. A policy that ran on fewer items than the others (added to
the run later) is paired with greedy on its own items.

    python benchmarks/paired_table.py runs/frontier --reference docs/measurements/gsm8k200_run2/results.jsonl.gz \
        --reference docs/measurements/gsm8k100_llama_shards0-1/results.jsonl.gz
    python benchmarks/paired_table.py runs/frontier/results.shard{1,2}of4.jsonl --add runs/noisy/r0.25
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from select2think.eval.report import mcnemar, wilson


def rows_of(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="+", help="a run directory or results .jsonl(.gz) files (merged)")
    ap.add_argument("--reference", type=Path, action="append", default=[], help="results of other runs")
    ap.add_argument(
        "--add",
        type=Path,
        action="append",
        default=[],
        help="another run on the same items with no greedy of its "
        "own: its policies join this table as 'DIR: POLICY', paired with this run's greedy on their items",
    )
    args = ap.parse_args()
    by: dict[str, dict[str, dict]] = {}
    added: set[str] = set()  # labels from --add runs: paired on their own items, never setting the common ones
    for run, prefix in [(r, "") for r in args.run] + [(a, f"{a.name}: ") for a in args.add]:
        for f in sorted(run.glob("results.shard*of*.jsonl")) if run.is_dir() else [run]:
            for r in rows_of(f):
                by.setdefault(prefix + r["policy"], {})[r["item"]] = r
                if prefix:
                    added.add(prefix + r["policy"])
    own = [p for p in by if p not in added]
    most = max(len(by[p]) for p in own)  # a policy added later may have run on part of the items
    full = [p for p in own if len(by[p]) == most]
    common = sorted(set.intersection(*(set(by[p]) for p in full)))
    print(f"items every policy with {most} items finished: {len(common)}")
    greedy = by.get("greedy")
    for policy, items in by.items():
        mine = common if policy in full else sorted(set(items) & set(greedy or items))
        k = sum(items[i]["correct"] for i in mine)
        lo, hi = wilson(k, len(mine))
        line = f"{policy}: {k}/{len(mine)} = {k / len(mine):.1%} (95% CI {lo:.1%}-{hi:.1%})"
        if greedy is not None and policy != "greedy":  # paired against this run's greedy on the same items
            fixed = sum(items[i]["correct"] and not greedy[i]["correct"] for i in mine)
            broken = sum(greedy[i]["correct"] and not items[i]["correct"] for i in mine)
            line += f"; vs greedy: fixed {fixed}, broken {broken}, McNemar p = {mcnemar(fixed, broken):.3g}"
            if policy not in full:
                line += f" (on its {len(mine)} items, where greedy solved {sum(greedy[i]['correct'] for i in mine)})"
        print(line)
    for path in args.reference:  # each policy of another run on the items it shares with these
        ref: dict[str, dict[str, bool]] = {}
        for r in rows_of(path):
            ref.setdefault(r["policy"], {})[r["item"]] = r["correct"]
        for policy, done in ref.items():
            shared = [i for i in common if i in done]
            mine = {p: sum(by[p][i]["correct"] for i in shared) for p in full}
            theirs = f"{sum(done[i] for i in shared)}/{len(shared)}"
            here = ", ".join(f"{p} {k}" for p, k in mine.items())
            print(f"{path.parent.name} {policy}: {theirs} on the shared items (this run there: {here})")


if __name__ == "__main__":
    main()
