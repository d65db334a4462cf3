"""`s2t regroup`: training groups at the steps an SLM-only trigger fires, rebuilt from a collection.

`s2t collect` writes a group wherever the kl trigger fired. S2T-Local decodes with a trigger that never sees
the LLM (entropy, margin or learned), and that trigger also fires where the LLM would keep the SLM's top-1;
a selector trained on kl firings alone never saw such steps, and overrules the top-1 there as often as
anywhere. The collection's `features/ITEM.npz` records, at every step, the SLM's top-K, the LLM's log-probs
on them and the trigger features (problems collected from session 11 on), so the groups at any SLM-only
trigger's firings are rebuilt here without a model (`collect.step_groups`, the same code that wrote the kl
groups). The new directory shares the source's `features/` (a link), so `s2t train` and `s2t train-trigger`
read it like any collection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..decoding.calibrate import load_threshold
from ..decoding.triggers import make_trigger, statistic_from_features
from ..errors import S2TError
from ..io import atomic_path, read_json, read_jsonl, sha256_of, write_json
from .collect import step_groups
from .objective import group_files
from .trigger_head import load_learned_trigger

SLM_ONLY = ("entropy", "margin", "learned")
FLIP_K = 8  # S2T's default K: a group "flips" when the LLM's pick among the top-8 is not the top-1


def _trigger(threshold_file: str | Path, ident: dict):
    data = read_json(threshold_file, "threshold file")
    name = data.get("trigger") if isinstance(data, dict) else None
    if name not in SLM_ONLY:
        raise S2TError(
            f"{threshold_file} is a {name!r} trigger: regroup takes an SLM-only one ({', '.join(SLM_ONLY)}); "
            "the kl trigger's groups are the collection itself"
        )
    threshold = load_threshold(threshold_file, name, ident["slm"], ident.get("llm"))
    return name, (load_learned_trigger(threshold_file) if name == "learned" else make_trigger(name)), threshold


def regroup(src: str | Path, threshold_file: str | Path, out: str | Path) -> dict:
    """Write `out`/groups.jsonl: per problem of `src`, a group at every step where the trigger of
    `threshold_file` fires after the warm-up. Returns counts (problems, skipped, steps, groups, flips)."""
    src, out = Path(src), Path(out)
    ident = read_json(src / "collect.json", "collect settings").get("identity")
    if not isinstance(ident, dict) or not group_files(src):
        raise S2TError(f"{src} is not a directory from `s2t collect`")
    if out.resolve() == src.resolve() or group_files(out) or (out / "features").exists():
        raise S2TError(f"{out} already holds groups or features: regroup into a new directory")
    name, trigger, threshold = _trigger(threshold_file, ident)
    warmup = int(ident.get("warmup", 3))
    rows, skipped, steps, flips = [], 0, 0, 0
    items = [r["item"] for f in group_files(src) for r in read_jsonl(f)]
    for item in items:
        path = src / "features" / f"{item}.npz"
        z = dict(np.load(path)) if path.is_file() else {}
        if "top_i" not in z:  # collected before every step's top-K was recorded
            skipped += 1
            continue
        hidden = torch.from_numpy(z["hidden"].astype(np.float32)) if "hidden" in z else None
        stat = statistic_from_features(trigger, torch.from_numpy(z["features"]), hidden)
        fired = (stat > threshold) & (torch.arange(len(stat)) >= warmup)
        groups = step_groups(z, fired.nonzero().flatten().tolist())
        rows.append({"item": item, "groups": groups})
        steps += len(stat)
        flips += sum(int(np.argmax(g["llm_probs"][:FLIP_K])) != 0 for g in groups)
    if not rows:
        raise S2TError(f"no problem in {src} has every step's top-K recorded: collect it again with this version")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "groups.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "features").symlink_to((src / "features").resolve(), target_is_directory=True)
    groups_at = {"trigger": name, "threshold": threshold, "threshold_file": sha256_of(threshold_file)}
    write_json(out / "collect.json", {"identity": {**ident, "groups_at": groups_at}, "regrouped_from": str(src)})
    n = sum(len(r["groups"]) for r in rows)
    return {"problems": len(rows), "skipped": skipped, "steps": steps, "groups": n, "flips": flips}
