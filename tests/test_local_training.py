import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from select2think import DecodeConfig, generate, load_pair
from select2think.decoding.calibrate import calibrate
from select2think.decoding.teacher import step_logprobs
from select2think.decoding.vocab import Vocab
from select2think.local.collect import CollectConfig, run_collect
from select2think.local.objective import TrainConfig, batch_loss, candidate_logits, load_groups
from select2think.local.selector import apply_selector
from select2think.local.train import prepare_model, run_train
from select2think.models.chat import encode_prompts


@pytest.fixture(scope="module")
def collected(tiny_pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("collect")
    cal = calibrate(tiny_pair, ["Count to ten.", "Name a color."], "kl", 0.7, max_new_tokens=24)
    cal.save(d / "kl.json")
    cfg = CollectConfig(
        slm="tiny-slm",
        llm="tiny-llm",
        dataset="gsm_symbolic:train",
        out=str(d / "groups"),
        threshold_file=str(d / "kl.json"),
        limit=4,
        max_new_tokens=20,
        dtype="fp32",
        device="cpu",
    )
    run_collect(cfg, progress=False)
    return d


def test_collect_writes_groups_and_features_and_refuses_test_sets(collected):
    groups = load_groups(collected / "groups")
    assert len(groups) > 4
    g = groups[0]
    assert len(g["candidates"]) == 16 and len(g["llm_probs"]) == 16 and len(g["context"]) <= 511
    assert all(0 <= p <= 1 for p in g["llm_probs"])
    feats = list((collected / "groups" / "features").glob("*.npz"))
    assert len(feats) == 4
    from select2think import S2TError

    with pytest.raises(S2TError, match="test split"):
        run_collect(
            CollectConfig(
                slm="tiny-slm",
                llm="tiny-llm",
                dataset="gsm8k",
                out=str(collected / "x"),
                threshold_file=str(collected / "kl.json"),
            ),
            progress=False,
        )


def test_tree_layout_equals_naive_layout(tiny_pair):
    ctx, cands = [1, 2, 3, 4, 5], [10, 20, 30, 40]
    tree = candidate_logits(tiny_pair.slm_module(), ctx, cands, "tree")
    naive = candidate_logits(tiny_pair.slm_module(), ctx, cands, "naive")
    assert torch.allclose(tree, naive, atol=1e-4)


def test_reserved_rows_start_as_the_head_and_alone_take_head_gradients():
    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    ctx, cands = [1, 2, 3, 4, 5], [10, 20, 30, 40]
    before = candidate_logits(pair.slm_module(), ctx, cands)
    cfg = TrainConfig(slm="tiny-slm", groups="", out="", prior_weight=0.0)  # the paper's head alone
    model, rows = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
    assert torch.allclose(candidate_logits(model, ctx, cands), before, atol=1e-5)  # LoRA B = 0, rows = head rows
    loss, _, _ = batch_loss(
        model,
        [{"context": ctx, "candidates": cands, "llm_probs": [0.1, 0.6, 0.2, 0.1]}],
        pair.reserved_ids,
        pair.vocab_size,
        cfg,
    )
    loss.backward()
    assert rows.weight.grad is not None and rows.weight.grad.abs().sum() > 0
    assert model.get_output_embeddings().weight.grad is None  # the [V, H] head never gets a dense gradient
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def small_lora(collected, out, **kw) -> TrainConfig:
    """One quick epoch of LoRA + rows on 12 tiny groups."""
    base = {"epochs": 1, "max_groups": 12, "dtype": "fp32", "device": "cpu", "lr": 5e-3, "head_lr": 5e-2}
    return TrainConfig(slm="tiny-slm", groups=str(collected / "groups"), out=str(out), **{**base, **kw})


def test_training_moves_only_lora_and_reserved_rows_and_resumes(collected, tmp_path):
    out = tmp_path / "sel"
    cfg = small_lora(collected, out)
    first = run_train(cfg, progress=False)
    assert len(first["history"]) == 2 and 0 <= first["history"][-1]["agree_at_1"] <= 1
    meta = json.loads((out / "selector.json").read_text())
    assert meta["reserved_ids"] == list(range(49152, 49168))
    assert (out / "adapter_model.safetensors").stat().st_size < 20e6
    cfg.epochs = 2
    second = run_train(cfg, progress=False)  # resumes at epoch 2
    assert [h["epoch"] for h in second["history"]] == [0, 1, 2]  # 0: the untrained head

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    before = pair.slm_module().lm_head.weight.detach().clone()
    embed_before = pair.slm_module().model.embed_tokens.weight.detach().clone()
    apply_selector(pair, out)
    saved = load_file(out / "reserved_rows.safetensors")["weight"]
    assert torch.equal(pair.selector.rows, saved) and not torch.equal(saved, before[49152:49168])
    # the merged LoRA moves the backbone; the head and the embeddings stay as they were
    assert torch.equal(pair.slm_module().lm_head.weight, before)
    assert torch.equal(pair.slm_module().model.embed_tokens.weight, embed_before)
    r = generate(pair, ["What is 2+2?"], DecodeConfig(policy="s2t-local", trigger="always", max_new_tokens=8))
    assert r.stats.llm_forwards == 0 and r.stats.triggers == 8 - 3


def test_eval_runs_s2t_local_beside_an_untouched_greedy(collected, tmp_path, tiny_pair):
    from select2think.cli import main
    from select2think.io import read_jsonl as read_lines

    sel = tmp_path / "sel"
    run_train(
        TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(sel),
            epochs=1,
            max_groups=4,
            dtype="fp32",
            device="cpu",
        ),
        progress=False,
    )
    calibrate(tiny_pair, ["Count to ten."], "entropy", 0.5, max_new_tokens=20).save(tmp_path / "ent.json")
    base = [
        "eval",
        "--slm",
        "tiny-slm",
        "--dataset",
        "gsm_symbolic:dev",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    ]
    assert main([*base, "--policy", "greedy", "--out", str(tmp_path / "g")]) == 0
    assert (
        main(
            [
                *base,
                "--policy",
                "greedy",
                "--policy",
                f"s2t-local={sel},{tmp_path / 'ent.json'}",
                "--policy",
                f"s2t-local={sel},{tmp_path / 'ent.json'},decoupled",
                "--out",
                str(tmp_path / "both"),
            ]
        )
        == 0
    )
    alone = {r["item"]: r["prediction"] for r in read_lines(tmp_path / "g" / "results.shard0of1.jsonl")}
    both = read_lines(tmp_path / "both" / "results.shard0of1.jsonl")
    assert {r["item"]: r["prediction"] for r in both if r["policy"] == "greedy"} == alone
    local = [r for r in both if r["policy"].startswith("s2t-local")]
    assert len(local) == 4 and all(r["stats"]["llm_forwards"] == 0 for r in local)
    assert {r["policy"] for r in local} == {"s2t-local[sel,ent]", "s2t-local[sel,ent,decoupled]"}
    assert sum(r["stats"]["triggers"] for r in local) > 0
    # the run records which selector and thresholds produced it, by content
    import hashlib

    inputs = json.loads((tmp_path / "both" / "config.json").read_text())["invocations"][-1]["inputs"]
    rows = sel / "reserved_rows.safetensors"
    assert set(inputs) == {"s2t-local[sel,ent]", "s2t-local[sel,ent,decoupled]"}
    assert inputs["s2t-local[sel,ent]"][str(rows)] == hashlib.sha256(rows.read_bytes()).hexdigest()
    assert str(tmp_path / "ent.json") in inputs["s2t-local[sel,ent]"]


def test_learned_trigger_trains_reports_baselines_and_decodes_without_llm(collected, tiny_pair, tmp_path):
    from select2think.decoding.calibrate import load_threshold
    from select2think.local.trigger_head import load_learned_trigger, train_trigger_head

    path = tmp_path / "learned.json"
    metrics = train_trigger_head(collected / "groups", path, "tiny-slm", epochs=50)
    assert {"learned", "entropy", "margin"} <= set(metrics)
    assert all(0 <= metrics[m]["precision"] <= 1 and 0 <= metrics[m]["recall"] <= 1 for m in ("learned", "entropy"))
    head = load_learned_trigger(path)
    thr = load_threshold(path, "learned", "tiny-slm", None)
    cfg = {"policy": "s2t-local", "trigger": "learned", "threshold": thr, "max_new_tokens": 16}
    prompts = ["What is 2+2?", "Name a fruit."]
    fast = generate(tiny_pair, prompts, DecodeConfig(fast=True, **cfg), trigger=head, batch_size=2)
    ref = generate(tiny_pair, prompts, DecodeConfig(fast=False, **cfg), trigger=head, batch_size=1)
    assert [g.token_ids for g in fast.generations] == [g.token_ids for g in ref.generations]
    assert fast.stats.llm_forwards == 0
    with pytest.raises(Exception, match="train-trigger"):
        generate(tiny_pair, prompts, DecodeConfig(**cfg))
    # S2T with the learned trigger (no LLM read until it fires): batched lazy path = reference loop, and each
    # row fires exactly where the head, given teacher-forced log-probs and hidden states, says it should
    s2t = {**cfg, "policy": "s2t"}
    lazy = generate(tiny_pair, prompts, DecodeConfig(**s2t), trigger=head, batch_size=2)
    ref = generate(tiny_pair, prompts, DecodeConfig(fast=False, **s2t), trigger=head, batch_size=1)
    assert lazy.path == "lazy-llm" and [g.token_ids for g in lazy.generations] == [g.token_ids for g in ref.generations]
    assert not tiny_pair.slm.want_hidden  # put back after the decode
    vocab = Vocab.of(tiny_pair)
    for p_ids, g in zip(encode_prompts(tiny_pair.tokenizer, prompts, True), lazy.generations, strict=True):
        s_lp, h = step_logprobs(tiny_pair.slm, p_ids, g.token_ids, vocab, hidden=True)
        stat = head.statistic(s_lp, hidden=h)[3:]  # warm-up 3
        assert g.triggers == int((stat > thr).sum())
    assert lazy.stats.triggers > 0 and lazy.stats.llm_forwards > 0
    # its threshold set anew at two quantiles: copies in another folder that still find the weights
    from select2think.cli import main

    (tmp_path / "sub").mkdir()
    args = ["calibrate", "--slm", "tiny-slm", "--trigger", "learned", "--head", str(path), "--limit", "2"]
    args += ["--quantile", "0.5", "--quantile", "0.9", "--max-new-tokens", "16", "--dtype", "fp32", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "sub" / "learned{q}.json")]) == 0
    low, high = (tmp_path / "sub" / f"learned{q}.json" for q in ("0.5", "0.9"))
    assert load_threshold(low, "learned", "tiny-slm", None) < load_threshold(high, "learned", "tiny-slm", None)
    assert load_learned_trigger(high).weight.equal(head.weight)
    assert main(["calibrate", "--trigger", "learned", "--out", "x.json"]) == 2  # which learned trigger?
    assert main(["calibrate", "--trigger", "entropy", "--head", str(path), "--out", "x.json"]) == 2


@pytest.mark.parametrize("group_batch", [1, 2])
def test_training_killed_mid_epoch_resumes_to_the_same_weights(collected, tmp_path, monkeypatch, group_batch):
    from safetensors.torch import load_file

    import select2think.local.train as train_mod

    def cfg(out):
        return TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(out),
            epochs=1,
            max_groups=16,
            dtype="fp32",
            device="cpu",
            lr=5e-3,
            head_lr=5e-2,
            checkpoint_every=3 if group_batch == 1 else 1,
            group_batch=group_batch,
        )

    run_train(cfg(tmp_path / "whole"), progress=False)
    real, calls = train_mod.batch_loss, []

    def dies_at_the_fifth(*args, **kwargs):  # (the third batch of two)
        calls.append(1)
        if len(calls) == (5 if group_batch == 1 else 3):
            raise KeyboardInterrupt  # stands for a kill: the last checkpoint is after group 3 (batch 2)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "batch_loss", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path / "cut"), progress=False)
    state = json.loads((tmp_path / "cut" / "train_state.json").read_text())
    assert state["step"] == (3 if group_batch == 1 else 2)  # steps count batches
    monkeypatch.setattr(train_mod, "batch_loss", real)
    run_train(cfg(tmp_path / "cut"), progress=False)
    for name in ("adapter_model.safetensors", "reserved_rows.safetensors"):
        whole, cut = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert all(torch.equal(whole[k], cut[k]) for k in whole), name


def test_train_cli_prints_the_untrained_and_trained_agreement(collected, tmp_path, capsys):
    from select2think.cli import main

    assert (
        main(
            [
                "train",
                "--slm",
                "tiny-slm",
                "--groups",
                str(collected / "groups"),
                "--out",
                str(tmp_path / "s"),
                "--epochs",
                "1",
                "--max-groups",
                "4",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "epoch 0: untrained" in out and "epoch 1: loss" in out and "SLM top-1" in out and "tied" in out
    assert main(["train", "--slm", "tiny-slm", "--groups", str(tmp_path / "none"), "--out", str(tmp_path / "s2")]) == 2


def test_bundle_ships_selector_and_trigger_and_decodes_with_no_threshold_file(collected, tmp_path, capsys):
    from select2think.cli import main
    from select2think.io import read_jsonl as read_lines
    from select2think.local.trigger_head import train_trigger_head

    run_train(
        TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(tmp_path / "sel"),
            epochs=1,
            max_groups=4,
            dtype="fp32",
            device="cpu",
        ),
        progress=False,
    )
    train_trigger_head(collected / "groups", tmp_path / "trig.json", "tiny-slm", epochs=20)
    assert (
        main(
            [
                "bundle",
                "--selector",
                str(tmp_path / "sel"),
                "--trigger",
                str(tmp_path / "ent.json"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )  # no such trigger
    assert (
        main(
            [
                "bundle",
                "--selector",
                str(tmp_path / "sel"),
                "--trigger",
                str(tmp_path / "trig.json"),
                "--out",
                str(tmp_path / "bundle"),
            ]
        )
        == 0
    )
    full = (tmp_path / "sel" / "adapter_model.safetensors").stat().st_size
    half = (tmp_path / "bundle" / "adapter_model.safetensors").stat().st_size
    assert half < 0.6 * full and not (tmp_path / "bundle" / "train_state.json").exists()
    base = [
        "eval",
        "--slm",
        "tiny-slm",
        "--dataset",
        "gsm_symbolic:dev",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*base, "--policy", f"s2t-local={tmp_path / 'bundle'},decoupled"]) == 0
    rows = read_lines(tmp_path / "run" / "results.shard0of1.jsonl")
    assert {r["policy"] for r in rows} == {"s2t-local[bundle,learned,decoupled]"}
    assert all(r["stats"]["llm_forwards"] == 0 for r in rows)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "2+2?",
                "--slm",
                "tiny-slm",
                "--policy",
                "s2t-local",
                "--adapter",
                str(tmp_path / "bundle"),
                "--max-new-tokens",
                "6",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["stats"]["llm_forwards"] == 0
    assert (
        main(["generate", "2+2?", "--slm", "tiny-slm", "--policy", "s2t-local", "--dtype", "fp32"]) == 2
    )  # none ships


def test_demo_adds_s2t_local_when_a_bundle_ships(collected, tmp_path, monkeypatch, tiny_pair):
    import select2think.demo as demo
    from select2think.local.bundle import export_bundle
    from select2think.local.trigger_head import train_trigger_head

    run_train(
        TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(tmp_path / "sel"),
            epochs=1,
            max_groups=2,
            dtype="fp32",
            device="cpu",
        ),
        progress=False,
    )
    train_trigger_head(collected / "groups", tmp_path / "trig.json", "tiny-slm", epochs=20)
    bundle = export_bundle(tmp_path / "sel", tmp_path / "trig.json", tmp_path / "bundle")
    monkeypatch.setattr(demo, "shipped_bundle", lambda slm: bundle if slm == "tiny-slm" else None)
    pair = load_pair("tiny-slm", "tiny-llm", dtype="fp32", device="cpu")
    rows = demo.run_demo(pair, n=1, max_new_tokens=6, n_calib=1)
    assert [r.policy.split(" ")[0] for r in rows] == ["greedy", "llm", "s2t", "s2t-local"]
    assert rows[-1].llm_forwards == 0 and rows[-1].tokens > 0


def test_applied_selector_scores_in_fp32_even_on_a_bf16_model(collected, tmp_path):
    from safetensors.torch import load_file

    run_train(
        TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(tmp_path / "sel"),
            epochs=1,
            max_groups=2,
            dtype="fp32",
            device="cpu",
        ),
        progress=False,
    )
    pair = apply_selector(load_pair("tiny-slm", None, dtype="bf16", device="cpu"), tmp_path / "sel")
    rows = load_file(tmp_path / "sel" / "reserved_rows.safetensors")["weight"]
    ctx, cands = [1, 2, 3, 4, 5], [10, 20, 30]
    with torch.no_grad():
        raw = candidate_logits(pair.slm_module(), ctx, cands)
    assert raw.dtype == torch.float32 and pair.selector.rows.dtype == torch.float32
    assert torch.equal(pair.selector.rows, rows)  # scored in fp32 as trained, though the model runs in bf16


def test_validation_flags_a_collapsed_score_head(collected):
    from select2think.local.train import evaluate

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    cfg = TrainConfig(slm="tiny-slm", groups="", out="", prior_weight=0.0)
    model, rows = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
    groups = load_groups(collected / "groups")[:4]
    assert evaluate(model, rows, groups, pair.vocab_size, cfg)["tied"] == 0.0
    with torch.no_grad():
        rows.weight[:] = rows.weight[0]  # every reserved row alike: every candidate scores the same
    collapsed = evaluate(model, rows, groups, pair.vocab_size, cfg)
    assert collapsed["tied"] == 1.0 and collapsed["agree_at_1"] == collapsed["slm_top1_agree"]


def test_a_selector_with_a_prior_starts_as_greedy_and_decodes_as_it_was_scored(collected, tmp_path):
    from select2think.local.objective import batch_scores
    from select2think.local.selector import save_selector
    from select2think.local.train import evaluate

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    cfg = TrainConfig(slm="tiny-slm", groups="", out="")
    assert cfg.prior_weight > 0  # the default
    model, rows = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
    groups = load_groups(collected / "groups")
    untrained = evaluate(model, rows, groups, pair.vocab_size, cfg)
    assert untrained["tied"] == 1.0 and untrained["agree_at_1"] == untrained["slm_top1_agree"]
    g = groups[0]
    scores, _, head = (x[0] for x in batch_scores(model, [g], pair.reserved_ids, pair.vocab_size, cfg))
    slm_logp = torch.tensor(g["slm_probs"]).log()
    assert torch.allclose(head, torch.full_like(head, 0.5))
    assert torch.allclose(scores - 0.5, cfg.prior_weight * slm_logp, atol=1e-4)  # the prior is the SLM's log-prob
    save_selector(model, rows, pair.reserved_ids, tmp_path / "untrained", {"slm": "tiny-slm", "prior_weight": 0.1})
    prompts = ["What is 2+2?", "Name a fruit."]

    def ids(res):
        return [g.token_ids for g in res.generations]

    greedy = generate(
        load_pair("tiny-slm", None, dtype="fp32", device="cpu"),
        prompts,
        DecodeConfig(policy="greedy", max_new_tokens=16),
    )
    local = {"policy": "s2t-local", "trigger": "always", "max_new_tokens": 16}
    as_greedy = apply_selector(load_pair("tiny-slm", None, dtype="fp32", device="cpu"), tmp_path / "untrained")
    assert as_greedy.selector.prior_weight == 0.1
    assert ids(generate(as_greedy, prompts, DecodeConfig(**local))) == ids(greedy)

    out = tmp_path / "trained"
    run_train(
        TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(out),
            epochs=1,
            max_groups=12,
            dtype="fp32",
            device="cpu",
            lr=5e-3,
            head_lr=5e-2,
        ),
        progress=False,
    )
    for mode in ("coupled", "decoupled"):
        trained = apply_selector(load_pair("tiny-slm", None, dtype="fp32", device="cpu"), out, mode=mode)
        fast = generate(trained, prompts, DecodeConfig(local_mode=mode, **local))
        spec = generate(trained, prompts, DecodeConfig(local_mode=mode, fast=False, **local), batch_size=1)
        assert ids(fast) == ids(spec), mode  # tree scoring + prior == K full prefixes + prior


def test_head_only_fits_rows_on_cached_hidden_states_and_keeps_its_best_epoch(collected, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import select2think.local.head_only as head_mod
    from select2think import S2TError
    from select2think.local.bundle import export_bundle
    from select2think.local.head_only import feature_dir

    def cfg(out, **kw):
        return TrainConfig(
            slm="tiny-slm",
            groups=str(collected / "groups"),
            out=str(out),
            epochs=6,
            max_groups=12,
            dtype="fp32",
            device="cpu",
            head_lr=5e-2,
            head_batch=4,
            checkpoint_every=5,
            head_only=True,
            **kw,
        )

    res = run_train(cfg(tmp_path / "head"), progress=False)
    out = tmp_path / "head"
    assert not (out / "adapter_config.json").exists()  # no LoRA: the rows are the whole selector
    meta = json.loads((out / "selector.json").read_text())
    assert meta["head_only"] and meta["best_epoch"] == res["best_epoch"] and len(meta["history"]) == 7
    assert meta["history"][0]["flips"] == 0  # untrained, with the collection's own prior: exactly greedy
    best = meta["history"][res["best_epoch"]]["agree_at_1"]
    assert best == max(h["agree_at_1"] for h in meta["history"])
    rows = load_file(out / "reserved_rows.safetensors")["weight"]
    assert (rows.abs().sum() > 0) == (res["best_epoch"] > 0)  # zero rows = the untrained selector was kept
    assert len(list(feature_dir(cfg(out)).glob("*.pt"))) == 3  # 12 groups in chunks of 5
    # the cached features are what the backbone computes: the head scores them as evaluate() does
    from select2think.local.objective import split_groups
    from select2think.local.train import evaluate

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    model, r = prepare_model(pair.slm_module(), pair.reserved_ids, TrainConfig(slm="tiny-slm", groups="", out=""))
    with torch.no_grad():
        r.weight.copy_(rows)
    _, val = split_groups(load_groups(collected / "groups", 12), cfg(out))
    assert len(val) == meta["val_groups"]
    assert evaluate(model, r, val, pair.vocab_size, cfg(out))["agree_at_1"] == pytest.approx(best)
    # a second run (new learning rate) reuses every cached chunk: no backbone forward at all
    monkeypatch.setattr(head_mod, "computed", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    again = run_train(cfg(tmp_path / "again", seed=1, keep="last"), progress=False)
    assert again["best_epoch"] == 6  # keep="last": the last epoch's rows, whatever validation says
    with pytest.raises(S2TError, match="keep"):
        cfg(tmp_path / "x", keep="first")
    # it decodes with no LLM, tree path == K full prefixes, and bundles without an adapter
    trained = apply_selector(load_pair("tiny-slm", None, dtype="fp32", device="cpu"), out)
    local = {"policy": "s2t-local", "trigger": "always", "max_new_tokens": 12}
    prompts = ["What is 2+2?", "Name a fruit."]

    def ids(res):
        return [g.token_ids for g in res.generations]

    assert ids(generate(trained, prompts, DecodeConfig(**local))) == ids(
        generate(trained, prompts, DecodeConfig(fast=False, **local), batch_size=1)
    )
    with pytest.raises(S2TError, match="head-only"):
        apply_selector(load_pair("tiny-slm", None, dtype="fp32", device="cpu"), out, mode="decoupled")
    with pytest.raises(S2TError, match="learned trigger"):
        export_bundle(out, tmp_path / "missing.json", tmp_path / "bundle")


def test_the_kl_to_base_covers_the_prefix_distribution_and_each_candidate():
    """The prefix's row is what the SLM generates from and the prior in every score: a LoRA that moves it
    pays for it, as it pays for moving a candidate's row."""
    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    ctx, cands = [1, 2, 3, 4, 5], [10, 20, 30, 40]
    cfg = TrainConfig(slm="tiny-slm", groups="", out="", w_ce=0, w_hinge=0, w_list=0, w_base=1.0, lora_dropout=0.0)
    model, _ = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    group = {"context": ctx, "candidates": cands, "llm_probs": [0.1, 0.6, 0.2, 0.1]}
    loss, _, _ = batch_loss(model, [group], pair.reserved_ids, pair.vocab_size, cfg)
    V = pair.vocab_size
    with torch.no_grad():
        new = candidate_logits(model, ctx, cands, with_prefix=True)[:, :V].log_softmax(-1)
        with model.disable_adapter():
            old = candidate_logits(model, ctx, cands, with_prefix=True)[:, :V].log_softmax(-1)
    kl = (new.exp() * (new - old)).sum(-1)
    assert kl.shape == (1 + len(cands),) and float(kl[0]) > 0
    assert torch.allclose(loss.detach(), kl.mean(), rtol=1e-4)


def test_lora_validates_every_n_groups_and_keeps_the_best_point(collected, tmp_path):
    out = tmp_path / "sel"
    cfg = small_lora(collected, out, val_every=4, group_batch=1)  # a validation after every 4th group
    res = run_train(cfg, progress=False)
    n_train = json.loads((out / "selector.json").read_text())["train_groups"]
    seen = [h["groups_seen"] for h in res["history"]]
    assert seen == [0, *range(4, n_train, 4), n_train]
    kept = json.loads((out / "best" / "selector.json").read_text())["kept"]
    assert kept["agree_at_1"] == max(h["agree_at_1"] for h in res["history"])
    assert (
        kept["groups_seen"] == next(h for h in res["history"] if h["agree_at_1"] == kept["agree_at_1"])["groups_seen"]
    )
    pair = apply_selector(load_pair("tiny-slm", None, dtype="fp32", device="cpu"), out / "best")
    assert pair.selector is not None


def test_flip_label_is_where_s2t_would_change_the_token(collected, tmp_path, capsys):
    """At every collected group (a kl-fired step) the flip label says whether the LLM's pick among the top 8
    differs from the SLM's top-1; a trigger trained on it records its label; problems collected before
    `llm_top` existed are skipped, and a directory of only those is refused."""
    import shutil

    from select2think.cli import main
    from select2think.local.trigger_head import load_features, step_labels, train_trigger_head

    groups = load_groups(collected / "groups")
    n_flips = 0
    for g in groups:
        z = np.load(collected / "groups" / "features" / f"{g['item']}.npz")
        want = int(np.argmax(g["llm_probs"][:8])) != 0
        assert bool(step_labels(z, "flip", 8)[g["step"]]) == want
        assert not step_labels(z, "flip", 8)[:3].any()  # the warm-up never triggers
        n_flips += want
    assert 0 < n_flips < len(groups)

    old = tmp_path / "old"
    shutil.copytree(collected / "groups", old)
    files = sorted((old / "features").glob("*.npz"))
    z = dict(np.load(files[0]))
    z.pop("llm_top")
    np.savez(files[0], **z)
    _, _, owner, skipped = load_features(old, "flip")
    assert skipped == 1 and files[0].stem not in set(owner.tolist())
    metrics = train_trigger_head(old, tmp_path / "flip.json", "tiny-slm", epochs=20, label="flip")
    assert metrics["label"] == "flip" and metrics["skipped_problems"] == 1
    assert json.loads((tmp_path / "flip.json").read_text())["label"] == "flip@8"
    assert main(["train-trigger", "--groups", str(old), "--out", str(tmp_path / "cli.json"), "--label", "flip"]) == 0
    assert "1 without the label skipped" in capsys.readouterr().out

    for f in files[1:]:
        z = dict(np.load(f))
        z.pop("llm_top")
        np.savez(f, **z)
    assert main(["train-trigger", "--groups", str(old), "--out", str(tmp_path / "t.json"), "--label", "flip"]) == 2
    assert "before flips were recorded" in capsys.readouterr().err
    assert main(["train-trigger", "--groups", str(old), "--out", str(tmp_path / "t.json"), "--label", "nope"]) == 2


def test_a_batch_of_one_problems_groups_trains_as_the_mean_of_its_groups_alone(collected):
    """One tree forward over a problem's trajectory scores all its groups: the loss (KL-to-base included) and
    its gradients are those of the groups one at a time, averaged."""
    from select2think.local.objective import batch_logits, shared_trajectories

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    cfg = TrainConfig(slm="tiny-slm", groups="", out="", lora_dropout=0.0)
    model, rows = prepare_model(pair.slm_module(), pair.reserved_ids, cfg)
    with torch.no_grad():
        rows.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    groups = load_groups(collected / "groups")
    batch = [groups[i] for i in max(shared_trajectories(groups, 4), key=len)]
    assert len(batch) > 1 and len({g["item"] for g in batch}) == 1
    assert sorted(i for b in shared_trajectories(groups, 4) for i in b) == list(range(len(groups)))

    def grads(loss):
        model.zero_grad()
        rows.weight.grad = None
        loss.backward()
        return [p.grad.clone() for p in [*model.parameters(), rows.weight] if p.grad is not None]

    loss, scores, _ = batch_loss(model, batch, pair.reserved_ids, pair.vocab_size, cfg)
    together = grads(loss)
    alone = [batch_loss(model, [g], pair.reserved_ids, pair.vocab_size, cfg) for g in batch]
    assert torch.allclose(scores, torch.cat([s for _, s, _ in alone]), atol=1e-4)
    mean = grads(sum(x for x, _, _ in alone) / len(batch))
    assert torch.allclose(loss, sum(x for x, _, _ in alone) / len(batch), rtol=1e-4)
    assert len(together) == len(mean) > 2
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(together, mean, strict=True))
    other = dict(batch[0], context=[7, *batch[0]["context"][1:]])
    with pytest.raises(ValueError, match="prefixes"):
        batch_logits(model, [batch[-1], other])


def test_lora_starts_from_a_head_only_selectors_rows(collected, tmp_path):
    from select2think import S2TError

    kw = {"groups": str(collected / "groups"), "max_groups": 12, "dtype": "fp32", "device": "cpu"}
    head_cfg = {"head_only": True, "epochs": 3, "head_lr": 5e-2, "head_batch": 4, "keep": "last"}
    run_train(TrainConfig(slm="tiny-slm", out=str(tmp_path / "head"), **head_cfg, **kw), progress=False)
    head = load_file(tmp_path / "head" / "reserved_rows.safetensors")["weight"]
    assert head.abs().sum() > 0
    cfg = small_lora(collected, tmp_path / "lora", init_rows=str(tmp_path / "head"), lr=0.0, head_lr=0.0)
    res = run_train(cfg, progress=False)
    assert torch.equal(load_file(tmp_path / "lora" / "reserved_rows.safetensors")["weight"], head)  # lr 0: unmoved
    assert res["history"][0]["flips"] > 0  # the untrained point is the head-only selector's, not greedy
    with pytest.raises(S2TError, match="prior weight"):
        run_train(small_lora(collected, tmp_path / "x", init_rows=str(tmp_path / "head"), prior_weight=0.2))
