"""The sibling (tree) attention layout: K candidate tokens at one position, each seeing its row's prefix and
itself. The transformers engine scores siblings with it and S2T-Local training lays groups out with it."""

from __future__ import annotations

import torch


def sibling_visibility(prefix_visible: torch.Tensor, K: int) -> torch.Tensor:
    """Bool [B, K, T + K]: sibling k of row b sees the prefix slots visible to the row [B, T], and itself."""
    B, T = prefix_visible.shape
    visible = torch.zeros(B, K, T + K, dtype=torch.bool, device=prefix_visible.device)
    visible[:, :, :T] = prefix_visible[:, None, :]
    visible[:, :, T:] = torch.eye(K, dtype=torch.bool, device=prefix_visible.device)
    return visible


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask [B, 1, Q, S] from bool visibility [B, Q, S]."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
