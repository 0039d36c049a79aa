"""The eager selective scan (two-level chunks) against a step-by-step float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from reference.recurrence import selective_scan_reference

from canvas_engineering.ops.segments import SegmentIndex
from canvas_engineering.ops.selective_scan import segment_selective_scan, selective_scan


def scan_inputs(length, channels=6, state=4, seed=0, step_scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)
    x, dt = draw(2, length, channels), F.softplus(draw(2, length, channels)) * step_scale
    A = -torch.arange(1, state + 1, dtype=dtype).repeat(channels, 1)
    return x, dt, A, draw(2, length, state), draw(2, length, state), draw(channels)


def assert_matches_the_oracle(inputs, chunk):
    """Output and every gradient of the float32 scan equal the float64 step-by-step oracle."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    exact = [t.double().requires_grad_(True) for t in inputs]
    y = selective_scan(*leaves, chunk=chunk)
    expected = selective_scan_reference(*exact)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(cotangent)
    expected.backward(cotangent.double())
    assert relative_error(y, expected) < 1e-5
    for leaf, reference in zip(leaves, exact):
        assert relative_error(leaf.grad, reference.grad) < 1e-5


@pytest.mark.parametrize("length, chunk", [(1, 0), (15, 0), (16, 0), (17, 0), (100, 0), (100, 7), (300, 64)])
def test_matches_the_oracle(length, chunk):
    assert_matches_the_oracle(scan_inputs(length), chunk)


@pytest.mark.parametrize("wanted", [(0,), (2,), (4, 5), (1, 3)], ids=["x", "A", "C-D", "dt-B"])
def test_gradients_of_some_inputs(wanted):
    """The written-out backward computes only the gradients asked for; they equal the oracle's."""
    inputs = scan_inputs(50)
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    exact = [t.double().requires_grad_(True) for t in inputs]
    cotangent = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(1))
    selective_scan(*leaves, chunk=8).backward(cotangent)
    selective_scan_reference(*exact).backward(cotangent.double())
    for i, (leaf, reference) in enumerate(zip(leaves, exact)):
        assert (leaf.grad is None) == (i not in wanted)
        if i in wanted:
            assert relative_error(leaf.grad, reference.grad) < 1e-5


def test_decays_below_the_floor_match_the_oracle():
    """Steps so large that dt * A (and the sums of dt the chunks carry) go far below the
    exponent floor: outputs and every gradient still equal the unfloored float64 oracle."""
    inputs = scan_inputs(100, step_scale=60.0)
    assert (inputs[1].unsqueeze(-1) * inputs[2] < math.log(torch.finfo(torch.float32).tiny) / 2).float().mean() > 0.5
    assert_matches_the_oracle(inputs, chunk=10)


def test_gradcheck():
    inputs = [t.requires_grad_(True) for t in scan_inputs(40, channels=3, state=2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *args: selective_scan(*args, chunk=8), inputs)


def test_stable_at_16k():
    """M = 16384 with large steps (fast decay) and tiny ones: finite, equal to float64."""
    for step_scale in (20.0, 1e-3):
        inputs = scan_inputs(16384, channels=4, state=3, step_scale=step_scale)
        y = selective_scan(*inputs)
        expected = selective_scan(*(t.double() for t in inputs))
        assert torch.isfinite(y).all()
        assert relative_error(y, expected) < 1e-5
        head = [t[:, :500] if t.dim() == 3 else t for t in inputs]
        assert relative_error(y[:, :500], selective_scan_reference(*(t.double() for t in head))) < 1e-5


def test_each_key_set_scans_once_from_zero():
    index = SegmentIndex.build([2, 3, 1], [0, 1, 0], [5, 9])
    x, dt, A, B, C, D = scan_inputs(14)
    y = segment_selective_scan(x, dt, A, B, C, D, index)
    parts = [selective_scan(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D) for a, b in ((0, 5), (5, 14))]
    assert relative_error(y, torch.cat(parts, dim=1)) < 1e-6
