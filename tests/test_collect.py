"""`s2t collect` at scale: groups recorded while decoding equal the old two-pass method's (decode, then
teacher-force both models over the trajectory); both trajectories; shards, resume and refusals; enough
gsm_symbolic training problems."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from select2think import DecodeConfig, S2TError, generate
from select2think.cli import main
from select2think.decoding.teacher import step_logprobs
from select2think.decoding.triggers import KLTrigger, step_features
from select2think.decoding.vocab import Vocab
from select2think.local.collect import CONTEXT, CollectConfig, collect_batch, collect_rows, parse_shard, run_collect
from select2think.local.objective import group_files, load_groups
from select2think.models.chat import encode_prompts

TINY = ["--dtype", "fp32", "--device", "cpu"]
PROMPTS = ["What is 2+2?", "Name three colors.", "Count to five.", "Spell cat."]
THRESHOLD = 2.9  # about the median kl statistic on the tiny pair: half the steps fire


def two_pass(pair, prompt_ids, gen, threshold, k, warmup):
    """The old collection (kept here as the reference): teacher-force both models over the trajectory."""
    ids = prompt_ids + gen
    vocab = Vocab.of(pair)
    s_lp, h = step_logprobs(pair.slm, prompt_ids, gen, vocab, hidden=True)
    l_lp, _ = step_logprobs(pair.require_llm(), prompt_ids, gen, vocab)
    stat = KLTrigger().statistic(s_lp, l_lp)
    fired = (stat > threshold) & (torch.arange(len(gen)) >= warmup)
    top_p, top_i = s_lp.topk(k, dim=-1)
    groups = [
        {
            "step": t,
            "context": ids[: len(prompt_ids) + t][-CONTEXT:],
            "candidates": top_i[t].tolist(),
            "llm_probs": l_lp[t, top_i[t]].exp().tolist(),
            "slm_probs": top_p[t].exp().tolist(),
        }
        for t in fired.nonzero().flatten().tolist()
    ]
    feats = {
        "stat": stat.numpy(),
        "label": fired.numpy(),
        "features": step_features(s_lp).numpy(),
        "hidden": h.numpy(),
        "llm_top": l_lp.gather(-1, top_i).numpy(),
        "ids": np.asarray(ids),
        "top_i": top_i.numpy(),
        "top_logp": top_p.numpy(),
    }
    return groups, feats


def _cfg(**kw):
    base = {"slm": "tiny-slm", "llm": "tiny-llm", "dataset": "", "out": "", "threshold_file": "", "max_new_tokens": 24}
    return CollectConfig(**{**base, "dtype": "fp32", "device": "cpu", **kw})


def _assert_same(pair, prompt_ids, got, k=16, warmup=3):
    """Each prompt's recorded groups and features equal the two-pass method's on its trajectory."""
    n_groups = 0
    for p_ids, (gen, groups, feats) in zip(prompt_ids, got, strict=True):
        ref_groups, ref = two_pass(pair, p_ids, gen, THRESHOLD, k, warmup)
        assert np.allclose(feats["stat"], ref["stat"], atol=1e-4)
        assert (feats["label"] == ref["label"]).all()
        assert np.allclose(feats["features"], ref["features"], atol=1e-4)
        assert np.allclose(feats["llm_top"], ref["llm_top"], atol=1e-4)
        assert (feats["ids"] == ref["ids"]).all() and int(feats["prompt_len"]) == len(p_ids)
        assert (feats["top_i"] == ref["top_i"]).all()
        assert np.allclose(feats["top_logp"], ref["top_logp"], atol=1e-4)
        assert np.allclose(feats["hidden"].astype(np.float32), ref["hidden"], atol=2e-2)  # fp16 on disk
        assert [g["step"] for g in groups] == [g["step"] for g in ref_groups]
        for g, r in zip(groups, ref_groups, strict=True):
            assert g["context"] == r["context"] and g["candidates"] == r["candidates"]
            assert np.allclose(g["llm_probs"], r["llm_probs"], atol=1e-5)
            assert np.allclose(g["slm_probs"], r["slm_probs"], atol=1e-5)
        n_groups += len(groups)
    return n_groups


@pytest.fixture(scope="module")
def prompt_ids(tiny_pair):
    return encode_prompts(tiny_pair.tokenizer, PROMPTS, True)


@pytest.mark.parametrize("fast,draft_len", [(True, 16), (True, 3), (False, 16)])
def test_s2t_groups_recorded_while_decoding_equal_the_two_pass_method(tiny_pair, prompt_ids, fast, draft_len):
    cfg = _cfg()
    dcfg = DecodeConfig(
        policy="s2t", trigger="kl", threshold=THRESHOLD, k=16, max_new_tokens=24, fast=fast, draft_len=draft_len
    )
    got = collect_batch(tiny_pair, prompt_ids, cfg, THRESHOLD, dcfg)
    assert _assert_same(tiny_pair, prompt_ids, got) > 5
    # recording changes nothing: the same tokens as a decode without a recorder
    plain = generate(tiny_pair, [""] * len(prompt_ids), dcfg, prompt_ids=prompt_ids, batch_size=len(prompt_ids))
    assert [g.token_ids for g in plain.generations] == [gen for gen, _, _ in got]
    assert plain.stats.flips > 0  # draft and verify rolled back: corrected steps were recorded too


def test_slm_trajectory_is_greedy_and_its_groups_equal_the_two_pass_method(tiny_pair, prompt_ids):
    got = collect_batch(tiny_pair, prompt_ids, _cfg(trajectory="slm"), THRESHOLD)
    greedy = generate(tiny_pair, [""] * len(prompt_ids), DecodeConfig(max_new_tokens=24), prompt_ids=prompt_ids)
    assert [g.token_ids for g in greedy.generations] == [gen for gen, _, _ in got]
    assert _assert_same(tiny_pair, prompt_ids, got) > 5


@pytest.mark.parametrize("trajectory", ["s2t", "slm"])
def test_rows_refilled_mid_decode_record_the_same_groups(tiny_pair, prompt_ids, trajectory):
    """Two rows for four problems: each finished row's slot takes the next problem, its groups handed over
    at once, and every problem's groups still equal the two-pass method's on its trajectory."""
    cfg = _cfg(trajectory=trajectory, k=16)
    order, got = [], {}

    def keep(r, collected):
        order.append(r)
        got[r] = collected

    collect_rows(tiny_pair, prompt_ids, cfg, THRESHOLD, keep, batch_size=2)
    assert sorted(order) == [0, 1, 2, 3]
    assert _assert_same(tiny_pair, prompt_ids, [got[r] for r in range(4)]) > 5


def test_a_recorder_sees_every_committed_step_once_in_order(tiny_pair, prompt_ids):
    seen = []

    class Rec:
        wants_hidden = False

        def record(self, steps):
            assert steps.hidden is None and steps.slm_logp.shape[0] == len(steps.rows)
            seen.extend(zip(steps.rows, steps.steps, steps.tokens, strict=True))

    dcfg = DecodeConfig(policy="s2t", trigger="kl", threshold=THRESHOLD, max_new_tokens=24, draft_len=4)
    res = generate(tiny_pair, [""] * 4, dcfg, prompt_ids=prompt_ids, batch_size=3, recorder=Rec())  # two batches
    for r, g in enumerate(res.generations):
        mine = [(s, t) for row, s, t in seen if row == r]
        assert mine == list(enumerate(g.token_ids))
    with pytest.raises(S2TError, match="not supported"):
        generate(
            tiny_pair, [""], DecodeConfig(policy="llm", max_new_tokens=2), prompt_ids=prompt_ids[:1], recorder=Rec()
        )


def _thr_file(tmp_path, threshold=THRESHOLD):
    p = tmp_path / "kl.json"
    p.write_text(json.dumps({"trigger": "kl", "threshold": threshold, "slm": "tiny-slm", "llm": "tiny-llm"}))
    return str(p)


def _items(out, name):
    return [r["item"] for r in map(json.loads, (out / name).read_text().splitlines())]


def test_shards_merge_into_the_unsharded_groups_and_resume(tmp_path):
    thr = _thr_file(tmp_path)
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": thr, "limit": 5, "max_new_tokens": 12, "batch_size": 1}
    kw["trajectory"] = "slm"
    whole = run_collect(_cfg(out=str(tmp_path / "whole"), **kw), progress=False)
    for i in range(2):
        run_collect(_cfg(out=str(tmp_path / "sharded"), shard=(i, 2), **kw), progress=False)
    sharded = tmp_path / "sharded"
    assert [p.name for p in group_files(sharded)] == ["groups.shard0of2.jsonl", "groups.shard1of2.jsonl"]
    everything = _items(whole, "groups.jsonl")
    assert _items(sharded, "groups.shard0of2.jsonl") == everything[0::2]
    assert _items(sharded, "groups.shard1of2.jsonl") == everything[1::2]
    key = lambda g: (g["item"], g["step"])  # noqa: E731
    a, b = sorted(load_groups(whole), key=key), sorted(load_groups(sharded), key=key)
    assert a == b and len(a) > 0  # one problem per batch: the very same computations
    assert sorted(p.name for p in (sharded / "features").glob("*.npz")) == sorted(f"{i}.npz" for i in everything)
    before = (sharded / "groups.shard0of2.jsonl").read_bytes()
    run_collect(_cfg(out=str(sharded), shard=(0, 2), **kw), progress=False)  # resume: nothing left to do
    assert (sharded / "groups.shard0of2.jsonl").read_bytes() == before
    run_collect(_cfg(out=str(sharded), shard=(0, 2), **{**kw, "limit": 7}), progress=False)  # the limit grows
    grown = _items(sharded, "groups.shard0of2.jsonl")
    assert grown[:3] == everything[0::2] and len(grown) == 4
    with pytest.raises(S2TError, match="2 shard"):
        run_collect(_cfg(out=str(sharded), shard=(0, 3), **kw), progress=False)
    with pytest.raises(S2TError, match="trajectory"):
        run_collect(_cfg(out=str(sharded), shard=(0, 2), **{**kw, "trajectory": "s2t"}), progress=False)


def test_groups_rebuilt_from_a_problems_features_file_equal_the_written_ones(tmp_path):
    """features/ITEM.npz holds the trajectory and every step's top-K, so a group can be built at any step
    later (say where an SLM-only trigger fires): at the kl firings it is exactly the group written."""
    from select2think.local.collect import step_groups

    out = tmp_path / "g"
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": _thr_file(tmp_path), "limit": 2, "max_new_tokens": 16}
    run_collect(_cfg(out=str(out), trajectory="slm", **kw), progress=False)
    groups = load_groups(out)
    assert groups
    for item in {g["item"] for g in groups}:
        z = dict(np.load(out / "features" / f"{item}.npz"))
        written = [{k: v for k, v in g.items() if k != "item"} for g in groups if g["item"] == item]
        rebuilt = step_groups(z, np.flatnonzero(z["label"]).tolist())
        assert [g["step"] for g in rebuilt] == [g["step"] for g in written]
        for a, b in zip(rebuilt, written, strict=True):
            assert a["context"] == b["context"] and a["candidates"] == b["candidates"]
            assert np.allclose(a["llm_probs"], b["llm_probs"]) and np.allclose(a["slm_probs"], b["slm_probs"])
        assert len(step_groups(z, list(range(len(z["label"]))))) == len(z["label"])  # any step at all


def test_regroup_builds_the_groups_where_an_slm_only_trigger_fires(tmp_path, capsys):
    """`s2t regroup`: from a collection's records alone, a group at every step (after the warm-up) where the
    entropy trigger's statistic exceeds its threshold; problems from before the records are skipped; the
    result trains like a collection; kl files and an existing directory are refused in one line."""
    from select2think.local.collect import step_groups

    src = tmp_path / "src"
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": _thr_file(tmp_path), "limit": 3, "max_new_tokens": 16}
    run_collect(_cfg(out=str(src), trajectory="slm", **kw), progress=False)
    old = sorted((src / "features").glob("*.npz"))[0]  # as if collected before session 11
    z = dict(np.load(old))
    for key in ("ids", "prompt_len", "top_i", "top_logp"):
        z.pop(key)
    np.savez(old, **z)
    feats = {f.stem: dict(np.load(f)) for f in (src / "features").glob("*.npz")}
    median = float(np.median(np.concatenate([f["features"][:, 0] for f in feats.values()])))
    thr = tmp_path / "entropy.json"
    thr.write_text(json.dumps({"trigger": "entropy", "threshold": median, "slm": "tiny-slm"}))
    out = tmp_path / "regrouped"
    assert main(["regroup", "--groups", str(src), "--threshold-file", str(thr), "--out", str(out)]) == 0
    assert "1 collected before" in capsys.readouterr().out
    got = load_groups(out)
    assert {g["item"] for g in got} <= set(feats) - {old.stem}
    for item, z in feats.items():
        if item == old.stem:
            continue
        steps = [t for t in range(len(z["label"])) if t >= 3 and z["features"][t, 0] > median]
        assert [g["step"] for g in got if g["item"] == item] == steps
        mine = [{k: v for k, v in g.items() if k != "item"} for g in got if g["item"] == item]
        assert mine == json.loads(json.dumps(step_groups(z, steps)))
    assert len(got) > 5 and (out / "features").resolve() == (src / "features").resolve()
    assert json.loads((out / "collect.json").read_text())["identity"]["groups_at"]["trigger"] == "entropy"
    margin = {p.stem: 1 - np.load(p)["features"][:, 1] for p in (src / "features").glob("*.npz")}
    median = float(np.median(np.concatenate(list(margin.values()))))
    thr.write_text(json.dumps({"trigger": "margin", "threshold": median, "slm": "tiny-slm"}))
    assert main(["regroup", "--groups", str(src), "--threshold-file", str(thr), "--out", str(tmp_path / "m")]) == 0
    by_margin = load_groups(tmp_path / "m")
    for item in {g["item"] for g in got}:
        steps = [t for t, m in enumerate(margin[item]) if t >= 3 and m > median]
        assert [g["step"] for g in by_margin if g["item"] == item] == steps
    train = f"train --slm tiny-slm --groups {out} --out {tmp_path / 'sel'} --head-only --epochs 1".split()
    assert main([*train, *TINY]) == 0  # trains like a collection
    regroup = f"regroup --groups {src} --threshold-file {thr} --out".split()
    assert main([*regroup, str(out)]) == 2
    assert "new directory" in capsys.readouterr().err
    assert main([*regroup[:3], "--threshold-file", _thr_file(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "SLM-only" in capsys.readouterr().err


def test_old_directories_without_a_trajectory_resume_as_s2t(tmp_path):
    from select2think.local.collect import check_settings

    cfg = _cfg(out=str(tmp_path / "g"), threshold_file=_thr_file(tmp_path), dataset="gsm_symbolic:train")
    old = cfg.identity()
    del old["trajectory"]
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "collect.json").write_text(json.dumps({"identity": old}))
    check_settings(cfg, tmp_path / "g")  # no error
    with pytest.raises(S2TError, match="trajectory"):
        check_settings(_cfg(**{**cfg.__dict__, "trajectory": "slm"}), tmp_path / "g")


def test_cli_collect_takes_trajectory_and_shard(tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["collect", "--slm", "tiny-slm", "--llm", "tiny-llm", "--threshold-file", _thr_file(tmp_path)]
    argv += ["--out", str(out), "--limit", "3", "--max-new-tokens", "8", *TINY]
    assert main([*argv, "--trajectory", "slm", "--shard", "1/2"]) == 0
    assert [p.name for p in group_files(out)] == ["groups.shard1of2.jsonl"]
    assert len(_items(out, "groups.shard1of2.jsonl")) == 1
    capsys.readouterr()
    assert main([*argv, "--trajectory", "slm", "--shard", "2/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main([*argv, "--trajectory", "beam"]) == 2
    assert "--trajectory" in capsys.readouterr().err


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(S2TError):
            parse_shard(bad)


def test_gsm_symbolic_train_gives_thousands_of_problems_disjoint_from_calib_and_dev():
    from select2think.data.datasets import load_gsm_symbolic

    train = load_gsm_symbolic("train", limit=3000).items
    assert len(train) == 3000
    assert len({it.question for it in train}) == 3000 and len({it.id for it in train}) == 3000
    held = [it for split in ("calib", "dev") for it in load_gsm_symbolic(split, limit=300).items]
    assert not {it.question for it in train} & {it.question for it in held}
    assert not {it.id for it in train} & {it.id for it in held}
    assert [it.id for it in load_gsm_symbolic("train", limit=200).items] == [it.id for it in train[:200]]


def test_a_gsm_symbolic_items_template_is_regenerated_from_its_id():
    """Problems of one template share their variables' names (and differ in values): the signature tells which
    held-out problems have a template that also trains."""
    import reasoning_gym

    from select2think.data.datasets import gsm_symbolic_template, load_gsm_symbolic

    items = load_gsm_symbolic("train", limit=300).items
    names = [gsm_symbolic_template(it.id) for it in items]
    assert 20 < len(set(names)) < 120  # about 100 templates; 300 draws repeat many of them
    seed, round_, i = (int(x) for x in items[7].id.split("-")[1:])
    regenerated = reasoning_gym.create_dataset("gsm_symbolic", size=i + 1, seed=seed * 1000 + round_)[i]
    assert regenerated["question"] == items[7].question  # the id alone finds the item
    assert names[7] == ",".join(sorted(regenerated["metadata"]["variables"]))
    assert gsm_symbolic_template("gsm8k-3") is None


def test_one_tree_forward_per_trajectory_gives_each_groups_candidate_hidden_states(tiny_pair):
    from select2think.local.objective import candidate_hidden, prefix_logp, trajectory_hidden

    model = tiny_pair.slm_module()
    ids = list(range(5, 45))
    lens, cands = [7, 20, 20, 33, 40], [[3, 9, 11], [4, 8, 15], [16, 23, 42], [1, 2, 3], [50, 60, 70]]
    with torch.no_grad():  # two groups per forward
        parts = [trajectory_hidden(model, ids, lens[a : a + 2], cands[a : a + 2]) for a in range(0, len(lens), 2)]
    hidden, prefix = torch.cat([h for h, _ in parts]), torch.cat([p for _, p in parts])
    logp = prefix_logp(model, prefix, torch.tensor(cands), tiny_pair.vocab_size)
    for g, (P, c) in enumerate(zip(lens, cands, strict=True)):
        ref = candidate_hidden(model, ids[:P], c, "tree", with_prefix=True)
        assert torch.allclose(hidden[g], ref[1:], atol=1e-4)
        assert torch.allclose(
            logp[g], prefix_logp(model, ref[:1], torch.tensor([c]), tiny_pair.vocab_size)[0], atol=1e-4
        )


def test_candidate_hidden_from_collect_is_what_head_only_computes(tmp_path, monkeypatch):
    import select2think.local.head_only as head_mod
    from select2think.local.head_only import CollectedCandidates, group_features
    from select2think.local.objective import TrainConfig

    out = tmp_path / "g"
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": _thr_file(tmp_path), "limit": 3, "max_new_tokens": 16}
    run_collect(_cfg(out=str(out), candidate_hidden=True, batch_size=2, **kw), progress=False)  # the third refills
    groups = load_groups(out)
    z = np.load(out / "features" / f"{groups[0]['item']}.npz")
    assert len(z["cand_steps"]) == len([g for g in groups if g["item"] == groups[0]["item"]])  # short prompts
    cfg = TrainConfig(slm="tiny-slm", groups=str(out), out="", dtype="fp32", checkpoint_every=1000)
    from select2think import load_pair

    slm = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    model, V = slm.slm_module(), slm.vocab_size
    assert CollectedCandidates(cfg).usable
    with monkeypatch.context() as m:  # every group comes from the collected features: no per-group forward
        m.setattr(head_mod, "candidate_hidden", lambda *a, **k: pytest.fail("recomputed a collected group"))
        fast_h, fast_lp = group_features(model, groups, V, cfg, progress=False)
    other = TrainConfig(**{**cfg.__dict__, "groups": str(out), "layout": "naive"})  # not collected: computed
    assert not CollectedCandidates(other).usable
    ref_h, ref_lp = group_features(model, groups, V, other, progress=False)
    assert torch.allclose(fast_h, ref_h, atol=2e-2, rtol=1e-2)  # fp16 on disk
    assert torch.allclose(fast_lp, ref_lp, atol=1e-4)


def test_head_only_computes_a_problems_groups_in_one_tree_pass_as_each_alone(tmp_path):
    from select2think import load_pair
    from select2think.local.head_only import computed
    from select2think.local.objective import TrainConfig, candidate_hidden, prefix_logp

    out = tmp_path / "g"
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": _thr_file(tmp_path), "limit": 2, "max_new_tokens": 16}
    run_collect(_cfg(out=str(out), **kw), progress=False)
    groups = load_groups(out)
    cut = dict(groups[-1], context=groups[-1]["context"][1:])  # not a prefix of its problem's trajectory
    groups = [*groups, cut]
    assert len({g["item"] for g in groups}) == 2 and len(groups) > 3
    cfg = TrainConfig(slm="tiny-slm", groups=str(out), out="", dtype="fp32")
    slm = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    model, V = slm.slm_module(), slm.vocab_size
    for g, (h, lp) in zip(groups, computed(model, groups, V, cfg.layout), strict=True):
        ref = candidate_hidden(model, g["context"], g["candidates"], "tree", with_prefix=True)
        assert torch.allclose(h, ref[1:].float(), atol=1e-4)
        assert torch.allclose(lp, prefix_logp(model, ref[:1], torch.tensor([g["candidates"]]), V)[0], atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_candidate_hidden_collected_on_llamacpp_are_its_sibling_states(tmp_path):
    """On llama.cpp the candidates' hidden states come from llama.cpp itself (the engine the selector will
    decode on): each group's equal the tiny model's in transformers to llama.cpp's precision."""
    from select2think import load_pair
    from select2think.local.head_only import computed

    out = tmp_path / "g"
    kw = {"dataset": "gsm_symbolic:train", "threshold_file": _thr_file(tmp_path), "limit": 3, "max_new_tokens": 16}
    run_collect(_cfg(out=str(out), candidate_hidden=True, batch_size=2, backend="llama.cpp", **kw), progress=False)
    groups = load_groups(out)
    hf = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    n = 0
    for item in {g["item"] for g in groups}:
        mine = [g for g in groups if g["item"] == item]
        z = np.load(out / "features" / f"{item}.npz")
        assert z["cand_steps"].tolist() == [g["step"] for g in mine]  # short prompts: every group is whole
        ref = torch.stack([h for h, _ in computed(hf.slm_module(), mine, hf.vocab_size)])
        got = torch.from_numpy(z["cand_hidden"].astype(np.float32))
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        n += len(mine)
    assert n > 3
