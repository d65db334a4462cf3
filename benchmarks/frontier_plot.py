"""The accuracy-cost frontier in one figure (docs/results.md, "The frontier"): accuracy on GSM8K test[0:200]
against (a) LLM forwards per generated token, (b) LLM tokens read per problem relative to the LLM alone,
(c) wall time per token at batch 1 relative to the LLM alone, with the Pareto front of each panel drawn
through the points no other point beats on both axes. Costs come from benchmarks/frontier.py (batch 1, one
run) where it measured the policy, accuracy from `s2t eval`. Prints the table results.md shows.

    python benchmarks/frontier_plot.py --report runs/frontier/report.json \
        --reference docs/measurements/gsm8k200/report.json --reference docs/measurements/gsm8k200_run2/report.json \
        --wall docs/measurements/frontier/wall_time.json --same "llm=llm (transformers)" \
        --same "s2t[kl0.9]=s2t[kl90] (transformers)" --out docs/measurements/frontier/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_points(report: str, engine: str) -> dict[str, dict]:
    """label -> the report's row, with the engine in the label (oracles are not policies: left out)."""
    rows = json.loads(Path(report).read_text())["policies"]
    return {f"{k} ({engine})": v for k, v in rows.items() if "oracle" not in k}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points (cost, accuracy, label) that no other point matches on both and beats on one."""
    front = []
    for c, a, lab in points:
        beaten = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2, _ in points)
        if not beaten:
            front.append((c, a, lab))
    return sorted(front)


def axes_values(points: dict[str, dict], wall: dict, same: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per label, the three cost axes (missing where the label was not measured on that axis). Bench policy
    P's costs (batch 1, one run) go to the point "P (llama.cpp)", or to the point `same[P]` names; other
    points keep their eval's LLM forwards and tokens read."""
    per_token = {k: w["wall_s"] / w["generated_tokens"] for k, w in wall.items()}  # lengths differ
    bench = {same.get(k, f"{k} (llama.cpp)"): k for k in wall}
    out: dict[str, dict[str, float]] = {}
    for label, row in points.items():
        engine = label.rsplit(" (", 1)[1]
        ref = points.get(f"llm ({engine}") or next(v for k, v in points.items() if k.startswith("llm ("))
        llm_tokens = ref["llm_tokens_per_item"]  # the same engine's LLM alone where there is one
        vals = {"acc": row["accuracy"], "fwd": row["llm_forwards_per_token"]}
        vals["read"] = row["llm_tokens_per_item"] / llm_tokens
        if label in bench:
            w = wall[bench[label]]
            vals |= {"fwd": w["llm_forwards_per_token"], "read": w["llm_tokens_read_vs_llm_alone"]}
            vals["wall"] = per_token[bench[label]] / per_token["llm"]
        out[label] = vals
    return out


def table(values: dict[str, dict[str, float]], points: dict[str, dict]) -> str:
    lines = [
        "| policy | n | accuracy (95% CI) | trigger rate | LLM forwards / token | LLM tokens read vs LLM alone "
        "| time per token vs LLM alone (batch 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, v in sorted(values.items(), key=lambda kv: (kv[1].get("wall", 9), kv[1]["fwd"], kv[1]["acc"])):
        r = points[label]
        ci = f"{100 * r['accuracy']:.1f}% ({100 * r['ci95_low']:.1f}-{100 * r['ci95_high']:.1f})"
        wall = f"{v['wall']:.2f}x" if "wall" in v else ""
        rate = f"{100 * r['trigger_rate']:.1f}%"
        lines.append(f"| {label} | {r['n']} | {ci} | {rate} | {v['fwd']:.3f} | {v['read']:.2f} | {wall} |")
    return "\n".join(lines)


def plot(values: dict[str, dict[str, float]], extra: dict[str, tuple[float, float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [
        ("fwd", "LLM forwards per generated token"),
        ("read", "LLM tokens read per problem / LLM alone's"),
        ("wall", "wall time per token at batch 1 / LLM alone's (llama.cpp)"),
    ]
    fig, panels = plt.subplots(1, 3, figsize=(18, 6), sharey=True)
    for ax, (key, title) in zip(panels, axes, strict=True):
        pts = [(v[key], v["acc"], lab) for lab, v in values.items() if key in v]
        if key == "wall":
            pts += [(c, a, lab) for lab, (c, a) in extra.items()]
        for c, a, lab in pts:
            ax.scatter(c, 100 * a, s=30, color="tab:red" if "local" in lab else "tab:blue")
            ax.annotate(lab, (c, 100 * a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto(pts)
        ax.step([c for c, _, _ in front], [100 * a for _, a, _ in front], where="post", color="tab:green", lw=1)
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("GSM8K test accuracy (%), n per point in the table")
    fig.suptitle("Accuracy vs the LLM's share of the work (green: Pareto front)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, help="report.json of the llama.cpp frontier run")
    ap.add_argument("--reference", action="append", default=[], help="report.json of transformers runs")
    ap.add_argument("--wall", required=True, help="benchmarks/frontier.py's JSON")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--same", action="append", default=[], help="BENCH=LABEL: bench policy BENCH's time is LABEL's")
    args = ap.parse_args()
    points = load_points(args.report, "llama.cpp")
    for ref in args.reference:  # transformers runs: where two give a policy, the one with more items
        for k, v in load_points(ref, "transformers").items():
            if k not in points or points[k]["n"] < v["n"]:
                points[k] = v
    wall_json = json.loads(Path(args.wall).read_text())
    values = axes_values(points, wall_json["llama.cpp"], dict(s.split("=", 1) for s in args.same))
    assisted = wall_json.get("transformers_assisted")
    llm_acc = next(v["acc"] for k, v in values.items() if k.startswith("llm ("))
    extra = {}
    if assisted:  # token-identical to the LLM alone by construction: the LLM alone's accuracy
        extra["assisted generation (transformers)"] = (assisted["assisted_wall_vs_llm_alone"], llm_acc)
    plot(values, extra, args.out)
    print(table(values, points))


if __name__ == "__main__":
    main()
