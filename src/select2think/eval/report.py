"""`s2t report`: merge a run's shards into markdown, JSON and CSV tables and an accuracy-vs-compute plot.

Compute is counted in SLM-token-forward equivalents: every token a model processes (prompts,
drafts and samples included) costs 1 for the SLM and params(LLM)/params(SLM) for the LLM, so maj@8
costs about 8 greedy runs and the LLM alone about params(LLM)/params(SLM).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..errors import S2TError
from ..io import atomic_path, atomic_write, read_json, read_jsonl, write_json


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value for paired outcomes: `fixed` items only the policy solves, `broken`
    items only the baseline solves (a binomial test of fixed against n = fixed + broken at 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarise(rows: list[dict], llm_cost: float | None) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)

    def st(key: str) -> float:
        return sum(r["stats"][key] for r in rows)

    gen = max(st("generated_tokens"), 1)
    lo, hi = wilson(correct, n)
    samples = sum(len(r.get("finish", [1])) for r in rows)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": lo,
        "ci95_high": hi,
        "tokens_per_trajectory": st("generated_tokens") / max(samples, 1),
        "slm_forwards_per_token": st("slm_forwards") / gen,
        "llm_forwards_per_token": st("llm_forwards") / gen,
        "llm_tokens_per_item": st("llm_tokens") / max(n, 1),
        "trigger_rate": st("triggers") / gen,
        "flip_rate": st("flips") / gen,
        "wall_s_per_item": st("wall_time_s") / max(n, 1),
        # None where LLM work was done but the run never recorded the LLM's size: unknown, not free
        "compute_per_item": (
            None
            if llm_cost is None and st("llm_tokens")
            else (st("slm_tokens") + (llm_cost or 0.0) * st("llm_tokens")) / max(n, 1)
        ),
    }


def build_report(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise S2TError(f"{run} is not an eval run directory (no config.json)")
    cfg = read_json(cfg_path, "run config")
    models = cfg.get("models", {})
    llm_cost = (models["llm"]["params"] / models["slm"]["params"]) if models.get("llm", {}).get("params") else None
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted(run.glob("results.shard*.jsonl")):
        for r in read_jsonl(path):
            rows[(r["item"], r["policy"])] = r  # shards never overlap; a duplicate would be the same item
    by_policy: dict[str, list[dict]] = {}
    for (_item, policy), r in sorted(rows.items()):
        by_policy.setdefault(policy, []).append(r)
    table = {}
    for policy in cfg.get("policies", sorted(by_policy)):
        if policy not in by_policy:
            continue
        table[policy] = summarise(by_policy[policy], llm_cost)
        if policy.startswith("maj@"):
            k = policy.split("@")[1]
            oracle = [dict(r, correct=r.get("pass_at_k", False)) for r in by_policy[policy]]
            table[f"pass@{k} (oracle, not a policy)"] = summarise(oracle, llm_cost)
    greedy = table.get("greedy", {}).get("compute_per_item")
    for row in table.values():
        row["compute_vs_greedy"] = (
            row["compute_per_item"] / greedy if greedy and row["compute_per_item"] is not None else None
        )
    return {
        "run": str(run),
        "dataset": cfg["identity"]["dataset"],
        "slm": cfg["identity"]["slm"],
        "llm": cfg["identity"]["llm"],
        "max_new_tokens": cfg["identity"]["max_new_tokens"],
        "machine": cfg.get("machine"),
        "llm_cost_per_token": llm_cost,
        "policies": table,
    }


COLUMNS = [
    ("accuracy", "acc", "{:.1%}"),
    ("ci95_low", "95% CI low", "{:.1%}"),
    ("ci95_high", "95% CI high", "{:.1%}"),
    ("tokens_per_trajectory", "tokens", "{:.0f}"),
    ("slm_forwards_per_token", "SLM fwd/tok", "{:.2f}"),
    ("llm_forwards_per_token", "LLM fwd/tok", "{:.3f}"),
    ("llm_tokens_per_item", "LLM tokens/item", "{:.0f}"),
    ("trigger_rate", "trigger", "{:.2%}"),
    ("flip_rate", "flip", "{:.2%}"),
    ("wall_s_per_item", "s/item", "{:.1f}"),
    ("compute_vs_greedy", "compute vs greedy", "{:.2f}x"),
]


def fmt(fmt_str: str, v) -> str:
    return "-" if v is None else fmt_str.format(v)


def write_report(run_dir: str | Path) -> str:
    rep = build_report(run_dir)
    run = Path(run_dir)
    write_json(run / "report.json", rep)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["policy", "n"] + [c[0] for c in COLUMNS])
    for name, row in rep["policies"].items():
        w.writerow([name, row["n"]] + [row.get(c[0]) for c in COLUMNS])
    atomic_write(run / "report.csv", text.getvalue())
    lines = [
        f"{rep['dataset']}: SLM {rep['slm']}, LLM {rep['llm']}, max_new_tokens {rep['max_new_tokens']} "
        f"({rep['machine']})",
        "",
        "| policy | n | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, row in rep["policies"].items():
        lines.append(f"| {name} | {row['n']} | " + " | ".join(fmt(c[2], row.get(c[0])) for c in COLUMNS) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write(run / "report.md", md)
    _plot(rep, run / "accuracy_vs_compute.png")
    return md


def _plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rep["policies"].items():
        if name.startswith("pass@"):
            continue
        x = row["compute_vs_greedy"] if row["compute_vs_greedy"] is not None else row["compute_per_item"]
        if x is None:  # unknown compute: no point to place
            continue
        ax.errorbar(
            [x],
            [row["accuracy"]],
            yerr=[[row["accuracy"] - row["ci95_low"]], [row["ci95_high"] - row["accuracy"]]],
            fmt="o",
            capsize=3,
        )
        ax.annotate(name, (x, row["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("compute per item (x greedy SLM)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{rep['dataset']}: {rep['slm']} / {rep['llm']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
