"""The llama.cpp backend against the Backend contract, on the tiny test Llama written as an F32 GGUF.

The reference is the same tiny model in transformers (fp32, computed directly, not through a backend):
logits and final hidden states must agree, and every cache operation (batching, rollback, retiring,
sibling scoring) must give what plain extends of the same tokens give.
"""

from __future__ import annotations

import pytest
import torch

from select2think.backends.llamacpp import LlamaCppBackend, llama_cpp_module, load_llamacpp
from select2think.errors import S2TError
from select2think.models.registry import resolve
from select2think.models.tiny import build_tiny
from select2think.models.tiny_gguf import tiny_gguf_path

try:
    llama_cpp_module()
except S2TError as e:  # not installed, or a runtime dependency missing: the message says which
    pytest.skip(str(e), allow_module_level=True)

NAME = "tiny-slm"
EXACT = {"kv_type": "f32", "flash_attn": False}  # no f16 rounding: llama.cpp reproduces transformers' fp32
PROMPTS = [  # three rows of different lengths (token ids of the SmolLM2 vocabulary)
    [1, 4093, 1848, 314, 253, 1345, 30],
    [1, 2683, 17, 9963, 28, 6483, 1030, 15, 2162, 48, 31, 1116],
    [1, 567, 5051, 12],
]


@pytest.fixture(scope="module")
def hf():
    model, _ = build_tiny(resolve(NAME))
    return model.eval()


@pytest.fixture(scope="module")
def gguf_file():
    return tiny_gguf_path(NAME)


@pytest.fixture(scope="module")
def be(gguf_file):
    backend = load_llamacpp(gguf_file, n_ctx=1024, n_threads=1, **EXACT)
    yield backend
    backend.close()


@torch.no_grad()
def hf_run(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states[-1][0].float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two llama.cpp results of the same computation in different batch layouts."""
    close(a, b, rel=1e-5)


def padded(rows: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), n, dtype=torch.long)
    live = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        tokens[i, sl] = torch.tensor(r)
        live[i, sl] = True
    return tokens, live


def one(be: LlamaCppBackend, ids: list[int]) -> torch.Tensor:
    """Logits [n, V] of ids extended into a fresh single-row batch."""
    be.reset(1)
    return be.extend(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0]


def test_shapes_and_logits_match_transformers(be, hf):
    assert be.vocab_rows == hf.config.vocab_size == 49216
    assert be.hidden_size == hf.config.hidden_size
    caps = be.capabilities
    assert caps.full_logits and caps.sibling_scoring and caps.hidden_states
    ids = PROMPTS[1]
    got = one(be, ids)
    assert got.dtype == torch.float32 and got.shape == (len(ids), be.vocab_rows)
    ref, _ = hf_run(hf, ids)
    close(got, ref)
    assert be.length(0) == len(ids)
    assert be.forwards == 1 and be.tokens == len(ids) and be.row_tokens == [len(ids)]


def test_default_settings_are_close_to_transformers(gguf_file, hf):
    """llama.cpp's defaults (f16 KV cells, flash attention) round through f16: ~1e-3 of the logits' scale."""
    fast = load_llamacpp(gguf_file, n_ctx=256, n_threads=1)
    try:
        got = one(fast, PROMPTS[1])
    finally:
        fast.close()
    close(got, hf_run(hf, PROMPTS[1])[0], rel=3e-3)


def test_batched_equals_unbatched(be):
    alone = [one(be, p) for p in PROMPTS]
    for left in (False, True):
        tokens, live = padded(PROMPTS, left=left)
        be.reset(3)
        out = be.extend(tokens, live)
        assert out.shape == (3, tokens.shape[1], be.vocab_rows)
        for i, p in enumerate(PROMPTS):
            same(out[i][live[i]], alone[i])
            assert not out[i][~live[i]].any()  # dead positions are zeros
            assert be.length(i) == len(p)
    # one more token per row, last_only, then a catch-up without logits
    nxt = torch.tensor([[11], [22], [33]])
    step = be.extend(nxt, torch.ones(3, 1, dtype=torch.bool), last_only=True)
    assert step.shape == (3, 1, be.vocab_rows)
    for i, p in enumerate(PROMPTS):
        same(step[i, 0], one(be, [*p, int(nxt[i, 0])])[-1])


def test_last_only_and_no_logits(be):
    tokens, live = padded(PROMPTS)
    be.reset(3)
    last = be.extend(tokens, live, last_only=True)
    full_len = tokens.shape[1]
    for i, p in enumerate(PROMPTS):
        if len(p) == full_len:
            same(last[i, 0], one(be, p)[-1])
        else:  # the row's last column is dead: zeros
            assert not last[i].any()
    be.reset(3)
    assert be.extend(tokens, live, logits=False) is None
    assert [be.length(i) for i in range(3)] == [len(p) for p in PROMPTS]
    step = be.extend(torch.tensor([[5], [6], [7]]), torch.ones(3, 1, dtype=torch.bool))
    for i, p in enumerate(PROMPTS):
        same(step[i, 0], one(be, [*p, 5 + i])[-1])


def test_truncate_then_extend_equals_never_extended(be):
    ids = PROMPTS[1]
    be.reset(2)
    tokens, live = padded([ids, PROMPTS[0]])
    be.extend(tokens, live)
    be.truncate(0, 5)
    assert be.length(0) == 5 and be.length(1) == len(PROMPTS[0])
    tail = [77, 88, 99]
    got = be.extend(torch.tensor([tail, [0, 0, 0]]), torch.tensor([[True] * 3, [False] * 3]))
    same(got[0], one(be, [*ids[:5], *tail])[5:])
    assert not got[1].any()
    with pytest.raises(ValueError):
        be.truncate(0, 99)


def test_retire_keeps_other_rows(be):
    tokens, live = padded(PROMPTS)
    be.reset(3)
    be.extend(tokens, live)
    be.retire([1])
    be.retire([1])  # no-op for a row already gone
    assert be.length(1) == 0
    nxt = torch.tensor([[11, 12], [0, 0], [31, 32]])
    live2 = torch.tensor([[True, True], [False, False], [True, True]])
    got = be.extend(nxt, live2)
    assert not got[1].any()
    with pytest.raises(ValueError):
        be.truncate(1, 0)
    for i in (0, 2):
        same(got[i], one(be, [*PROMPTS[i], *nxt[i].tolist()])[-2:])


def _siblings_contract(be: LlamaCppBackend):
    tokens, live = padded(PROMPTS)
    rows, cands = [0, 2], torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    be.reset(3)
    be.extend(tokens, live)
    got = be.score_siblings(rows, cands)
    assert got.shape == (2, 4, be.vocab_rows)
    assert be.length(0) == len(PROMPTS[0])  # provisional: lengths unchanged
    picks = {0: 2, 2: 1}
    for j, r in enumerate(rows):
        for k in range(4):
            same(got[j, k], one(be, [*PROMPTS[r], int(cands[j, k])])[-1])
    # restore, score again, keep the picks: the cache must equal having extended the winners
    be.reset(3)
    be.extend(tokens, live)
    be.score_siblings(rows, cands)
    be.keep_siblings(picks)
    forwards = be.forwards
    assert [be.length(i) for i in range(3)] == [len(PROMPTS[0]) + 1, len(PROMPTS[1]), len(PROMPTS[2]) + 1]
    nxt = torch.tensor([[40], [41], [42]])
    step = be.extend(nxt, torch.ones(3, 1, dtype=torch.bool))
    for j, r in enumerate(rows):
        same(step[r, 0], one(be, [*PROMPTS[r], int(cands[j, picks[r]]), 40 + r])[-1])
    return forwards


def test_score_and_keep_siblings(be):
    assert _siblings_contract(be) == 2  # the prefill and one decode for all candidates; keeping costs none
    # any other call drops provisional siblings: the row's next extend sees only its own prefix
    tokens, live = padded(PROMPTS)
    be.reset(3)
    be.extend(tokens, live)
    be.score_siblings([1], torch.tensor([[3, 4]]))
    be.truncate(1, 4)
    got = be.extend(torch.tensor([[0], [50], [0]]), torch.tensor([[False], [True], [False]]))
    same(got[1, 0], one(be, [*PROMPTS[1][:4], 50])[-1])
    with pytest.raises(ValueError):
        be.keep_siblings({1: 0})


def test_siblings_in_several_decodes_when_sequence_ids_run_short(gguf_file):
    small = LlamaCppBackend(
        gguf_file, n_ctx=1024, n_seq_max=7, n_threads=1, **EXACT
    )  # 3 rows + 4 scratch ids: 1 row/call
    try:
        # the prefill, one decode per row's candidates, one more for the first row's winner
        assert _siblings_contract(small) == 4
    finally:
        small.close()


def test_hidden_states_match_transformers(be, hf):
    tokens, live = padded(PROMPTS)
    be.reset(3)
    be.want_hidden = True
    try:
        out = be.extend(tokens, live, last_only=True)
        hid = be.last_hidden
        assert hid.shape == (3, tokens.shape[1], be.hidden_size)
        for i, p in enumerate(PROMPTS):
            ref_logits, ref_hidden = hf_run(hf, p)
            close(hid[i][live[i]], ref_hidden)  # transformers' last hidden state is after the final norm
            if live[i, -1]:
                close(out[i, 0], ref_logits[-1])
            assert not hid[i][~live[i]].any()
        sib = be.score_siblings([0, 1], torch.tensor([[5, 6], [7, 8]]))
        assert be.last_hidden.shape == (2, 2, be.hidden_size)
        ref_logits, ref_hidden = hf_run(hf, [*PROMPTS[1], 8])
        close(be.last_hidden[1, 1], ref_hidden[-1])
        close(sib[1, 1], ref_logits[-1])
    finally:
        be.want_hidden = False
    be.reset(1)
    be.extend(torch.tensor([PROMPTS[2]]), torch.ones(1, len(PROMPTS[2]), dtype=torch.bool))
    assert be.last_hidden is None


def test_capacity_errors_name_the_knob(gguf_file):
    small = LlamaCppBackend(gguf_file, n_ctx=16, n_seq_max=4, n_threads=1)
    try:
        with pytest.raises(S2TError, match="n_seq_max"):
            small.reset(5)
        small.reset(2)
        tokens, live = padded([list(range(10, 20)), list(range(30, 37))])
        with pytest.raises(S2TError, match="raise n_ctx"):
            small.extend(tokens, live)
        small.reset(3)
        small.extend(torch.tensor([[1], [2], [3]]), torch.ones(3, 1, dtype=torch.bool))
        with pytest.raises(S2TError, match="n_seq_max"):
            small.score_siblings([0], torch.tensor([[4, 5]]))  # only 1 free sequence id for 2 siblings
    finally:
        small.close()


def test_bad_gguf_is_one_clear_error(tmp_path, gguf_file):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[: 1 << 20])
    for bad in (empty, cut, tmp_path / "missing.gguf"):
        with pytest.raises(S2TError) as err:
            load_llamacpp(bad, n_threads=1)
        assert "\n" not in str(err.value) and str(bad.name) in str(err.value)


def test_tiny_gguf_vocabulary_is_padded(be):
    vocab = be.lib.llama_model_get_vocab(be.model)
    assert be.lib.llama_vocab_get_text(vocab, 49151) != b"[PAD49151]"
    assert be.lib.llama_vocab_get_text(vocab, 49215) == b"[PAD49215]"


@pytest.mark.slow
def test_real_model_batch_of_three_decodes_like_one_row():
    from select2think.models.cache import gguf_path, is_installed

    if not is_installed(resolve("qwen2.5-coder-0.5b-instruct")):
        pytest.skip("the 0.5B's model wheels are not installed (make models)")

    path = gguf_path(resolve("qwen2.5-coder-0.5b-instruct"))
    be = load_llamacpp(path, n_ctx=2048, n_threads=1)
    try:
        lib = be.lib
        vocab = lib.llama_model_get_vocab(be.model)

        def tokenize(text: str) -> list[int]:
            buf = (lib.llama_token * 512)()
            n = lib.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 512, False, True)
            assert n > 0
            return list(buf[:n])

        def chat(q: str) -> list[int]:
            return tokenize(
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            )

        prompts = [chat("Write a Python function that adds two numbers."), chat("What is 7 times 8?"), chat("Hi")]

        def greedy(rows: list[list[int]], steps: int = 32) -> list[list[int]]:
            be.reset(len(rows))
            tokens, live = padded(rows, left=True)
            logits = be.extend(tokens, live, last_only=True)
            outs = [[] for _ in rows]
            for _ in range(steps):
                nxt = logits[:, -1].argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    outs[i].append(t)
                logits = be.extend(nxt[:, None], torch.ones(len(rows), 1, dtype=torch.bool))
            return outs

        alone = greedy(prompts[:1])[0]
        together = greedy(prompts)[0]
        assert alone == together
    finally:
        be.close()
