"""`s2t regroup`: training groups at the steps an SLM-only trigger fires, rebuilt from a collection.

`s2t collect` writes a group wherever the kl trigger fired. S2T-Local decodes with a trigger that never sees
the LLM (entropy, margin or learned), and that trigger also fires where the LLM would keep the SLM's top-1;
a selector trained on kl firings alone never saw such steps, and overrules the top-1 there as often as
anywhere. The collection's `features/ITEM.npz` records, at every step, the SLM's top-K, the LLM's log-probs
on them and the trigger features (problems collected before `ids` and `top_i` were added there are skipped),
so the groups at any SLM-only trigger's firings are rebuilt here without a model (`collect.step_groups`, the
same code that wrote the kl groups). The new directory shares the source's `features/` (a relative link), so
`s2t train` reads it like any collection (`s2t train-trigger` on it is the same as on the source: it reads
every step, not groups).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..decoding.calibrate import load_threshold
from ..decoding.triggers import make_trigger, statistic_from_features
from ..errors import S2TError
from ..io import atomic_path, read_json, read_jsonl, sha256_of
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
    """Write the new directory `out` (whole or not at all): per problem of `src`, a group at every step where
    the trigger of `threshold_file` fires after the collection's warm-up (decoding's rule, `Policy.fire`).
    Returns counts (problems, skipped, steps, groups, flips)."""
    src, out = Path(src), Path(out)
    ident = read_json(src / "collect.json", "collect settings").get("identity")
    if not isinstance(ident, dict) or not group_files(src):
        raise S2TError(f"{src} is not a directory from `s2t collect`")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise S2TError(f"{out} already exists and is not an empty directory: regroup into a new directory")
    name, trigger, threshold = _trigger(threshold_file, ident)
    warmup = int(ident.get("warmup", 3))
    rows, skipped, steps, flips = [], 0, 0, 0
    for item in [r["item"] for f in group_files(src) for r in read_jsonl(f)]:
        path = src / "features" / f"{item}.npz"
        if not path.is_file():
            raise S2TError(f"{path} is missing: {src} is not a whole collection")
        z = dict(np.load(path))
        if "top_i" not in z:  # collected before every step's top-K was recorded
            skipped += 1
            continue
        if name == "learned" and "hidden" not in z:
            raise S2TError(f"{src}/features/{item}.npz has no hidden states, which the learned trigger reads")
        hidden = torch.from_numpy(z["hidden"].astype(np.float32)) if "hidden" in z else None
        stat = statistic_from_features(trigger, torch.from_numpy(z["features"]), hidden)
        fired = (stat > threshold) & (torch.arange(len(stat)) >= warmup)
        groups = step_groups(z, fired.nonzero().flatten().tolist())
        rows.append({"item": item, "groups": groups})
        steps += len(stat)
        flips += sum(int(np.argmax(g["llm_probs"][:FLIP_K])) != 0 for g in groups)
    n = sum(len(r["groups"]) for r in rows)
    if not rows:
        raise S2TError(f"no problem in {src} has every step's top-K recorded: collect it again with this version")
    if not n:
        raise S2TError(f"the {name} trigger of {threshold_file} fires at none of {steps} steps: nothing to train on")
    groups_at = {"trigger": name, "threshold": threshold, "warmup": warmup, "threshold_file": sha256_of(threshold_file)}
    link = os.path.relpath((src / "features").resolve(), out.resolve())  # both directories can move together
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "features").symlink_to(link, target_is_directory=True)
        # the collection's candidate hidden states cover its kl groups only: training computes them all alike
        meta = {"identity": {**ident, "candidate_hidden": False, "groups_at": groups_at}, "regrouped_from": str(src)}
        (tmp / "collect.json").write_text(json.dumps(meta, indent=2))
    return {"problems": len(rows), "skipped": skipped, "steps": steps, "groups": n, "flips": flips}
