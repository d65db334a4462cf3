"""transformers vs llama.cpp on the default pair, side by side in one process (docs/results.md, "Engines").

1. greedy tokens/s at batch 1, each model on each engine (same problems, engines interleaved);
2. on llama.cpp: S2T (kl, K = 8) wall time against the LLM alone, and its agreement with the step-by-step
   reference loop on the same engine;
3. top-1 agreement of the two engines at teacher-forced positions of the greedy trajectories.

    python benchmarks/engines.py --n 4 --max-new-tokens 128 --out docs/measurements/engines.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from select2think import DecodeConfig, generate, load_pair
from select2think.data.datasets import load_dataset
from select2think.data.prompts import math_prompt
from select2think.decoding.calibrate import calibrate
from select2think.decoding.teacher import step_logprobs
from select2think.decoding.vocab import Vocab
from select2think.models.chat import encode_prompts

SLM, LLM = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def timed(pair, prompts, cfg, batch_size=1):
    t = time.perf_counter()
    res = generate(pair, prompts, cfg, batch_size=batch_size)
    return res, time.perf_counter() - t


def tokens_per_s(pair, prompts, cfg):
    res, wall = timed(pair, prompts, cfg)
    return res, res.stats.generated_tokens / wall


def greedy_speed(engines: dict, prompts, max_new: int) -> dict:
    out = {}
    for role in ("slm", "llm"):
        for name, pair in engines.items():
            cfg = DecodeConfig(policy="greedy" if role == "slm" else "llm", max_new_tokens=max_new)
            _, tps = tokens_per_s(pair, prompts, cfg)
            out[f"{role}_{name}_tok_s"] = round(tps, 2)
        out[f"{role}_speedup"] = round(out[f"{role}_llama.cpp_tok_s"] / out[f"{role}_hf_tok_s"], 2)
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def s2t_vs_llm(pair, prompts, threshold: float, max_new: int) -> dict:
    alone, t_llm = timed(pair, prompts, DecodeConfig(policy="llm", max_new_tokens=max_new))
    kw = {"policy": "s2t", "trigger": "kl", "threshold": threshold, "k": 8, "max_new_tokens": max_new}
    fast, t_fast = timed(pair, prompts, DecodeConfig(**kw))
    ref, _ = timed(pair, prompts, DecodeConfig(fast=False, **kw))
    same = [f.token_ids == r.token_ids for f, r in zip(fast.generations, ref.generations, strict=True)]
    prefix = [
        common_prefix(f.token_ids, r.token_ids) / max(len(r.token_ids), 1)
        for f, r in zip(fast.generations, ref.generations, strict=True)
    ]
    return {
        "s2t_wall_vs_llm_alone": round(t_fast / t_llm, 3),
        "s2t_trigger_rate": round(fast.stats.trigger_rate, 4),
        "s2t_llm_forwards_per_token": round(fast.stats.llm_forwards_per_token, 4),
        # the kl trigger needs the LLM's distribution at every position: it reads every token, like the LLM alone
        "llm_tokens_read_s2t_vs_llm_alone": round(fast.stats.llm_tokens / max(alone.stats.llm_tokens, 1), 3),
        "fast_equals_reference_rows": f"{sum(same)}/{len(same)}",
        "fast_reference_common_prefix_mean": round(sum(prefix) / len(prefix), 3),
    }


def engine_agreement(engines: dict, prompts, max_new: int) -> dict:
    hf, cpp = engines["hf"], engines["llama.cpp"]
    ids = encode_prompts(hf.tokenizer, prompts, True)
    res = generate(hf, prompts, DecodeConfig(policy="greedy", max_new_tokens=max_new), batch_size=1)
    out = {}
    for role in ("slm", "llm"):
        agree = total = 0
        for p, g in zip(ids, res.generations, strict=True):
            a, _ = step_logprobs(getattr(hf, role), p, g.token_ids, Vocab.of(hf))
            b, _ = step_logprobs(getattr(cpp, role), p, g.token_ids, Vocab.of(cpp))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(g.token_ids)
        out[f"{role}_top1_agreement"] = round(agree / total, 4)
        out[f"{role}_positions"] = total
    return out


def save(report: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="gsm_symbolic:dev problems")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--calib", type=int, default=8, help="gsm_symbolic:calib problems for the kl threshold")
    ap.add_argument("--greedy-only", action="store_true", help="only section 1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    prompts = [math_prompt(i.question) for i in load_dataset("gsm_symbolic:dev").take(args.n)]
    engines = {e: load_pair(SLM, LLM, backend=e) for e in ("hf", "llama.cpp")}
    report: dict = {
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "llama_threads": engines["llama.cpp"].slm.n_threads,
    }
    report["greedy"] = greedy_speed(engines, prompts, args.max_new_tokens)
    print(json.dumps(report, indent=2), flush=True)
    if args.greedy_only:
        return save(report, args.out)
    cpp = engines["llama.cpp"]
    calib = [math_prompt(i.question) for i in load_dataset("gsm_symbolic:calib").take(args.calib)]
    cal = calibrate(cpp, calib, "kl", args.quantile, "gsm_symbolic:calib", max_new_tokens=args.max_new_tokens)
    report["s2t_llama.cpp"] = {"quantile": args.quantile, "threshold": cal.threshold}
    report["s2t_llama.cpp"] |= s2t_vs_llm(cpp, prompts, cal.threshold, args.max_new_tokens)
    print(json.dumps(report, indent=2), flush=True)
    report["engine_agreement"] = engine_agreement(engines, prompts, args.max_new_tokens)
    print(json.dumps(report, indent=2))
    save(report, args.out)


if __name__ == "__main__":
    main()
