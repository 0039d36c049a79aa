"""The operands of ``tl.dot``: in the inputs' dtype on the GPU (bf16/fp16 products on the
tensor cores, float32 accumulators), float32 under Triton's interpreter, whose bf16
arithmetic gives wrong numbers. Launchers pass ``UPCAST=UPCAST_OPERANDS``."""

from __future__ import annotations

import os

import triton
import triton.language as tl

UPCAST_OPERANDS = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run under the interpreter (read once, as Triton reads it)."""


@triton.jit
def dot_operand(x, LIKE, UPCAST: tl.constexpr):
    """``x`` converted to the element type of the pointer ``LIKE`` (float32 when UPCAST)."""
    if UPCAST:
        return x.to(tl.float32)
    return x.to(LIKE.dtype.element_ty)
