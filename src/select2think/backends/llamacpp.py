"""A GGUF model run by llama.cpp (llama-cpp-python's low-level API) behind the `Backend` interface.

Layout: one llama.cpp context with a *unified* KV cache (one pool of `n_ctx` cells shared by all
sequences). Batch row r is llama.cpp sequence id r; every `extend` is one `llama_decode` whose batch holds
each row's live tokens tagged with the row's sequence id, at positions continuing the row. Rolling back is
`llama_memory_seq_rm(row, L, -1)`, retiring is `seq_rm(row, -1, -1)`, `reset` clears the whole memory.

Sibling scoring (S2T-Local): each listed row's sequence is copied into K scratch sequence ids
(`llama_memory_seq_cp`: in a unified cache this only tags the row's cells with the scratch ids, no data is
copied), the K candidates are decoded at the row's next position, each in its own scratch sequence, in one
`llama_decode`. `keep_siblings` tags the winner's cell with the row's id (`seq_cp(scratch, row, L, L + 1)`)
and removes every scratch id (`seq_rm(scratch, -1, -1)`), which frees the losers' cells. Scratch ids are the
sequence ids no live row holds; when R×K exceeds them the candidates go through in several decodes, and the
rows of all but the last are re-extended by their winner in `keep_siblings` (one more decode for them).

Costs to know: a unified cache attends over every occupied cell (masked per sequence), so attention work per
token grows with the total tokens of the batch, not of the row; with the small models and batches this
project runs it stays below the weight matmuls. Hidden states come from the same decode as the logits
(`llama_set_embeddings(ctx, True)` with pooling NONE), but llama.cpp then outputs every token of the batch,
so a `last_only` prefill with `want_hidden` set computes logits at every position.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import S2TError
from .base import Backend, Capabilities

INSTALL_HINT = "llama-cpp-python is not installed: run `make llama` (or pip install llama-cpp-python==0.3.36)"
LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time cap on sequence ids (src/llama-cparams.h)
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type of the KV cache cells

_lib = None  # the llama_cpp module, imported on first use
_log_lines: deque[str] = deque(maxlen=20)  # llama.cpp's recent log lines (shown in load errors, not printed)
_log_cb = None  # keeps the ctypes callback alive


def llama_cpp_module() -> Any:
    """Import llama_cpp once: backend initialised, its log captured instead of printed."""
    global _lib, _log_cb
    if _lib is not None:
        return _lib
    try:
        import llama_cpp
    except ImportError as e:
        raise S2TError(f"{INSTALL_HINT} ({e})") from None

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: Any) -> None:
        line = text.decode("utf-8", "replace").strip() if text else ""
        if line:
            _log_lines.append(line)
        if os.environ.get("S2T_LLAMA_VERBOSE"):
            print(line, flush=True)

    _log_cb = _log
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _lib = llama_cpp
    return _lib


def default_threads() -> int:
    """`$S2T_LLAMA_THREADS`, else every core up to 8. OpenMP's wait policy is read when torch loads, so it is the
    user's to set: busy-waiting threads are fastest alone and collapse when another process shares the cores
    (then `S2T_LLAMA_THREADS=1` or `OMP_WAIT_POLICY=PASSIVE`; docs/results.md, "Engines")."""
    value = os.environ.get("S2T_LLAMA_THREADS", str(min(os.cpu_count() or 1, 8)))
    try:
        n = int(value)
    except ValueError:
        raise S2TError(f"S2T_LLAMA_THREADS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise S2TError(f"S2T_LLAMA_THREADS must be a positive integer, got {value!r}")
    return n


class _Batch:
    """A llama_batch over buffers we own (numpy), one sequence id per token, filled without a Python loop."""

    def __init__(self, lib: Any, capacity: int):
        self.lib = lib
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.seq_ptrs = self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64)  # seq_id[i] -> &seq[i]
        self.output = np.zeros(capacity, dtype=np.int8)

    def fill(self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray, output: np.ndarray) -> Any:
        n = len(token)
        self.token[:n], self.pos[:n], self.seq[:n], self.output[:n] = token, pos, seq, output
        p = ctypes.POINTER
        lib = self.lib
        return lib.llama_batch(
            n_tokens=n,
            token=self.token.ctypes.data_as(p(lib.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(p(lib.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(p(ctypes.c_int32)),
            seq_id=ctypes.cast(self.seq_ptrs.ctypes.data, p(p(lib.llama_seq_id))),
            logits=self.output.ctypes.data_as(p(ctypes.c_int8)),
        )


class LlamaCppBackend(Backend):
    """One GGUF model in one llama.cpp context; batch rows are sequence ids of a unified KV cache.

    n_ctx: KV cells shared by all rows (a batch's total tokens, siblings included, must fit);
    n_seq_max: sequence ids usable by rows plus sibling scratch (llama.cpp allows at most 256);
    n_batch: tokens in one call (default n_ctx: any call that fits the cache); n_ubatch: tokens per
    compute step; n_threads: default `$S2T_LLAMA_THREADS` else every core up to 8; hidden_states: allow `want_hidden`;
    kv_type: the KV cache cells' type; flash_attn: None lets llama.cpp choose (on, for the CPU). The
    defaults are llama.cpp's (f16 cells, flash attention): logits within ~1e-3 of the scale of transformers'
    fp32; kv_type="f32" with flash_attn=False reproduces them to float rounding (slower).
    """

    name = "llama.cpp"

    def __init__(
        self,
        gguf_path: str | Path,
        n_ctx: int = 32768,
        n_seq_max: int = LLAMA_MAX_SEQ,
        n_batch: int | None = None,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        hidden_states: bool = True,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        parent: LlamaCppBackend | None = None,
    ):
        lib = llama_cpp_module()
        self.lib = lib
        path = Path(gguf_path)
        if not path.is_file():
            raise S2TError(f"GGUF file not found: {path}")
        if not 1 <= n_seq_max <= LLAMA_MAX_SEQ:
            raise S2TError(f"n_seq_max must be between 1 and {LLAMA_MAX_SEQ} (llama.cpp's limit), got {n_seq_max}")
        self.n_threads = default_threads() if n_threads is None else int(n_threads)
        self.n_ctx = int(n_ctx)
        self.n_seq_max = int(n_seq_max)
        self.n_batch = int(n_batch or n_ctx)
        self.model = None
        self.ctx = None
        self._settings: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_seq_max": n_seq_max,
            "n_batch": n_batch,
            "n_ubatch": n_ubatch,
            "n_threads": n_threads,
            "hidden_states": hidden_states,
            "kv_type": kv_type,
            "flash_attn": flash_attn,
        }
        self._parent = parent  # a spawned backend shares its parent's weights (and keeps the parent alive)
        if parent is not None:
            model = parent.model
        else:
            mparams = lib.llama_model_default_params()
            mparams.n_gpu_layers = 0
            _log_lines.clear()
            model = lib.llama_model_load_from_file(str(path).encode(), mparams)
            if not model:
                raise S2TError(f"llama.cpp could not load {path}: {_last_error()}")
        self.model = model

        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(int(n_ubatch), self.n_batch)
        cparams.n_seq_max = self.n_seq_max
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.embeddings = False  # switched on per decode while `want_hidden` is set
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        cparams.kv_unified = True  # seq_cp between rows and scratch ids only retags cells
        cparams.no_perf = True
        if kv_type not in _KV_TYPES:
            raise S2TError(f"kv_type must be one of {', '.join(_KV_TYPES)}, got {kv_type!r}")
        cparams.type_k = cparams.type_v = _KV_TYPES[kv_type]
        if flash_attn is not None:  # llama.cpp's CPU flash attention rounds Q, K and V through f16
            cparams.flash_attn_type = 1 if flash_attn else 0
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise S2TError(f"llama.cpp could not create a context for {path} (n_ctx={n_ctx}): {_last_error()}")
        self.ctx = ctx
        self.mem = lib.llama_get_memory(ctx)
        vocab = lib.llama_model_get_vocab(model)
        super().__init__(vocab_rows=lib.llama_vocab_n_tokens(vocab), hidden_size=lib.llama_model_n_embd(model))
        self.n_params = int(lib.llama_model_n_params(model))
        self.context_length = int(lib.llama_model_n_ctx_train(model))
        self.capabilities = Capabilities(
            full_logits=True, hidden_states=hidden_states, sibling_scoring=True, admission=True
        )
        self._embeddings_on = False
        self._batch = _Batch(lib, 0)
        self.path = path
        self.reset(0)

    # -- lifetime ------------------------------------------------------------------------------------
    def spawn(self) -> LlamaCppBackend:
        """A second context (its own KV cache) on the same loaded weights."""
        return LlamaCppBackend(self.path, **self._settings, parent=self)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model and self._parent is None:
            self.lib.llama_model_free(self.model)
        self.model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- the batch -----------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        if batch_size > self.n_seq_max:
            raise S2TError(
                f"batch of {batch_size} rows exceeds the llama.cpp backend's n_seq_max={self.n_seq_max} "
                f"sequences: raise n_seq_max (at most {LLAMA_MAX_SEQ}) or lower the batch size"
            )
        self.lib.llama_memory_clear(self.mem, True)
        self._lengths = [0] * batch_size
        self._alive = [True] * batch_size
        self._pending: dict[str, Any] | None = None  # provisional siblings of the last score_siblings
        self.last_hidden = None
        self._reset_counters(batch_size)

    def length(self, row: int) -> int:
        return self._lengths[row]

    def _used(self) -> int:
        return sum(self._lengths)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < len(self._lengths):
            raise IndexError(f"row {row} is outside the batch of {len(self._lengths)} rows")
        if not self._alive[row]:
            raise ValueError(f"row {row} was retired from the cache")

    @torch.no_grad()
    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        self._drop_siblings()
        tokens = tokens.detach().cpu().long()
        live = live.detach().cpu().bool().clone()
        B, n = tokens.shape
        if len(self._lengths) != B:
            raise ValueError(f"extend got {B} rows for a batch of {len(self._lengths)}")
        live[[r for r in range(B) if not self._alive[r]]] = False  # retired rows: inputs ignored, zeros out
        rows_idx, cols = live.nonzero(as_tuple=True)  # row-major: each row's tokens in order
        counts = live.sum(1)
        lengths = torch.tensor(self._lengths, dtype=torch.long)
        pos = lengths[rows_idx] + live.long().cumsum(1)[rows_idx, cols] - 1
        if not logits:
            want = torch.zeros_like(cols, dtype=torch.bool)
        else:
            want = cols == n - 1 if last_only else torch.ones_like(cols, dtype=torch.bool)
        n_tok = len(rows_idx)
        self._check_capacity(n_tok)
        n_cols = 1 if last_only else n
        out_logits = None
        hidden = self.want_hidden and self.capabilities.hidden_states
        # outputs are assembled in numpy: torch's intra-op threads turn a 600 KB copy into ~15 ms when
        # another process holds the cores (measured), numpy copies on the calling thread
        V, H = self.vocab_rows, self.hidden_size
        self.last_hidden = torch.from_numpy(np.zeros((B, n, H), np.float32)) if hidden else None
        if n_tok == 0:
            return torch.from_numpy(np.zeros((B, n_cols, V), np.float32)) if logits else None
        self._decode(tokens[rows_idx, cols], pos, rows_idx, want, hidden)
        if logits:
            got, owned = self._logits_out(want)
            sel = want.nonzero(as_tuple=True)[0]
            if len(sel) == B * n_cols:  # every output position is live (a decode step): no scatter
                arr = got if owned else got.copy()
            else:
                col = torch.zeros_like(cols) if last_only else cols
                arr = np.zeros((B * n_cols, V), np.float32)
                arr[(rows_idx[sel] * n_cols + col[sel]).numpy()] = got
            out_logits = torch.from_numpy(arr.reshape(B, n_cols, V))
        if hidden:
            hid = np.zeros((B * n, H), np.float32)
            hid[(rows_idx * n + cols).numpy()] = self._embeddings_out(n_tok)
            self.last_hidden = torch.from_numpy(hid.reshape(B, n, H))
        for r, c in enumerate(counts.tolist()):
            self._lengths[r] += c
        alive_rows = [r for r in range(B) if self._alive[r]]
        self._count(alive_rows, [int(counts[r]) for r in alive_rows])
        return out_logits

    def truncate(self, row: int, length: int) -> None:
        self._drop_siblings()
        self._check_row(row)
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self._lengths[row]} to {length}")
        if length < self._lengths[row]:
            self._seq_rm(row, length, -1)
            self._lengths[row] = length

    def retire(self, rows: Sequence[int]) -> None:
        self._drop_siblings()
        for r in rows:
            if 0 <= r < len(self._alive) and self._alive[r]:
                self._seq_rm(r, -1, -1)
                self._alive[r] = False
                self._lengths[r] = 0

    def admit(self, row: int) -> None:
        """The row's sequence id is emptied (and revived if retired)."""
        self._drop_siblings()
        if not 0 <= row < len(self._lengths):
            raise IndexError(f"row {row} is outside the batch of {len(self._lengths)} rows")
        if self._alive[row]:
            self._seq_rm(row, -1, -1)
        self._alive[row] = True
        self._lengths[row] = 0
        self.row_forwards[row] = self.row_tokens[row] = 0

    # -- siblings ------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_siblings(self, rows: Sequence[int], cands: torch.Tensor, logits: bool = True) -> torch.Tensor:
        # llama.cpp computes every sibling's logits anyway: they come back whatever `logits` says
        self._drop_siblings()
        rows = list(rows)
        cands = cands.detach().cpu().long()
        R, K = cands.shape
        if len(rows) != R:
            raise ValueError(f"score_siblings got {len(rows)} rows and candidates for {R}")
        for r in rows:
            self._check_row(r)
        if len(set(rows)) != R:
            raise ValueError("score_siblings lists a row twice")
        scratch = [s for s in range(self.n_seq_max) if s >= len(self._alive) or not self._alive[s]]
        per_call = len(scratch) // K if K else R
        if R and per_call == 0:
            raise S2TError(
                f"scoring {K} siblings needs {K} free sequence ids but only {len(scratch)} of n_seq_max="
                f"{self.n_seq_max} are free: raise n_seq_max (at most {LLAMA_MAX_SEQ}) or lower the batch size"
            )
        hidden = self.want_hidden and self.capabilities.hidden_states
        out = np.zeros((R, K, self.vocab_rows), np.float32)
        hid = np.zeros((R, K, self.hidden_size), np.float32) if hidden else None
        held: dict[int, tuple[int, list[int] | None]] = {}  # row -> (its length, scratch ids holding its K cells)
        for start in range(0, R, max(per_call, 1)):
            chunk = list(range(start, min(R, start + per_call)))
            self._check_capacity(len(chunk) * K)
            ids = np.array(scratch[: len(chunk) * K], dtype=np.int32).reshape(len(chunk), K)
            for j, i in enumerate(chunk):
                for s in ids[j]:
                    self.lib.llama_memory_seq_cp(self.mem, rows[i], int(s), -1, -1)
            tok = cands[chunk].reshape(-1)
            pos = torch.tensor([self._lengths[rows[i]] for i in chunk], dtype=torch.long).repeat_interleave(K)
            seq = torch.from_numpy(ids.reshape(-1).astype(np.int64))
            want = torch.ones(len(tok), dtype=torch.bool)
            try:
                self._decode(tok, pos, seq, want, hidden)
            except BaseException:
                for s in ids.reshape(-1):
                    self._seq_rm(int(s), -1, -1)
                raise
            out[chunk] = self._logits_out(want)[0].reshape(len(chunk), K, self.vocab_rows)
            if hid is not None:
                hid[chunk] = self._embeddings_out(len(tok)).reshape(len(chunk), K, self.hidden_size)
            self._count([rows[i] for i in chunk], [K] * len(chunk))
            last = start + per_call >= R
            for j, i in enumerate(chunk):
                held[rows[i]] = (self._lengths[rows[i]], [int(s) for s in ids[j]] if last else None)
            if not last:  # the scratch ids are reused by the next chunk: its rows re-extend in keep_siblings
                for s in ids.reshape(-1):
                    self._seq_rm(int(s), -1, -1)
        self._pending = {"held": held, "cands": {r: cands[i] for i, r in enumerate(rows)}}
        self.last_hidden = torch.from_numpy(hid) if hidden else None
        return torch.from_numpy(out)

    def keep_siblings(self, picks: dict[int, int]) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            raise ValueError("keep_siblings without a score_siblings before it")
        held, cands = pending["held"], pending["cands"]
        try:
            redo = []
            for r, k in picks.items():
                if r not in held:
                    raise ValueError(f"row {r} had no siblings scored")
                length, ids = held[r]
                if ids is None:
                    redo.append((r, int(cands[r][k])))
                else:
                    self.lib.llama_memory_seq_cp(self.mem, ids[k], r, length, length + 1)
        finally:
            for _, ids in held.values():
                for s in ids or ():
                    self._seq_rm(s, -1, -1)
        for r in picks:
            if held[r][1] is not None:
                self._lengths[r] += 1
        if redo:  # rows whose candidates were scored in an earlier chunk: decode their winner now
            tok = torch.tensor([t for _, t in redo], dtype=torch.long)
            rows_t = torch.tensor([r for r, _ in redo], dtype=torch.long)
            pos = torch.tensor([self._lengths[r] for r, _ in redo], dtype=torch.long)
            self._decode(tok, pos, rows_t, torch.zeros(len(redo), dtype=torch.bool), False)
            for r, _ in redo:
                self._lengths[r] += 1
            self._count([r for r, _ in redo], [1] * len(redo))

    def _drop_siblings(self) -> None:
        if self._pending is not None:
            for _, ids in self._pending["held"].values():
                for s in ids or ():
                    self._seq_rm(s, -1, -1)
            self._pending = None

    # -- llama.cpp calls -----------------------------------------------------------------------------
    def _check_capacity(self, n_new: int) -> None:
        if self._used() + n_new > self.n_ctx:
            raise S2TError(
                f"the batch needs {self._used() + n_new} KV cells but the llama.cpp backend has n_ctx="
                f"{self.n_ctx}: raise n_ctx (it counts the tokens of all rows together)"
            )
        if n_new > self.n_batch:
            raise S2TError(
                f"one call of {n_new} tokens exceeds the llama.cpp backend's n_batch={self.n_batch}: raise n_batch"
            )

    def _seq_rm(self, seq: int, p0: int, p1: int) -> None:
        if not self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1):
            raise S2TError(f"llama.cpp refused to remove positions [{p0}, {p1}) of sequence {seq}")

    def _decode(
        self, tok: torch.Tensor, pos: torch.Tensor, seq: torch.Tensor, want: torch.Tensor, hidden: bool
    ) -> None:
        lib = self.lib
        n = len(tok)
        if n > self._batch.capacity:
            self._batch = _Batch(lib, max(n, 2 * self._batch.capacity))
        if hidden != self._embeddings_on:
            lib.llama_set_embeddings(self.ctx, hidden)
            self._embeddings_on = hidden
        batch = self._batch.fill(
            tok.numpy().astype(np.int32),
            pos.numpy().astype(np.int32),
            seq.numpy().astype(np.int32),
            want.numpy().astype(np.int8),
        )
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            why = {1: "no free KV cells: raise n_ctx", 2: "aborted"}.get(rc, _last_error())
            raise S2TError(f"llama_decode failed (code {rc}): {why}")
        self._n_batch_tokens = n
        self._want = want

    def _logits_out(self, want: torch.Tensor) -> tuple[np.ndarray, bool]:
        """Logits of the tokens asked for, in batch order [m, V], and whether the array is ours: a view of
        llama.cpp's output buffer (valid until the next decode) unless it had to be gathered."""
        V = self.vocab_rows
        ptr = self.lib.llama_get_logits(self.ctx)
        if self._embeddings_on:  # every token was output: pick the asked-for ones
            allv = np.ctypeslib.as_array(ptr, shape=(self._n_batch_tokens, V))
            return allv[want.numpy()], True
        return np.ctypeslib.as_array(ptr, shape=(int(want.sum()), V)), False

    def _embeddings_out(self, n: int) -> np.ndarray:
        """Final hidden states (after the output norm) of all n tokens of the last decode [n, H]: a view of
        llama.cpp's buffer, valid until the next decode."""
        ptr = self.lib.llama_get_embeddings(self.ctx)
        if not ptr:
            raise S2TError("llama.cpp returned no hidden states")
        return np.ctypeslib.as_array(ptr, shape=(n, self.hidden_size))


def _last_error() -> str:
    errors = [line for line in _log_lines if "error" in line.lower() or "failed" in line.lower()]
    line = (errors or list(_log_lines) or ["no message from llama.cpp"])[-1]
    return line.splitlines()[0]


def load_llamacpp(gguf_path: str | Path, **kw: Any) -> LlamaCppBackend:
    """A `LlamaCppBackend` on a GGUF file (see the class for the knobs)."""
    return LlamaCppBackend(gguf_path, **kw)
