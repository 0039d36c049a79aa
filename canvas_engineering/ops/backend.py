"""Where the ops run: the Triton kernels for CUDA tensors, eager PyTorch otherwise.

Triton is optional: without it (or with ``CANVAS_DISABLE_TRITON=1``) everything runs
eagerly, and :func:`eager_ops` forces the eager versions within a block. On CPU tensors the
kernels run only through Triton's interpreter, and only inside :func:`interpreted_triton`
(the kernel tests): ``TRITON_INTERPRET=1`` must be set before the kernels are imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("CANVAS_DISABLE_TRITON") != "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_local = threading.local()


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    previous = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = previous


def _release(version: str) -> tuple:
    """``"3.6.0"`` -> ``(3, 6)``: the major and minor numbers of a version string."""
    return tuple(int(part) for part in version.split(".")[:2])


def check_interpreter_versions(triton_version: str, numpy_version: str) -> None:
    """Raises when this Triton's interpreter cannot run under this numpy: before 3.9 it
    converts a shape-(1,) array to a Python int for every ``range()`` over a runtime
    argument, which numpy 2.4 refuses."""
    if _release(triton_version) < (3, 9) and _release(numpy_version) >= (2, 4):
        raise RuntimeError(
            f"Triton {triton_version}'s interpreter needs numpy < 2.4, found numpy {numpy_version}: "
            "install 'numpy<2.4' or triton >= 3.9"
        )


def interpreted_triton():
    """Within the block, run the Triton kernels on CPU tensors through the interpreter."""
    if not (HAS_TRITON and INTERPRETING):
        raise RuntimeError("interpreted_triton() needs triton installed and TRITON_INTERPRET=1 set before import")
    import numpy
    import triton

    check_interpreter_versions(triton.__version__, numpy.__version__)
    return _mode("interpret")


def eager_ops():
    """Within the block, run every op's eager PyTorch version, on any device."""
    return _mode("eager")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel."""
    mode = getattr(_local, "mode", None)
    if not HAS_TRITON or mode == "eager":
        return False
    if tensor.is_cuda:
        return True
    return INTERPRETING and mode == "interpret"
