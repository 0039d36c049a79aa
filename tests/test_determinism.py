"""Determinism: forward and backward passes that repeat bit for bit.

On CPU every type repeats as it stands. On CUDA the Triton kernels are deterministic by
construction: no atomics, and every output element is written by one program with a fixed
reduction order, so the order in which the GPU schedules the programs cannot change a bit;
under Triton's interpreter, a test runs every launch's programs in reverse order to check
it. The PyTorch ops around the kernels include index_add and the backward of index_select,
which accumulate with atomics on CUDA unless ``torch.use_deterministic_algorithms(True)``
is set, and with it set switch to deterministic versions: a test checks that no op the
package runs lacks such a version (those raise under that setting), and a ``gpu`` test
that passes repeat bit for bit under it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

import triton  # noqa: E402
from conftest import DEVICE, kernels  # noqa: E402
from training_model import (  # noqa: E402
    D_MODEL,
    EVERY_TYPE,
    KERNEL_FAMILIES,
    NUM_POSITIONS,
    assert_bitwise_equal,
    build_dispatcher,
    canvas_spec,
    pass_results,
)
from triton.runtime import interpreter  # noqa: E402

import canvas_engineering.kernels  # noqa: E402
from canvas_engineering.ops.backend import INTERPRETING, eager_ops, interpreted_triton  # noqa: E402

KERNEL_TYPES = KERNEL_FAMILIES + ("sigmoid_attention",)
"""The kernel families and sigmoid attention (its own kernel epilogue): every kernel
variant the canvas reaches (random_fixed among them runs eagerly)."""


def dispatcher_of(types: tuple[str, ...], batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A dispatcher over the test canvas whose connections run ``types``, and its input
    ``(batch, 48, D_MODEL)``."""
    torch.manual_seed(0)
    x = torch.randn(batch, NUM_POSITIONS, D_MODEL, generator=torch.Generator().manual_seed(1))
    return build_dispatcher(canvas_spec(types)), x


def long_convolution() -> tuple[nn.Module, torch.Tensor]:
    """A dispatcher with two Hyena edges, over 80 positions (FFT length 128, above the dense
    kernels' 64: the three-pass FFT kernels) and over 200 (FFT length 256: the fused FFT
    kernels), and its input."""
    spec = {
        "T": 1,
        "spatial_shape": (280,),
        "d_model": D_MODEL,
        "regions": {"short": {"bounds": (0, 1, 0, 80)}, "long": {"bounds": (0, 1, 80, 280)}},
        "connections": [
            {"src": "short", "dst": "short", "fn": "hyena"},
            {"src": "long", "dst": "long", "fn": "hyena"},
        ],
    }
    torch.manual_seed(0)
    return build_dispatcher(spec), torch.randn(1, 280, D_MODEL, generator=torch.Generator().manual_seed(1))


def test_cpu_forward_backward_is_bitwise_repeatable():
    """Every type (top-k sparse, random_fixed and mixture's routing included), eager ops:
    two passes of one dispatcher, and a pass of a second dispatcher built under the same
    seed, give the same bits."""
    dispatcher, x = dispatcher_of(EVERY_TYPE, batch=2)
    first = pass_results(dispatcher, x)
    assert_bitwise_equal(pass_results(dispatcher, x), first)
    assert_bitwise_equal(pass_results(dispatcher_of(EVERY_TYPE)[0], x), first)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` within the block, with the cuBLAS
    workspace setting it asks for on CUDA. It also fills fresh allocations (``torch.empty``)
    with NaN, so a result that reads memory nothing wrote shows it."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


@contextlib.contextmanager
def program_order(reverse: bool, launched: set[str]) -> Iterator[None]:
    """Within the block, the interpreter runs each launch's programs last to first (or in
    its usual order), and the names of the launched kernels are added to ``launched``."""
    builder = interpreter.interpreter_builder
    set_grid_idx, call = builder.set_grid_idx, interpreter.GridExecutor.__call__

    def mirrored(x: int, y: int, z: int) -> None:
        gx, gy, gz = builder.grid_dim
        set_grid_idx(gx - 1 - x, gy - 1 - y, gz - 1 - z)

    def recorded(self, *args, **kwargs):
        launched.add(self.fn.__name__)
        return call(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if reverse:
            patch.setattr(builder, "set_grid_idx", mirrored)
        patch.setattr(interpreter.GridExecutor, "__call__", recorded)
        yield


def kernel_sources() -> dict[str, str]:
    """``module.function`` -> source of every ``@triton.jit`` function of the kernels
    package (kernels and the helpers they call; compiled or interpreted)."""
    found = {}
    for info in pkgutil.iter_modules(canvas_engineering.kernels.__path__):
        module = importlib.import_module(f"canvas_engineering.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.KernelInterface):
                found[f"{info.name}.{name}"] = inspect.getsource(value.fn)
    return found


@pytest.mark.skipif(
    not INTERPRETING, reason="needs Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)"
)
def test_kernels_do_not_depend_on_the_order_of_their_programs():
    """Under the interpreter, passes through every kernel of the package (the kernel-backed
    types on the canvas, and a long Hyena convolution) give the same bits twice in the
    usual program order and once with every launch's programs run last to first: no
    program reads what another program of its launch writes and nothing accumulates across
    programs, so no GPU scheduling can change the result. The reversed pass runs in
    deterministic mode, whose NaN-filled allocations would show any output element that no
    program writes."""
    forward_order: set[str] = set()
    reversed_order: set[str] = set()
    for dispatcher, x in (dispatcher_of(KERNEL_TYPES), long_convolution()):
        with interpreted_triton():
            with program_order(reverse=False, launched=forward_order):
                first = pass_results(dispatcher, x)
                assert_bitwise_equal(pass_results(dispatcher, x), first)
            with program_order(reverse=True, launched=reversed_order), deterministic_algorithms():
                assert_bitwise_equal(pass_results(dispatcher, x), first)
    kernels_of_package = {name.rsplit(".", 1)[1] for name in kernel_sources() if name.endswith("_kernel")}
    assert forward_order == reversed_order == kernels_of_package


def test_no_kernel_uses_atomics():
    """No Triton function of the package calls an atomic operation (``tl.atomic_add`` and
    the like), whose order of arrival on a GPU is unspecified."""
    sources = kernel_sources()
    assert len(sources) >= 10
    assert [name for name, source in sources.items() if "atomic_" in source] == []


NO_DETERMINISTIC_CUDA_VERSION: dict[str, Callable[[str], bool]] = {
    **{
        f"aten::{name}": lambda dtype: True
        for name in (
            "avg_pool3d_backward",
            "_adaptive_avg_pool2d_backward",
            "_adaptive_avg_pool3d_backward",
            "adaptive_max_pool2d_backward",
            "fractional_max_pool2d_backward",
            "fractional_max_pool3d_backward",
            "max_unpool2d",
            "max_unpool3d",
            "upsample_linear1d_backward",
            "upsample_bilinear2d_backward",
            "upsample_bicubic2d_backward",
            "upsample_trilinear3d_backward",
            "reflection_pad1d_backward",
            "reflection_pad2d_backward",
            "reflection_pad3d_backward",
            "nll_loss_forward",
            "nll_loss2d_forward",
            "_ctc_loss_backward",
            "_embedding_bag_backward",
            "put_",
            "histc",
            "bincount",
            "median",
            "grid_sampler_2d_backward",
            "grid_sampler_3d_backward",
            "scatter_reduce",
        )
    },
    "aten::cumsum": lambda dtype: dtype not in ("long int", "int", "short int", "signed char", "unsigned char", "bool"),
}
"""aten op -> whether a call with that first-input dtype has no deterministic CUDA version:
the ops ``torch.use_deterministic_algorithms`` documents as raising RuntimeError on CUDA
tensors (cumsum only for floating-point and complex dtypes; max_unpool1d runs as
max_unpool2d; embedding_bag, bincount, median and scatter_reduce raise only in some modes,
listed whole)."""


def ops_run(run: Callable[[], None]) -> set[tuple[str, str]]:
    """(aten op, dtype of its first input) of every op ``run()`` calls, backward included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        run()
    return {
        (event.name, str(event.input_dtypes[0]) if event.input_dtypes else "")
        for event in profile.events()
        if event.name.startswith("aten::")
    }


def test_every_op_has_a_deterministic_cuda_version():
    """Forward and backward through every type's eager ops and through every kernel's
    launcher call no op that ``torch.use_deterministic_algorithms(True)`` refuses on CUDA,
    so that setting makes a CUDA run deterministic."""

    def through(
        dispatcher: nn.Module, x: torch.Tensor, context: Callable[[], AbstractContextManager[None]]
    ) -> Callable[[], None]:
        dispatcher, x = dispatcher.to(DEVICE), x.to(DEVICE).requires_grad_(True)

        def run() -> None:
            with context():
                dispatcher(x).sum().backward()

        return run

    ops = ops_run(through(*dispatcher_of(EVERY_TYPE), eager_ops))
    ops |= ops_run(through(*dispatcher_of(KERNEL_TYPES), kernels))
    ops |= ops_run(through(*long_convolution(), kernels))
    ops |= ops_run(through(*dispatcher_of(("hyena",)), eager_ops))  # 12 queries pool 24 keys
    assert ("aten::index_add", "float") in ops
    refused = sorted(
        (name, dtype) for name, dtype in ops if NO_DETERMINISTIC_CUDA_VERSION.get(name, lambda _: False)(dtype)
    )
    assert refused == []


@pytest.mark.gpu
def test_passes_repeat_bit_for_bit_in_deterministic_mode():
    """In deterministic mode, two passes through every type and a long Hyena convolution on
    DEVICE give the same bits (on CUDA through the kernels, on CPU the eager ops)."""
    with deterministic_algorithms():
        for dispatcher, x in (dispatcher_of(EVERY_TYPE), long_convolution()):
            dispatcher, x = dispatcher.to(DEVICE), x.to(DEVICE)
            assert_bitwise_equal(pass_results(dispatcher, x), pass_results(dispatcher, x))
