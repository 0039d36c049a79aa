"""The operand type of ``tl.dot``: the inputs' bf16/fp16 on the GPU (tensor-core products at
the half-precision rate, float32 accumulators), float32 for float32 inputs (TF32 on Hopper)
and always under Triton's interpreter, whose bf16 arithmetic gives wrong numbers. Launchers
pass ``DOT=dot_dtype(x.dtype)``; kernels convert their operands with ``.to(DOT)``."""

from __future__ import annotations

import os

import torch
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run under the interpreter (read once, as Triton reads it)."""
HALF = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype):
    """The ``tl.dot`` operand type for inputs of ``dtype``."""
    return tl.float32 if INTERPRETING else HALF.get(dtype, tl.float32)
