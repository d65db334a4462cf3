"""Quantities that training and inference both compute come from one function: these tests say the numbers
agree where each side computes them."""

import numpy as np
import torch

from select2think import DecodeConfig, generate
from select2think.decoding.teacher import step_logprobs
from select2think.decoding.triggers import step_features
from select2think.decoding.vocab import Vocab
from select2think.local.collect import CollectConfig, collect_batch
from select2think.models.chat import encode_prompts


def _decode_logprobs(pair, prompt_ids):
    """The SLM's log-probs [T, V] at each step of a greedy decode, as decoding saw them."""
    seen = []

    class Recording:  # a trigger that records what the decode loop gives it and never fires
        name, needs_llm, needs_hidden = "record", False, False

        def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
            seen.append(slm_logp.clone())
            return torch.full(slm_logp.shape[:1], -float("inf"))

    res = generate(
        pair,
        [""],
        DecodeConfig(policy="s2t", trigger="kl", threshold=0.0, max_new_tokens=12, fast=False),
        prompt_ids=[prompt_ids],
        trigger=Recording(),
    )
    return torch.cat(seen), res.generations[0].token_ids


def test_teacher_forcing_and_features_equal_what_decoding_saw(tiny_pair):
    banned = (17, 42)  # masked ids must be masked on both sides
    pair = type(tiny_pair)(**{**tiny_pair.__dict__, "reserved_ids": banned})
    ids = encode_prompts(pair.tokenizer, ["What is 2+2?"], True)[0]
    live, gen = _decode_logprobs(pair, ids)
    forced, _ = step_logprobs(pair.slm, ids, gen, Vocab.of(pair))
    assert torch.isinf(forced[:, list(banned)]).all()
    assert torch.allclose(forced, live, atol=1e-4)
    cfg = CollectConfig(slm="", llm="", dataset="", out="", threshold_file="", k=8, max_new_tokens=12, trajectory="slm")
    [(collected, _, feats)] = collect_batch(pair, [ids], cfg, threshold=1e9)  # greedy, as above
    assert collected == gen
    assert np.allclose(feats["features"], step_features(live).numpy(), atol=1e-4)


def test_selector_training_and_the_learned_trigger_hold_out_the_same_problems(tmp_path):
    from select2think.local.objective import TrainConfig, split_groups
    from select2think.local.split import validation_problems

    groups = [{"item": f"p{i}", "candidates": [1, 2], "llm_probs": [0.5, 0.5]} for i in range(20) for _ in range(3)]
    cfg = TrainConfig(slm="x", groups="", out="", val_fraction=0.2)
    _, val = split_groups(groups, cfg)
    assert {g["item"] for g in val} == validation_problems([f"p{i}" for i in range(20)], 0.2, cfg.seed)


def test_validation_holds_out_whole_gsm_symbolic_templates():
    """A held-out problem never shares its template with a training problem (problems of one template
    differ only in names and numbers); other datasets' problems are drawn one by one."""
    from select2think.data.datasets import gsm_symbolic_template, load_gsm_symbolic
    from select2think.local.split import split_unit, validation_problems

    ids = [it.id for it in load_gsm_symbolic("train", limit=200).items]
    val = validation_problems(ids, 0.1, 0)
    templates = {i: gsm_symbolic_template(i) for i in ids}
    assert val and not {templates[i] for i in val} & {templates[i] for i in ids if i not in val}
    units = {split_unit(i) for i in ids}
    assert len(units) < len(ids) and 0.05 < len(val) / len(ids) < 0.2  # 10% of the templates
    assert validation_problems(ids, 0.1, 0) == val and validation_problems(ids, 0.1, 1) != val
    assert split_unit("p3") == "p3" and validation_problems(["p1", "p2"], 0.5, 0) <= {"p1", "p2"}
