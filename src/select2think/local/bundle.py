"""An S2T-Local bundle: a trained selector and its learned trigger in one directory, ready to ship.

`s2t train` keeps full-precision weights and optimizer state so that it can resume; a bundle keeps only
what decoding needs, the LoRA in bf16 (the SLM runs in bf16 anyway; a head-only selector has none), so
the default pair's selector fits in the repository. `s2t-local=BUNDLE` then needs no separate threshold file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import S2TError
from ..io import atomic_path, atomic_write, check_safetensors, read_json, write_json
from ..models.loading import parse_dtype

TRIGGER = "trigger.json"
SHIPPED = Path(__file__).resolve().parent.parent / "shipped"


def export_bundle(selector: str | Path, trigger: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    from safetensors.torch import load_file, save_file

    selector, trigger, out = Path(selector), Path(trigger), Path(out)
    for need in ("reserved_rows.safetensors", "selector.json"):
        if not (selector / need).is_file():
            raise S2TError(f"{selector} is not a selector from `s2t train` (no {need})")
    sel_meta = read_json(selector / "selector.json", "selector metadata")
    head_only = bool(sel_meta.get("head_only"))
    for need in () if head_only else ("adapter_config.json", "adapter_model.safetensors"):
        if not (selector / need).is_file():
            raise S2TError(f"{selector} is not a selector from `s2t train` (no {need})")
    meta = read_json(trigger, "trigger file") if trigger.is_file() else {}
    if (
        not isinstance(meta, dict)
        or meta.get("trigger") != "learned"
        or not (trigger.parent / meta.get("head", "")).is_file()
    ):
        raise S2TError(f"{trigger} is not a learned trigger from `s2t train-trigger`")
    if meta.get("slm") != sel_meta.get("slm"):
        raise S2TError(f"the trigger was trained for {meta.get('slm')!r}, the selector for {sel_meta.get('slm')!r}")
    torch_dtype = parse_dtype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("reserved_rows.safetensors", "selector.json") + (() if head_only else ("adapter_config.json",)):
        atomic_write(out / name, (selector / name).read_bytes())
    if not head_only:
        lora = load_file(check_safetensors(selector / "adapter_model.safetensors"))
        with atomic_path(out / "adapter_model.safetensors") as tmp:
            save_file({k: v.to(torch_dtype).contiguous() for k, v in lora.items()}, tmp)
    atomic_write(out / "trigger.safetensors", (trigger.parent / meta["head"]).read_bytes())
    write_json(out / TRIGGER, {**meta, "head": "trigger.safetensors"})
    return out


def bundled_trigger(selector: str | Path) -> Path | None:
    """The learned trigger shipped inside a bundle, if any."""
    path = Path(selector) / TRIGGER
    return path if path.is_file() else None


def shipped_bundle(slm: str) -> Path | None:
    """The bundle this package ships for a named SLM (None if it ships none)."""
    path = SHIPPED / slm.replace("/", "_")
    return path if (path / "selector.json").is_file() else None
