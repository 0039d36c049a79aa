"""Shared test helpers: the relative-error check used by every numerical comparison."""

from __future__ import annotations

from typing import Optional

import torch


def relative_error(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when expected is 0).

    NaN anywhere gives ``inf``; two Nones give 0; one None gives ``inf``.
    """
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.double(), expected.double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference
