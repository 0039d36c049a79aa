"""Shared test helpers: the relative-error checks used by every numerical comparison.

Without a GPU, the Triton kernels are defined in interpreter mode (the variable must be set
before the kernels are imported); they then run on CPU tensors inside
``canvas_engineering.ops.backend.interpreted_triton()`` only.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


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


def assert_all_close(actual: Dict[str, Optional[torch.Tensor]], expected: Dict[str, Optional[torch.Tensor]], tolerance: float, zero_floor: float) -> None:
    """Every named result close to the expected one:
    ``||actual - expected|| <= tolerance * ||expected|| + zero_floor * whole``, where
    ``whole`` is the norm of all expected results together.

    The second term is the resolution of floating-point arithmetic at the scale of the
    computation: a result that is zero in exact arithmetic (a key bias under softmax, whose
    logits are shift-invariant) or tiny by cancellation (a query read by a single key)
    holds rounding noise of that size on both sides, so only an absolute bound applies.
    """
    assert actual.keys() == expected.keys()
    present = [t.double().flatten() for t in expected.values() if t is not None]
    whole = torch.cat(present).norm().item() if present else 0.0
    for key, reference in expected.items():
        if reference is None or actual[key] is None:
            assert reference is None and actual[key] is None, key
            continue
        assert actual[key].shape == reference.shape and torch.isfinite(actual[key]).all(), key
        difference = (actual[key].double() - reference.double()).norm().item()
        assert difference <= tolerance * reference.double().norm().item() + zero_floor * whole, (key, difference)
