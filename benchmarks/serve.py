"""`s2t serve` throughput: 16 concurrent requests (continuously batched) against the same 16 sent one after
another, and the server's overhead against in-process `generate` at batch 1.

    OMP_NUM_THREADS=1 python benchmarks/serve.py                       # the tiny random pair (seconds)
    OMP_NUM_THREADS=1 python benchmarks/serve.py --slm qwen2.5-coder-0.5b-instruct --backend llama.cpp

Greedy decoding, raw-text prompts, the server on a free loopback port in this process (uvicorn in a thread).
In-process decoding runs in a child process of its own: torch gives every thread that runs it its own
OpenMP pool, and a second pool in one process (the benchmark's main thread beside the server's decode
thread) slowed whichever decoded second by a third on 2 cores, which is not the server's cost."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

PROMPTS = [
    "What is 17 * 23?",
    "Name three fruits.",
    "Count to ten.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Solve x^2 = 9 for x.",
    "What is the capital of France?",
    "Tell me a story about a cat.",
]


def start_server(pair, max_batch: int):
    import uvicorn

    from select2think.serve import ServeConfig, create_app

    app = create_app(pair, ServeConfig(max_batch=max_batch, max_queue=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default="tiny-slm")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--n", type=int, default=16, help="requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--local-only", action="store_true", help="(internal) in-process tokens/s, printed as JSON")
    args = ap.parse_args()

    import openai

    from select2think import DecodeConfig, generate, load_pair

    pair = load_pair(args.slm, None, dtype=args.dtype, device="cpu", backend=args.backend)
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(args.n)]
    cfg = DecodeConfig(policy="greedy", max_new_tokens=args.max_tokens, chat_template=False)
    if args.local_only:
        generate(pair, prompts[:1], cfg)  # warm-up
        t0 = time.perf_counter()
        local = sum(len(generate(pair, [p], cfg).generations[0].token_ids) for p in prompts)
        print(json.dumps({"tokens": local, "seconds": time.perf_counter() - t0}))
        return
    child = subprocess.run([sys.executable, *sys.argv, "--local-only"], capture_output=True, text=True, check=True)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    local, t_local = measured["tokens"], measured["seconds"]

    server, url = start_server(pair, max_batch=args.n)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)

    def ask(p: str) -> int:
        out = client.completions.create(model="s2t", prompt=p, max_tokens=args.max_tokens, temperature=0)
        return out.usage.completion_tokens

    ask(prompts[0])  # warm-up
    t0 = time.perf_counter()
    seq = sum(ask(p) for p in prompts)
    t_seq = time.perf_counter() - t0

    got: list[int] = []
    threads = [threading.Thread(target=lambda p=p: got.append(ask(p))) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_conc = time.perf_counter() - t0
    server.should_exit = True

    result = {
        "model": args.slm,
        "backend": args.backend,
        "requests": args.n,
        "max_tokens": args.max_tokens,
        "in_process_batch1_tok_s": local / t_local,
        "server_sequential_tok_s": seq / t_seq,
        "server_concurrent_tok_s": sum(got) / t_conc,
        "concurrent_over_sequential": (sum(got) / t_conc) / (seq / t_seq),
        "server_overhead_batch1": t_seq / t_local - 1,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from select2think.io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
