"""Where the ops run: the Triton kernels for CUDA tensors, eager PyTorch otherwise.

Triton is optional: without it (or with ``CANVAS_DISABLE_TRITON=1``) everything runs
eagerly. On CPU tensors the kernels run only through Triton's interpreter, and only inside
:func:`interpreted_triton` (the kernel tests): ``TRITON_INTERPRET=1`` must be set before the
kernels are imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("CANVAS_DISABLE_TRITON") != "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_local = threading.local()


@contextlib.contextmanager
def interpreted_triton() -> Iterator[None]:
    """Run the Triton kernels on CPU tensors through the interpreter, within the block."""
    if not (HAS_TRITON and INTERPRETING):
        raise RuntimeError("interpreted_triton() needs triton installed and TRITON_INTERPRET=1 set before import")
    previous = getattr(_local, "interpreting", False)
    _local.interpreting = True
    try:
        yield
    finally:
        _local.interpreting = previous


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return INTERPRETING and getattr(_local, "interpreting", False)
