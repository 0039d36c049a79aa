"""Output buffers for the launchers."""

from __future__ import annotations

import os

import torch


def new_output(reference: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised buffer on ``reference``'s device; NaN-filled when
    ``CANVAS_POISON_OUTPUTS=1`` (tests), so that an element a kernel fails to write cannot
    pass for a result."""
    if os.environ.get("CANVAS_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=reference.device)
    return torch.empty(shape, dtype=dtype, device=reference.device)
