"""The llama.cpp backend's low-level path against llama-cpp-python's own `Llama.generate`, in one process.

    PYTHONPATH=src .venv/bin/python benchmarks/llamacpp_backend.py --model qwen2.5-coder-0.5b-instruct

Greedy decoding of `--steps` tokens after the same chat prompt: batch 1 through `LlamaCppBackend`
(one `llama_decode` per step, full-vocabulary logits copied into a torch tensor, argmax in torch) and through
`Llama.generate` (top_k=1), both with flash attention and f16 KV cells, alternating `--rounds` times (best
of each compared), then the backend at `--batch` rows. Decode tokens/s exclude the prefill. Prints JSON.
Run it with nothing else heavy on the machine (check `uptime`); compare within one run only.

One run (2-core CPU, --threads 1, load ~2, 0.5B Q4_K_M): batch 1 backend 14.6 / 14.4 tok/s vs Llama.generate
14.9 / 14.9 (same 128 tokens); backend batch 8: 37.2 tok/s (2.55x batch 1), row 0 unchanged by batching.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from select2think.backends.llamacpp import load_llamacpp
from select2think.models.cache import gguf_path
from select2think.models.registry import resolve

QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "A shop sells pens at 3 dollars each. How much do 14 pens cost?",
    "Write a SQL query that counts the rows of a table named users.",
    "What is the difference between a list and a tuple in Python?",
    "Sort the numbers 5, 2, 9, 1 in ascending order and explain each step.",
    "Write a bash one-liner that counts lines in all .py files.",
    "Tom has 12 apples and gives away a third. How many are left?",
]


def chat(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def backend_greedy(be, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], float, float]:
    """Greedy rows (all the same length of decode, no stopping); returns tokens, prefill s, decode s."""
    n = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), n, dtype=torch.long)
    live = torch.zeros(len(prompts), n, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p) :] = torch.tensor(p)
        live[i, n - len(p) :] = True
    be.reset(len(prompts))
    t0 = time.perf_counter()
    logits = be.extend(tokens, live, last_only=True)
    t1 = time.perf_counter()
    outs: list[list[int]] = [[] for _ in prompts]
    nxt = logits[:, -1].argmax(-1)
    for step in range(steps):
        for i, t in enumerate(nxt.tolist()):
            outs[i].append(t)
        if step == steps - 1:
            break
        logits = be.extend(nxt[:, None], torch.ones(len(prompts), 1, dtype=torch.bool))
        nxt = logits[:, -1].argmax(-1)
    t2 = time.perf_counter()
    return outs, t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating batch-1 runs of each path")
    args = ap.parse_args()
    path = gguf_path(resolve(args.model))
    be = load_llamacpp(path, n_ctx=4096, n_threads=args.threads, flash_attn=True)
    import llama_cpp

    vocab = be.lib.llama_model_get_vocab(be.model)

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * 1024)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 1024, False, True)
        return list(buf[:n])

    prompts = [tokenize(chat(q)) for q in QUESTIONS[: args.batch]]
    result: dict = {"model": args.model, "threads": args.threads, "steps": args.steps, "load_before": os.getloadavg()}

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=4096,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=True,  # as the backend (llama.cpp's "auto" turns it on for the CPU)
        verbose=False,
    )

    def generate_b1() -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        t_first = None
        toks: list[int] = []
        for tok in llm.generate(prompts[0], top_k=1, temp=0.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            toks.append(tok)
            if len(toks) == args.steps:
                break
        return toks, t_first - t0, time.perf_counter() - t_first

    # warm-up (the first decodes allocate buffers), then the two paths alternate so that load changes hit both
    backend_greedy(be, prompts[:1], 4)
    llm.eval(prompts[0][:4])
    llm.reset()
    runs: dict[str, list[float]] = {"backend_b1": [], "llama_generate_b1": []}
    for _ in range(args.rounds):
        ours, _, dec = backend_greedy(be, prompts[:1], args.steps)
        runs["backend_b1"].append((args.steps - 1) / dec)
        theirs, _, dec = generate_b1()
        runs["llama_generate_b1"].append((args.steps - 1) / dec)
    for key, rates in runs.items():
        result[key] = {"decode_tok_s": [round(r, 2) for r in rates]}
    result["overhead_pct"] = round(100 * (1 - max(runs["backend_b1"]) / max(runs["llama_generate_b1"])), 1)
    result["same_tokens_b1"] = ours[0] == theirs
    llm.close()

    outs, preB, decB = backend_greedy(be, prompts, args.steps)
    result[f"backend_b{args.batch}"] = {
        "prefill_s": round(preB, 3),
        "decode_tok_s": round(args.batch * (args.steps - 1) / decB, 2),
        "ms_per_step": round(1000 * decB / (args.steps - 1), 1),
    }
    result["batch_speedup"] = round(result[f"backend_b{args.batch}"]["decode_tok_s"] / max(runs["backend_b1"]), 2)
    result["row0_same_in_batch"] = outs[0] == ours[0]
    result["load_after"] = os.getloadavg()
    be.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
