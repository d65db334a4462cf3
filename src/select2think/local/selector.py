"""The selector artifact: what `s2t train` writes (reserved rows, selector.json, a LoRA unless head-only), and
how it is validated and applied to a loaded pair for decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..decoding.config import LOCAL_MODES
from ..errors import S2TError
from ..io import check_safetensors, read_json, write_json


def save_selector(model: Any, rows: Any, reserved: tuple[int, ...], out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_embedding_layers=False)
    save_file(
        {"reserved_ids": torch.tensor(reserved), "weight": rows.weight.detach().float().contiguous()},
        out / "reserved_rows.safetensors",
    )
    write_json(out / "selector.json", meta)


def apply_selector(pair, path: str | Path, mode: str = "coupled"):
    """Load a trained selector into the pair: its reserved rows become S2T-Local's score head
    (`pair.selector`). A LoRA selector needs the transformers backend: coupled mode merges the LoRA (no
    cost at generation); decoupled keeps it separate, the base model generating with it off."""
    from safetensors.torch import load_file

    from ..decoding.local_scorer import ReservedHead

    path = Path(path)
    if not (path / "selector.json").is_file() or not (path / "reserved_rows.safetensors").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no selector.json or reserved_rows.safetensors)")
    meta = read_json(path / "selector.json", "selector metadata")
    head_only = bool(meta.get("head_only"))
    if not head_only and not (path / "adapter_config.json").is_file():
        raise S2TError(f"{path} is not a selector from `s2t train` (no adapter_config.json)")
    for name in ("reserved_rows.safetensors",) + (() if head_only else ("adapter_model.safetensors",)):
        check_safetensors(path / name, "retrain or re-copy the selector")
    if meta.get("slm") != pair.slm_name:
        raise S2TError(f"selector {path} was trained for {meta.get('slm')!r}, not {pair.slm_name!r}")
    rows = load_file(path / "reserved_rows.safetensors")
    reserved = tuple(int(i) for i in rows["reserved_ids"].tolist())
    if reserved != tuple(pair.reserved_ids or ()):
        raise S2TError(f"selector {path} uses reserved ids {reserved[:2]}..., the pair has {pair.reserved_ids}")
    if mode not in LOCAL_MODES:
        raise S2TError(f"unknown S2T-Local mode {mode!r}: use coupled or decoupled")
    if head_only and mode == "decoupled":
        raise S2TError(
            f"{path} is a head-only selector (no adapter): the base model generates in either mode, "
            "so use the coupled mode (the default)"
        )
    if not head_only:
        _apply_lora(pair, path, mode)
    # scores in fp32 as training computed them: bf16 rounds logits near 10 to 1/32, enough to tie candidates
    gate = meta.get("gate", 0.0)  # chosen after training by cross-validation (benchmarks/head_sweep.py)
    if not isinstance(gate, int | float) or not 0 <= gate < float("inf"):
        raise S2TError(f"{path / 'selector.json'}: gate must be a number >= 0, got {gate!r}")
    pair.selector = ReservedHead(rows["weight"].float(), float(meta.get("prior_weight", 0.0)), gate=float(gate))
    return pair


def _apply_lora(pair, path: Path, mode: str) -> None:
    from peft import PeftModel

    from ..backends.hf import HFBackend

    if pair.engine != "hf":
        raise S2TError(f"{path} is a LoRA selector: it needs --backend hf (a head-only selector runs on any backend)")
    peft = PeftModel.from_pretrained(pair.slm_module(), path).eval()
    if mode == "coupled":
        pair.slm = HFBackend(peft.merge_and_unload().eval())
    else:
        adapted = HFBackend(peft)
        pair.slm, pair.scorer = adapted.without_adapter(), adapted
