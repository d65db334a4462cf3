import dataclasses

import numpy as np
import pytest
import torch

from select2think import DecodeConfig, S2TError, generate
from select2think.decoding.calibrate import step_statistics


def test_sibling_scores_equal_full_prefix_rescoring(tiny_pair):
    from select2think.decoding.local_loop import naive_hidden
    from select2think.decoding.local_scorer import reserved_scores, score_from_logits

    prefix = [1, 504, 2201, 30, 17, 99]
    cands = [11, 22, 33, 44, 55, 66, 77, 88]
    b = tiny_pair.slm.spawn()
    b.reset(1)
    b.want_hidden = True
    b.extend(torch.tensor([prefix]), torch.ones(1, len(prefix), dtype=torch.bool))
    raw = b.score_siblings([0], torch.tensor([cands]))
    rows = tiny_pair.slm.output_rows(tiny_pair.reserved_ids)
    tree = reserved_scores(b.last_hidden[0], rows)
    naive = reserved_scores(naive_hidden(tiny_pair.slm.spawn(), prefix, cands), rows)
    assert torch.allclose(tree, naive, atol=1e-5)
    # training's layout (reserved columns of the raw logits) gives the same scores as decoding's
    assert torch.allclose(score_from_logits(raw[0], tiny_pair.reserved_ids), tree, atol=1e-5)
    assert float(tree.min()) >= 0.0 and float(tree.max()) <= 1.0


@pytest.fixture(scope="module")
def entropy_threshold(tiny_pair):
    return float(np.quantile(step_statistics(tiny_pair, ["Count to ten."], "entropy", max_new_tokens=30), 0.7))


def test_local_tree_decoding_matches_reference_and_never_uses_the_llm(tiny_pair, entropy_threshold):
    prompts = ["What is 2+2?", "Name a fruit.", "Hi"]
    cfg = {"policy": "s2t-local", "trigger": "entropy", "threshold": entropy_threshold, "k": 8, "max_new_tokens": 24}
    ref = generate(tiny_pair, prompts, DecodeConfig(fast=False, **cfg), batch_size=1)
    fast = generate(tiny_pair, prompts, DecodeConfig(fast=True, **cfg), batch_size=1)
    fast3 = generate(tiny_pair, prompts, DecodeConfig(fast=True, **cfg), batch_size=3)
    assert fast.path == "local-tree" and ref.path == "local-reference"
    assert ids(fast) == ids(ref) == ids(fast3)
    assert fast.stats.llm_forwards == 0 and fast.stats.llm_tokens == 0
    assert fast.stats.triggers > 0 and fast.stats.flips > 0
    greedy = generate(tiny_pair, prompts, DecodeConfig(policy="greedy", max_new_tokens=24), batch_size=1)
    # scoring rides on the forward that feeds the chosen token: at most one extra (a trigger on a final step)
    assert (
        fast.stats.slm_forwards
        <= greedy.stats.slm_forwards + len(prompts)
        < greedy.stats.slm_forwards + fast.stats.triggers
    )


def test_batched_local_scores_only_the_rows_that_fire(tiny_pair, entropy_threshold):
    """In a batch where some rows fire, the others must not pay for K candidate positions each."""
    prompts = ["What is 2+2?", "Name a fruit.", "Hi", "Count to ten."]
    cfg = DecodeConfig(policy="s2t-local", trigger="entropy", threshold=entropy_threshold, k=8, max_new_tokens=24)
    widths = []
    hook = tiny_pair.slm_module().register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].numel()), with_kwargs=True
    )
    try:
        batched = generate(tiny_pair, prompts, cfg, batch_size=4)
    finally:
        hook.remove()
    alone = generate(tiny_pair, prompts, cfg, batch_size=1)
    assert [g.token_ids for g in batched.generations] == [g.token_ids for g in alone.generations]
    s = batched.stats
    assert 0 < s.triggers < s.generated_tokens
    # after the prefill: one position per active row and step, plus K per triggered row and step
    assert sum(widths[1:]) <= s.generated_tokens + s.triggers * cfg.k


def test_local_refuses_llm_trigger_and_missing_reserved_rows(tiny_pair):
    with pytest.raises(S2TError, match="never runs the LLM"):
        DecodeConfig(policy="s2t-local", trigger="kl", threshold=1.0)
    from select2think.backends.pair import ModelPair

    bare = ModelPair(slm=tiny_pair.slm, tokenizer=tiny_pair.tokenizer, slm_name="x", reserved_ids=None)
    with pytest.raises(S2TError, match="no 16 unused rows"):
        generate(bare, ["hi"], DecodeConfig(policy="s2t-local", trigger="always", max_new_tokens=4))


@pytest.fixture(scope="module")
def adapted_pair():
    """A fresh tiny SLM wearing a random (non-zero) LoRA, unmerged, as decoupled mode loads a selector."""
    from peft import LoraConfig, get_peft_model

    from select2think import load_pair
    from select2think.backends.hf import HFBackend

    pair = load_pair("tiny-slm", None, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    adapted = HFBackend(get_peft_model(pair.slm_module(), lora).eval())
    pair.slm, pair.scorer = adapted.without_adapter(), adapted
    return pair, dataclasses.replace(pair, slm=adapted, scorer=None)


def test_decoupled_scores_with_the_adapter_and_generates_with_the_base(adapted_pair, tiny_pair, entropy_threshold):
    prompts = ["What is 2+2?", "Name a fruit.", "Hi"]
    cfg = {
        "policy": "s2t-local",
        "trigger": "entropy",
        "threshold": entropy_threshold,
        "k": 8,
        "max_new_tokens": 24,
        "local_mode": "decoupled",
    }
    adapted_pair, coupled_pair = adapted_pair
    ref = generate(adapted_pair, prompts, DecodeConfig(fast=False, **cfg), batch_size=1)
    fast = generate(adapted_pair, prompts, DecodeConfig(**cfg), batch_size=3)
    assert fast.path == "local-tree-decoupled" and ref.path == "local-reference-decoupled"
    assert ids(fast) == ids(ref)
    assert fast.stats.llm_forwards == 0 and fast.stats.triggers > 0 and fast.stats.flips > 0
    # between triggers the base model generates: with no trigger it is the base model's greedy answer
    quiet = {"policy": "s2t-local", "trigger": "never", "max_new_tokens": 24}
    base = generate(tiny_pair, prompts, DecodeConfig(policy="greedy", max_new_tokens=24))
    assert ids(generate(adapted_pair, prompts, DecodeConfig(local_mode="decoupled", **quiet))) == ids(base)
    # coupled mode generates with the adapter on: another answer
    assert ids(generate(coupled_pair, prompts, DecodeConfig(local_mode="coupled", **quiet))) != ids(base)
    with pytest.raises(S2TError, match="unmerged"):
        generate(tiny_pair, prompts, DecodeConfig(**cfg))
    with pytest.raises(S2TError, match="coupled or decoupled"):
        DecodeConfig(policy="s2t-local", trigger="always", local_mode="both")


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_local_rows_finishing_early_leave_both_caches_and_the_rest_decode_unchanged(adapted_pair, mode):
    prompts = ["Hi", "Tell me a long story about a cat and a dog.", "Count to ten."]
    cfg = {"policy": "s2t-local", "trigger": "always", "k": 8, "max_new_tokens": 12, "local_mode": mode}
    adapted_pair = adapted_pair[0] if mode == "decoupled" else adapted_pair[1]
    free = generate(adapted_pair, prompts[:1], DecodeConfig(**cfg), batch_size=1)
    cfg = DecodeConfig(extra_eos=(free.generations[0].token_ids[1],), **cfg)
    alone = generate(adapted_pair, prompts, cfg, batch_size=1)
    batched = generate(adapted_pair, prompts, cfg, batch_size=3)
    assert len(batched.generations[0].token_ids) == 2 and batched.stats.triggers > 0
    assert [g.token_ids for g in batched.generations] == [g.token_ids for g in alone.generations]
    assert batched.stats.slm_tokens == alone.stats.slm_tokens  # per-row accounting survives retirement


def ids(result):
    return [g.token_ids for g in result.generations]


def test_gate_keeps_the_slm_top1_unless_the_pick_leads_it_by_more():
    from select2think.decoding.local_scorer import gated_pick

    scores = torch.tensor([[0.5, 0.7, 0.1], [0.5, 0.55, 0.2], [0.5, 0.5, 0.1], [0.9, 0.1, 0.2]])
    assert gated_pick(scores).tolist() == [1, 1, 0, 0]  # gate 0: argmax; a tie keeps the SLM's top-1
    assert gated_pick(scores, 0.1).tolist() == [1, 0, 0, 0]
    assert gated_pick(scores, 0.2).tolist() == [0, 0, 0, 0]  # a lead equal to the gate is not enough


def test_a_gated_selector_decodes_as_training_measured_it(tiny_pair, entropy_threshold, tmp_path):
    """The gate in selector.json reaches decoding: an unreachable gate decodes exactly as greedy, gate 0 as the
    plain argmax, and the flips that training's metrics count as gated are the ones decoding makes."""
    from safetensors.torch import save_file

    from select2think.local.selector import apply_selector

    rows = torch.randn(16, tiny_pair.slm.hidden_size, generator=torch.Generator().manual_seed(0))
    save_file(
        {"reserved_ids": torch.tensor(tiny_pair.reserved_ids), "weight": rows}, tmp_path / "reserved_rows.safetensors"
    )
    prompts = ["What is 2+2?", "Name a fruit."]
    cfg = DecodeConfig(policy="s2t-local", trigger="entropy", threshold=entropy_threshold, k=8, max_new_tokens=24)
    greedy = generate(tiny_pair, prompts, DecodeConfig(policy="greedy", max_new_tokens=24))
    out = {}
    try:
        for gate in (0.0, 1e9):
            meta = {"slm": tiny_pair.slm_name, "head_only": True, "prior_weight": 0.1, "gate": gate}
            (tmp_path / "selector.json").write_text(__import__("json").dumps(meta))
            apply_selector(tiny_pair, tmp_path)
            assert tiny_pair.selector.gate == gate
            out[gate] = generate(tiny_pair, prompts, cfg)
    finally:
        tiny_pair.selector = None
    assert out[0.0].stats.flips > 0 and ids(out[0.0]) != ids(greedy)
    assert out[1e9].stats.flips == 0 and ids(out[1e9]) == ids(greedy)
