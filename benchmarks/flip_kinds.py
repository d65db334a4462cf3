"""What the LLM overrules: in the groups where its pick among the SLM's top-8 is not the top-1, is either
token a number, formatting, or are both words? With examples, and how sure the LLM is of its pick: the share
of groups where the pick holds under 60% / at least 80% of its top-8 probability, and how often the SLM's
top-1 is the pick in each.

    python benchmarks/flip_kinds.py --groups /work/data/regroup_gsm8k --out docs/measurements/selector/flip_kinds.json

Reads the groups and the SLM's tokenizer (no model). The validation problems `s2t train` holds out are left
out, as in head_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

from select2think.local.objective import TrainConfig, load_groups, split_groups
from select2think.models.registry import resolve
from select2think.models.tokenizers import gguf_tokenizer

K = 8
FORMAT = re.compile(r"[\s+\-*/=()$\\{}^.,:;\[\]*#]*")  # spaces, punctuation, LaTeX and Markdown marks


def kind(text: str) -> str:
    if re.search(r"\d", text):
        return "number"
    return "format" if FORMAT.fullmatch(text) else "word"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", required=True)
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = gguf_tokenizer(resolve(args.slm))
    train, _ = split_groups(load_groups(args.groups), TrainConfig(slm="-", groups=args.groups, out="-"))
    counts: Counter[str] = Counter()
    sure: dict[str, list[bool]] = {"under 0.6": [], "0.6 to 0.8": [], "at least 0.8": []}
    flips = []
    for g in train:
        q = g["llm_probs"][:K]
        pick = max(range(K), key=q.__getitem__)
        share = q[pick] / sum(q)
        sure["under 0.6" if share < 0.6 else "at least 0.8" if share >= 0.8 else "0.6 to 0.8"].append(pick == 0)
        if pick == 0:
            continue
        slm, llm = tok.decode([g["candidates"][0]]), tok.decode([g["candidates"][pick]])
        kinds = {kind(slm), kind(llm)}
        counts["number" if "number" in kinds else "format" if "format" in kinds else "word"] += 1
        flips.append({"context": tok.decode(g["context"][-24:]), "slm": slm, "llm": llm, "llm_q": q[pick] / sum(q)})
    result = {
        "groups": args.groups,
        "train_groups": len(train),
        "flips": len(flips),
        "share": {k: counts[k] / len(flips) for k in ("word", "format", "number")},
        "llm_sure": {
            k: {"share": len(v) / len(train), "slm_top1_agree": sum(v) / max(len(v), 1)} for k, v in sure.items()
        },
        "examples": random.Random(0).sample(flips, min(args.examples, len(flips))),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
