"""Tests on the real SmolLM2-135M model (packaged GGUF): conversion cache, pair checks, exactness."""

import re
import time

import pytest

from select2think import DecodeConfig, S2TError, generate, load_pair
from select2think.models.loading import fetch, load_model
from select2think.models.pair import check_tokenizers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_pair():
    fetch("smollm2-135m-instruct", "fp32")
    return load_pair("smollm2-135m-instruct", "tiny-llm", dtype="fp32", device="cpu")


def test_cached_reload_is_fast_and_complete(smol_pair):
    t = time.perf_counter()
    model, tok, _ = load_model("smollm2-135m-instruct", dtype="fp32", device="cpu")
    assert time.perf_counter() - t < 3.0
    assert not hasattr(model.config, "quantization_config")
    assert len(tok) == 49152 and model.config.tie_word_embeddings


def test_same_tokenizer_pairs_and_no_padding_rows(smol_pair):
    # SmolLM2 has no padding rows and only 14 unused special tokens: no reserved ids
    assert smol_pair.vocab_size == 49152 and smol_pair.reserved_ids is None


def test_smollm2_answers_and_fast_path_matches_reference(smol_pair):
    greedy = generate(smol_pair, ["What is the capital of France?"], policy="greedy", max_new_tokens=12)
    assert "Paris" in greedy.texts[0]
    cfg = {"policy": "s2t", "trigger": "entropy", "threshold": 1.0, "k": 4, "max_new_tokens": 24}
    ref = generate(smol_pair, ["What is 3 + 4?", "Name a fruit."], DecodeConfig(fast=False, **cfg))
    fast = generate(smol_pair, ["What is 3 + 4?", "Name a fruit."], DecodeConfig(fast=True, **cfg), batch_size=2)
    assert [g.token_ids for g in fast.generations] == [g.token_ids for g in ref.generations]
    assert ref.stats.triggers > 0


def test_smollm2_and_qwen_tokenizers_are_refused(smol_pair):
    class QwenLike:
        chat_template = None

        def __len__(self):
            return 49152

        def convert_ids_to_tokens(self, ids):
            return ["!" if i == 0 else f"t{i}" for i in ids] if isinstance(ids, list) else "x"

    with pytest.raises(S2TError, match=re.escape("id 0 is '<|endoftext|>' in smollm2")):
        check_tokenizers("smollm2-135m-instruct", smol_pair.tokenizer, "qwen", QwenLike())
