"""Every custom op of the package (each Triton forward and backward) passes
``torch.library.opcheck``: its schema, its fake (meta) implementation against the real one,
its autograd registration, and its tracing by AOT autograd with static and dynamic shapes.

The ops run their Triton kernels: on CUDA tensors when there is a GPU, else through Triton's
interpreter on CPU tensors (so the inputs are tiny)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

from conftest import DEVICE, kernels  # noqa: E402

from canvas_engineering.ops.fftconv import _gated_fft_conv_backward_op, _gated_fft_conv_op, gated_fft_conv_tables  # noqa: E402
from canvas_engineering.ops.linear import _linear_attention_backward_op, _linear_attention_op, linear_attention_tables  # noqa: E402
from canvas_engineering.ops.rwkv import _wkv_backward_op, _wkv_op  # noqa: E402
from canvas_engineering.ops.segment_attention import (  # noqa: E402
    SegmentAttentionTables,
    _segment_attention_backward_op,
    _segment_attention_op,
)
from canvas_engineering.ops.segments import SegmentIndex  # noqa: E402
from canvas_engineering.ops.selective_scan import (
    _selective_scan_backward_op,
    _selective_scan_op,
    selective_scan_tables,
)  # noqa: E402

INDEX = SegmentIndex.build([5, 3, 4], [0, 1, 0], [4, 6])
"""Three segments over two key sets, the first read twice; padded blocks everywhere."""


def leaves(*shapes: Sequence[int], seed: int = 0):
    """Seeded float32 tensors of ``shapes`` on DEVICE that require grad."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(DEVICE).requires_grad_(True) for shape in shapes]


def check(op, args) -> None:
    with kernels():
        torch.library.opcheck(op, args)


def check_with_backward(forward_op, backward_op, args, backward_args) -> None:
    """opcheck ``forward_op(*args)``, then ``backward_op`` on ``backward_args(outputs)``."""
    check(forward_op, args)
    with kernels(), torch.no_grad():
        outputs = forward_op(*args)
    check(backward_op, backward_args(outputs))


@pytest.mark.gpu
@pytest.mark.parametrize("window, top_k, sigmoid", [(0, 0, False), (3, 0, False), (0, 2, False), (0, 0, True)])
def test_segment_attention_ops(window, top_k, sigmoid):
    index = INDEX.to(DEVICE)
    tables = SegmentAttentionTables.build(index, 16)
    q, k, v = leaves((1, index.n_queries, 2, 16), (1, index.n_keys, 2, 16), (1, index.n_keys, 2, 16))
    table_args = tables.tensors
    options = (0.25, 16, window, top_k, sigmoid)
    (grad_out,) = leaves(q.shape, seed=1)

    def backward_args(outputs):
        out, lse, selection = outputs
        return (grad_out.detach(), q.detach(), k.detach(), v.detach(), out, lse, selection, *table_args, *options)

    check_with_backward(
        _segment_attention_op, _segment_attention_backward_op, (q, k, v, *table_args, *options), backward_args
    )


@pytest.mark.gpu
@pytest.mark.parametrize("relu", [False, True])
def test_linear_attention_ops(relu):
    index = INDEX.to(DEVICE)
    tables = linear_attention_tables(index).tensors
    q, k, v = leaves((1, index.n_queries, 2, 8), (1, index.n_keys, 2, 8), (1, index.n_keys, 2, 4))
    (grad_out,) = leaves((1, index.n_queries, 2, 4), seed=1)

    def backward_args(outputs):
        out, state, normaliser = outputs
        return (grad_out.detach(), q.detach(), k.detach(), v.detach(), out, state, normaliser, *tables, 1e-6, relu)

    check_with_backward(
        _linear_attention_op, _linear_attention_backward_op, (q, k, v, *tables, 1e-6, relu), backward_args
    )


@pytest.mark.gpu
def test_wkv_ops():
    index = INDEX.to(DEVICE)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    k, v, u = leaves((1, index.n_keys, 2, 8), (1, index.n_keys, 2, 8), (2, 8))
    w = (-torch.linspace(0.1, 2.0, 16).view(2, 8)).to(DEVICE).requires_grad_(True)
    (grad_y,) = leaves(v.shape, seed=1)

    def backward_args(outputs):
        return (grad_y.detach(), k.detach(), v.detach(), w.detach(), u.detach(), outputs[1], cu_seqlens)

    check_with_backward(_wkv_op, _wkv_backward_op, (k, v, w, u, cu_seqlens), backward_args)


@pytest.mark.gpu
def test_selective_scan_ops():
    index = INDEX.to(DEVICE)
    tables = selective_scan_tables(index)
    x, B, C, D = leaves((1, index.n_keys, 4), (1, index.n_keys, 3), (1, index.n_keys, 3), (4,))
    dt = torch.linspace(0.05, 0.5, index.n_keys * 4).view(1, index.n_keys, 4).to(DEVICE).requires_grad_(True)
    A = (-torch.linspace(0.5, 2.0, 12).view(4, 3)).to(DEVICE).requires_grad_(True)
    (grad_y,) = leaves(x.shape, seed=1)
    args = (x, dt, A, B, C, D, *tables.tensors, tables.n_checkpoints, tables.chunk)

    def backward_args(outputs):
        _, checkpoints = outputs
        return (
            grad_y.detach(),
            *(t.detach() for t in (x, dt, A, B, C, D)),
            checkpoints,
            *tables.tensors,
            tables.chunk,
        )

    check_with_backward(_selective_scan_op, _selective_scan_backward_op, args, backward_args)


@pytest.mark.gpu
def test_gated_fft_conv_ops():
    index = INDEX.to(DEVICE)
    tables = gated_fft_conv_tables(index)
    table_args = (*tables.tensors, tables.class_lengths, tables.class_sizes)
    mixed, gate_logits, spectrum = leaves((1, index.n_queries, 3), (1, index.n_queries, 3), (5, 3, 2))
    (grad,) = leaves(mixed.shape, seed=1)

    def backward_args(output):
        return (grad.detach(), mixed.detach(), gate_logits.detach(), spectrum.detach(), *table_args)

    check_with_backward(
        _gated_fft_conv_op, _gated_fft_conv_backward_op, (mixed, gate_logits, spectrum, *table_args), backward_args
    )
