"""Continuous batching: rows that join a running batch between steps decode exactly as they would alone."""

import functools
import importlib.util

import numpy as np
import pytest

from select2think import DecodeConfig, generate
from select2think.decoding.api import Decoder
from select2think.decoding.calibrate import step_statistics
from select2think.decoding.state import Arrival, Batch
from select2think.models.chat import encode_prompts

PROMPTS = ["What is 2+2?", "Tell me a long story about a cat and a dog.", "Hi", "Solve x^2 = 9 for x.", "Name a fruit."]


class Script:
    """Arrivals that offer prompt i once `take` has been called `at[i]` times."""

    def __init__(self, dec, prompts, at):
        self.dec, self.calls, self.left = dec, 0, []
        self.waiting = [(t, i, p) for i, (p, t) in enumerate(zip(prompts, at, strict=True))]
        self.rows = {}

    def take(self, free):
        self.calls += 1
        ready = [w for w in self.waiting if w[0] <= self.calls][:free]
        self.waiting = [w for w in self.waiting if w not in ready]
        out = []
        for _, i, p in ready:
            row = self.dec.row()
            self.rows[id(row)] = i
            out.append(Arrival(p, row, 0))
        return out

    def leave(self, row):
        self.left.append((self.rows[id(row)], row.finish()))


def continuous(pair, cfg, prompts, at, capacity):
    dec = Decoder(pair, cfg)
    ids = encode_prompts(pair.tokenizer, prompts, cfg.chat_template)
    script = Script(dec, ids[1:], at)
    rows = [dec.row()] + [dec.row().free() for _ in range(capacity - 1)]
    script.rows[id(rows[0])] = -1
    batch = Batch(
        [ids[0]] + [[] for _ in range(capacity - 1)],
        dec.vocab,
        dec.policy,
        rows,
        [0] * capacity,
        dec.pad_id,
        arrivals=script,
    )
    rows, _ = dec.run(batch)
    for row in rows:
        if not row.vacant:
            script.leave(row)
    assert not script.waiting
    return {i + 1: g.token_ids for i, g in script.left}


@pytest.fixture(scope="module")
def thresholds(tiny_pair):
    ent = step_statistics(tiny_pair, ["Count to ten."], "entropy", max_new_tokens=30)
    kl = step_statistics(tiny_pair, ["Count to ten.", "Name a color."], "kl", max_new_tokens=40)
    return {"entropy": float(np.quantile(ent, 0.7)), "kl": float(np.quantile(kl, 0.8))}


CASES = {
    "greedy": {"policy": "greedy"},
    "sample": {"policy": "sample", "seed": 3},
    "llm": {"policy": "llm"},
    "s2t-lazy": {"policy": "s2t", "trigger": "entropy", "k": 4},
    "s2t-draft-verify": {"policy": "s2t", "trigger": "kl", "k": 4, "draft_len": 4},
    "s2t-reference": {"policy": "s2t", "trigger": "kl", "k": 4, "fast": False},
    "s2t-local": {"policy": "s2t-local", "trigger": "entropy", "k": 4},
}


def case_config(case: str, thresholds: dict, max_new_tokens: int) -> DecodeConfig:
    kw = dict(CASES[case], max_new_tokens=max_new_tokens)
    if kw.get("trigger") in thresholds:
        kw["threshold"] = thresholds[kw["trigger"]]
    return DecodeConfig(**kw)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_joining_mid_decode_match_their_solo_decode(tiny_pair, thresholds, case):
    cfg = case_config(case, thresholds, 20)
    # prompt 1 joins after 3 steps, 2 and 3 later; with 2 rows, 3 and 4 wait for a row to free up
    got = continuous(tiny_pair, cfg, PROMPTS, at=[4, 6, 7, 7], capacity=2)
    solo = [generate(tiny_pair, [p], cfg, batch_size=1).generations[0].token_ids for p in PROMPTS]
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i in got:
        assert got[i] == solo[i], f"prompt {i}"


@pytest.mark.parametrize("case", ["greedy", "s2t-lazy", "s2t-local"])
def test_joining_rows_match_when_the_cache_is_repacked_at_every_admission(tiny_pair, thresholds, case, monkeypatch):
    from select2think.backends.hf import HFBackend

    monkeypatch.setattr(HFBackend, "repack_slack", 0)
    test_rows_joining_mid_decode_match_their_solo_decode(tiny_pair, thresholds, case)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("case", ["greedy", "llm", "s2t-lazy"])
def test_joining_rows_match_on_llamacpp(thresholds, case):
    pair = llama_pair()
    test_rows_joining_mid_decode_match_their_solo_decode(pair, thresholds, case)


@functools.cache
def llama_pair():
    from select2think import load_pair

    return load_pair("tiny-slm", "tiny-llm", backend="llama.cpp")


@pytest.mark.parametrize("case", list(CASES))
def test_generate_refills_finished_rows_and_matches_fixed_batches(tiny_pair, thresholds, case, monkeypatch):
    from select2think.decoding.offline import PromptQueue

    cfg = case_config(case, thresholds, 16)
    seen, taken = [], []
    take = PromptQueue.take
    monkeypatch.setattr(PromptQueue, "take", lambda self, free: taken.append(len(r := take(self, free))) or r)
    got = generate(tiny_pair, PROMPTS, cfg, batch_size=2, on_finish=lambda i, g: seen.append((i, g.token_ids)))
    assert taken[0] == 2 and sum(taken[1:]) == len(PROMPTS) - 2  # the other prompts joined as rows freed up
    fixed = generate(tiny_pair, PROMPTS, cfg, batch_size=1, continuous=False)
    assert [g.token_ids for g in got.generations] == [g.token_ids for g in fixed.generations]
    assert sorted(i for i, _ in seen) == list(range(len(PROMPTS)))  # each prompt handed over once, as it ends
    assert all(tokens == got.generations[i].token_ids for i, tokens in seen)
    for name in ("generated_tokens", "triggers", "flips"):
        assert getattr(got.stats, name) == getattr(fixed.stats, name), name


def test_a_recorder_under_refill_sees_each_prompts_own_index(tiny_pair):
    class Tokens:
        wants_hidden = False

        def __init__(self):
            self.seen = {}

        def record(self, steps):
            for r, s, t in zip(steps.rows, steps.steps, steps.tokens, strict=True):
                self.seen[(r, s)] = t

    rec = Tokens()
    res = generate(tiny_pair, PROMPTS, DecodeConfig(policy="greedy", max_new_tokens=12), batch_size=2, recorder=rec)
    for i, g in enumerate(res.generations):
        assert [rec.seen[(i, s)] for s in range(len(g.token_ids))] == g.token_ids
    assert len(rec.seen) == sum(len(g.token_ids) for g in res.generations)


def test_the_lazy_llm_reads_each_row_only_at_its_own_triggers(tiny_pair, thresholds):
    """In a batch, a trigger catches up only the rows that fired: each row's LLM forwards and tokens read
    are what they are when it decodes alone (one forward per trigger, nothing after its last one)."""
    cfg = DecodeConfig(policy="s2t", trigger="entropy", threshold=thresholds["entropy"], k=4, max_new_tokens=20)
    batched = generate(tiny_pair, PROMPTS, cfg, batch_size=len(PROMPTS)).generations
    refilled = generate(tiny_pair, PROMPTS, cfg, batch_size=2).generations  # rows joining mid-decode
    solo = [generate(tiny_pair, [p], cfg, batch_size=1).generations[0] for p in PROMPTS]
    for b, r, s in zip(batched, refilled, solo, strict=True):
        assert b.token_ids == r.token_ids == s.token_ids
        assert (b.llm_forwards, b.llm_tokens) == (r.llm_forwards, r.llm_tokens) == (s.llm_forwards, s.llm_tokens)
        assert b.llm_forwards == b.triggers
    assert sum(b.triggers for b in batched) > 0


def test_an_empty_prompt_is_refused(tiny_pair):
    from select2think import S2TError

    with pytest.raises(S2TError, match="prompt 1 has no tokens"):
        generate(tiny_pair, ["", ""], DecodeConfig(max_new_tokens=4), prompt_ids=[[1, 2], []])


def test_the_learned_trigger_under_refill_matches_solo(tiny_pair):
    """The lazy path hands the SLM's hidden states to a learned trigger: rows joining mid-decode must see
    their own (a slot's previous prompt's state would change where it fires)."""
    import torch

    from select2think.decoding.triggers import LearnedTrigger

    gen = torch.Generator().manual_seed(0)
    width = 10 + tiny_pair.slm.hidden_size
    head = LearnedTrigger(torch.randn(width, generator=gen), torch.zeros(1), torch.zeros(width), torch.ones(width))
    cfg = DecodeConfig(policy="s2t", trigger="learned", threshold=0.0, k=4, max_new_tokens=16)
    refilled = generate(tiny_pair, PROMPTS, cfg, batch_size=2, trigger=head).generations
    solo = [generate(tiny_pair, [p], cfg, batch_size=1, trigger=head).generations[0] for p in PROMPTS]
    assert [g.token_ids for g in refilled] == [g.token_ids for g in solo]
    assert [g.triggers for g in refilled] == [g.triggers for g in solo]
    assert 0 < sum(g.triggers for g in refilled) < sum(len(g.token_ids) for g in refilled)
