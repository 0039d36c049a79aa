"""The operand type of ``tl.dot``: bf16 for bf16 and fp16 inputs on the GPU (tensor-core
products at the half-precision rate, float32 accumulators; bf16 rather than fp16 because the
operands include sums over many rows, such as a linear-attention state or a DFT output, that
can pass fp16's largest value; fp16 where the caller's operands stay within the inputs' range,
``bounded``), float32 for float32 inputs (TF32 on Hopper) and always under
Triton's interpreter, whose bf16 arithmetic gives wrong numbers. Launchers pass
``DOT=dot_dtype(x.dtype)``; kernels convert their operands with ``.to(DOT)``."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run under the interpreter (read once, as Triton reads it)."""


def dot_dtype(dtype: torch.dtype, bounded: bool = False):
    """The ``tl.dot`` operand type for inputs of ``dtype``. ``bounded``: every operand is an
    input or lies within the inputs' range (attention: q, k, v, softmax weights and their
    gradients), so fp16 inputs keep fp16 operands and their three more mantissa bits."""
    if INTERPRETING or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32
    return tl.float16 if bounded and dtype == torch.float16 else tl.bfloat16


def dot_width(n: int) -> int:
    """The padded size of a ``tl.dot`` operand side of n columns (a head dimension): a power
    of two, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(n))
