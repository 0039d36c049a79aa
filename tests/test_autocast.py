"""Mixed precision on CPU: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a dispatcher
runs every type within bfloat16 rounding of its float32 result, and the scans keep their
state in float32 (their error does not grow with the sequence).

bfloat16 keeps 8 significant bits: a rounding moves a value by at most 2^-9 of itself. The
float16 and bfloat16 paths of the CUDA kernels are checked by the GPU check's tests."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

from canvas_engineering import BUILTIN_ATTENTION, AttentionDispatcher, CanvasLayout, CanvasTopology, Connection
from canvas_engineering.ops.rwkv import segment_wkv
from canvas_engineering.ops.segment_attention import segment_attention
from canvas_engineering.ops.segments import SegmentIndex
from canvas_engineering.ops.selective_scan import segment_selective_scan

BFLOAT16_STEP = 2.0**-8
"""The spacing of bfloat16 values relative to their size."""

TYPE_TOLERANCE = 4 * BFLOAT16_STEP
"""Relative error of a dispatcher under autocast. Every projection and matrix product rounds
its inputs and its output to bfloat16 (about 2^-9 / sqrt(3) relative, RMS, each); a type
chains up to about eight of them, which add in quadrature to about 0.8 * 2^-8, and a softmax
scales the error of its logits by their size (up to 10 with cosine attention's initial
temperature). Measured: 0.4 to 2.3 times 2^-8."""

ONE_ROUNDING = BFLOAT16_STEP
"""Relative error of an op computed in float32 whose result is rounded once to bfloat16
(at most 2^-9 per element; measured 0.4 * 2^-8). Rounding the carried state at every step
instead grows with the length (4 * 2^-8 for the selective scan over 1024 steps)."""


@pytest.mark.parametrize("name", sorted(BUILTIN_ATTENTION))
def test_dispatcher_runs_every_type_under_bfloat16_autocast(name):
    layout = CanvasLayout(
        T=2, spatial_shape=(3, 6), d_model=32, regions={"a": (0, 2, 0, 2, 0, 6), "b": (0, 2, 2, 3, 0, 6)}
    )
    connections = [
        Connection("a", "b", fn=name),
        Connection("b", "a", fn=name),
        Connection("a", "a", fn=name, t_src=0, t_dst=-1),
    ]
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(CanvasTopology(connections), layout, d_model=32, n_heads=2)
    if name == "sparse_attention":
        # top-k is discontinuous in the logits: a rounding of 2^-8 swaps keys whose logits are
        # that close to the k-th largest, which moves the output by the swapped key's weight,
        # not by O(2^-8); with every key kept the type is smooth (top-k itself is checked in
        # test_top_k_under_bfloat16_autocast, with separated logits)
        dispatcher.fn_modules[name].top_k = layout.num_positions
    x = torch.randn(2, layout.num_positions, 32)
    expected = dispatcher(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = dispatcher(x)
    assert output.shape == expected.shape and torch.isfinite(output).all()
    if name == "none":
        assert not output.any() and not expected.any()
    else:
        assert relative_error(output, expected) <= TYPE_TOLERANCE


def test_top_k_under_bfloat16_autocast():
    """Query i has logit ``c_i * m / 3`` for the m-th key of its key set (c_i in [1, 2]): the
    gaps between logits are 20 times their bfloat16 rounding, so both precisions keep the same
    keys and the outputs agree to rounding."""
    index = SegmentIndex.build([6, 9], [0, 1], [12, 10])
    generator = torch.Generator().manual_seed(0)
    direction = torch.zeros(16)
    direction[0] = 1.0
    q = torch.rand(2, index.n_queries, 2, 1, generator=generator).add(1.0) * direction
    key_rank = torch.cat([torch.arange(m) for m in index.keyset_sizes]).float() / 3.0
    k = key_rank.view(1, -1, 1, 1) * direction + torch.randn(2, index.n_keys, 2, 16, generator=generator) * (
        1 - direction
    )
    v = torch.randn(2, index.n_keys, 2, 16, generator=generator)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    expected = segment_attention(q.float(), k.float(), v.float(), index, 1.0, top_k=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = segment_attention(q, k, v, index, 1.0, top_k=4)
    assert relative_error(segment_attention(q.float(), k.float(), v.float(), index, 1.0), expected) > 0.1
    assert relative_error(output, expected) <= TYPE_TOLERANCE


def test_scans_keep_float32_state_under_bfloat16_autocast():
    length, heads, head_dim, channels, state = 1024, 2, 8, 8, 4
    index = SegmentIndex.build([length], [0], [length])
    generator = torch.Generator().manual_seed(0)
    rounded = lambda *shape: torch.randn(*shape, generator=generator).bfloat16()
    k, v, u = rounded(2, length, heads, head_dim), rounded(2, length, heads, head_dim), rounded(heads, head_dim)
    w = -torch.rand(heads, head_dim, generator=generator).mul(0.05).bfloat16()
    x, B, C, D = rounded(2, length, channels), rounded(2, length, state), rounded(2, length, state), rounded(channels)
    dt = torch.rand(2, length, channels, generator=generator).mul(0.1).bfloat16()
    A = -torch.rand(channels, state, generator=generator).mul(0.1).bfloat16()
    scans = {
        "wkv": (lambda *t: segment_wkv(*t, index), (k, v, w, u)),
        "selective_scan": (lambda *t: segment_selective_scan(*t, index), (x, dt, A, B, C, D)),
    }
    for name, (scan, inputs) in scans.items():
        expected = scan(*(t.float() for t in inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = scan(*inputs)
        assert output.dtype == torch.bfloat16, name
        assert relative_error(output, expected) <= ONE_ROUNDING, name
