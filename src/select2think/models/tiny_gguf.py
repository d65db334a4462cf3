"""The tiny test Llamas (`tiny-slm`, `tiny-llm`) as F32 GGUF files, for the llama.cpp backend's tests.

The weights are exactly `build_tiny`'s; the tokenizer metadata is copied from the packaged SmolLM2 GGUF,
its vocabulary padded to the model's embedding rows with `[PAD<id>]` placeholder tokens (type UNUSED),
as `convert_hf_to_gguf.py` does for real checkpoints. Written once per name under
`cache_root()/tiny_gguf/` (atomically), in about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import S2TError
from .cache import atomic_path, cache_root, gguf_path
from .registry import resolve

FORMAT_VERSION = 1  # bump when the written file changes, so stale caches are not reused

# copied verbatim from the SmolLM2 GGUF (the tokens and their types are padded, the rest as is)
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)
_TOKEN_TYPE_UNUSED = 5  # gguf.TokenType.UNUSED


def tiny_gguf_path(name: str) -> Path:
    """A GGUF file holding the tiny test model `name` (built and cached on first use)."""
    source = resolve(name)
    if source.kind != "tiny":
        raise S2TError(f"model {name!r} is not a tiny test model")
    dest = cache_root() / "tiny_gguf" / f"{name}-v{FORMAT_VERSION}.gguf"
    if dest.is_file():
        return dest
    from .tiny import build_tiny

    model, _ = build_tiny(source)
    with atomic_path(dest) as tmp:
        write_llama_gguf(model, tmp, name)
    return dest


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k layout -> llama.cpp's interleaved rope layout (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, name: str) -> None:
    """Write a transformers LlamaForCausalLM (untied head) as an F32 GGUF with SmolLM2's tokenizer."""
    import gguf

    cfg = model.config
    reader = gguf.GGUFReader(gguf_path(resolve("smollm2-135m-instruct")))
    fields = reader.fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    n_vocab = cfg.vocab_size
    if n_vocab < len(tokens):
        raise S2TError(f"tiny model {name!r} has fewer embedding rows ({n_vocab}) than tokens ({len(tokens)})")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [_TOKEN_TYPE_UNUSED] * (n_vocab - len(types))

    rope = getattr(cfg, "rope_parameters", None) or {}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key in _TOKENIZER_KEYS:
        field = fields.get(key)
        if field is None:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, list(field.contents()))
        else:
            w.add_key_value(key, field.contents(), vtype)

    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
