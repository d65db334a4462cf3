import hashlib
import time

import pytest
import torch

from select2think import S2TError
from select2think.models.cache import assemble, atomic_path
from select2think.models.pair import first_token_mismatch, pick_reserved_ids, tokenizer_size
from select2think.models.registry import resolve


class FakeTok:
    """Just enough tokenizer for the vocabulary checks."""

    def __init__(self, tokens, specials=(), chat_template=""):
        self.tokens = list(tokens)
        self.chat_template = chat_template
        self.bos_token_id = self.eos_token_id = self.pad_token_id = self.unk_token_id = None
        self.added_tokens_decoder = {
            self.tokens.index(s): type("T", (), {"content": s, "special": True})() for s in specials
        }

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids] if isinstance(ids, list) else self.tokens[ids]

    def convert_tokens_to_ids(self, t):
        return self.tokens.index(t)


def test_unknown_model_name_names_the_choices():
    with pytest.raises(S2TError, match=r"unknown model 'no-such-model'.*tiny-slm"):
        resolve("no-such-model")


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(S2TError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(S2TError, match=r"no config\.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("Qwen/Qwen2.5-32B-Instruct").kind == "hub"


def test_assemble_verifies_sha256_and_deletes_bad_file(tmp_path):
    parts = []
    for i, data in enumerate([b"abc", b"def"]):
        p = tmp_path / f"part{i}"
        p.write_bytes(data)
        parts.append(p)
    good = hashlib.sha256(b"abcdef").hexdigest()
    out = assemble(parts, tmp_path / "cache" / "m.gguf", good)
    assert out.read_bytes() == b"abcdef"
    bad_dest = tmp_path / "cache" / "bad.gguf"
    with pytest.raises(S2TError, match="checksum mismatch"):
        assemble(parts, bad_dest, "0" * 64)
    assert not bad_dest.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["m.gguf"]  # no temp file left behind


def test_atomic_dir_write_survives_a_kill(tmp_path):
    final = tmp_path / "models" / "x"
    with pytest.raises(KeyboardInterrupt), atomic_path(final, is_dir=True) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed mid-conversion
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}"


def test_first_token_mismatch_and_gguf_padding():
    a = FakeTok(["a", "b", "c", "[PAD3]", "[PAD4]"])
    b = FakeTok(["a", "b", "c"])
    assert tokenizer_size(a) == 3  # GGUF placeholder rows are padding
    assert first_token_mismatch(a, b) is None
    assert first_token_mismatch(FakeTok(["a", "x", "c"]), b) == (1, "x", "b")


def test_reserved_ids_prefer_padding_rows_then_unused_specials():
    tok = FakeTok([f"t{i}" for i in range(20)])
    assert pick_reserved_ids(tok, 40) == tuple(range(20, 36))
    specials = [f"<s{i}>" for i in range(16)]
    tok = FakeTok(["a", "b", *specials], specials=specials, chat_template="<s0>")
    ids = pick_reserved_ids(tok, 18 + 1)
    assert ids is not None and len(ids) == 16 and 18 in ids and 2 not in ids  # <s0> is used by the template
    assert pick_reserved_ids(FakeTok(["a"] * 4), 4) is None


def test_tiny_models_are_deterministic_and_fast():
    from select2think.models.loading import load_model

    load_model("tiny-slm")  # warm the tokenizer cache
    t = time.perf_counter()
    m1, tok, _ = load_model("tiny-slm", dtype="fp32", device="cpu")
    assert time.perf_counter() - t < 1.0
    m2, _, _ = load_model("tiny-slm", dtype="fp32", device="cpu")
    m3, _, _ = load_model("tiny-llm", dtype="fp32", device="cpu")
    assert torch.equal(m1.lm_head.weight, m2.lm_head.weight)
    assert m3.config.num_hidden_layers == 4 and m1.config.num_hidden_layers == 2
    assert m1.config.vocab_size == len(tok) + 64


def test_pair_is_checked_and_padding_never_proposed(tiny_pair):
    assert tiny_pair.vocab_size == 49152
    assert tiny_pair.reserved_ids == tuple(range(49152, 49168))
    from select2think.decoding.vocab import Vocab

    b = tiny_pair.slm.spawn()
    b.reset(1)
    raw = b.extend(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
    assert raw.shape[-1] == 49152 + 64 and Vocab.of(tiny_pair).text_logits(raw).shape[-1] == 49152


def test_reserved_ids_below_vocab_are_never_generated(tiny_pair):
    from select2think import generate
    from select2think.backends.pair import ModelPair

    first = generate(tiny_pair, ["hello"], policy="greedy", max_new_tokens=6).generations[0].token_ids
    banned = tuple(sorted(set(first)))[:16]
    pair = ModelPair(
        slm=tiny_pair.slm,
        llm=tiny_pair.llm,
        tokenizer=tiny_pair.tokenizer,
        eos_ids=tiny_pair.eos_ids,
        slm_name="tiny-slm",
        llm_name="tiny-llm",
        reserved_ids=banned,
    )
    out = generate(pair, ["hello"], policy="greedy", max_new_tokens=6).generations[0].token_ids
    assert not set(out) & set(banned)
    assert out != first


def test_cli_check_pair_exit_codes(capsys):
    from select2think.cli import main

    assert main(["check-pair", "tiny-slm", "tiny-llm"]) == 0
    assert "compatible" in capsys.readouterr().out
    assert main(["check-pair", "nope", "tiny-llm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'nope'") and err.count("\n") == 1
