"""The WKV recurrence: the Triton scan (interpreter on CPU, compiled on CUDA) and the eager
chunked scan against a step-by-step float64 oracle, gradients included, and stability where
a naive exponential would overflow."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, cu_seqlens, relative_error
from reference.recurrence import wkv_reference

from canvas_engineering.attention.recurrence import RWKVAttention
from canvas_engineering.ops.rwkv import keys_read, segment_wkv, wkv_scan
from canvas_engineering.ops.segments import SegmentIndex

LENGTHS = [5, 0, 1, 70, 17, 64]


def inputs(lengths, heads=3, head_dim=20, key_scale=4.0, seed=0, decay=None, bonus=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, sum(lengths), heads, head_dim)
    k = torch.randn(shape, generator=generator) * key_scale
    v = torch.randn(shape, generator=generator)
    w = (
        -torch.exp(torch.randn(heads, head_dim, generator=generator))
        if decay is None
        else torch.full((heads, head_dim), decay)
    )
    u = torch.randn(heads, head_dim, generator=generator) if bonus is None else torch.full((heads, head_dim), bonus)
    return k, v, w, u


def oracle(k, v, w, u, lengths, cotangent):
    exact = [t.double().requires_grad_(True) for t in (k, v, w, u)]
    y = wkv_reference(*exact, cu_seqlens(lengths))
    y.backward(cotangent.double())
    return y, [t.grad for t in exact]


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_oracle(dtype, monkeypatch):
    """Sequences in 7 parts of up to 10 steps (empty ones at the ends of the short ones),
    each part's carry read 2 parts (or steps) at a time, the backward's walk in tiles of 4 steps."""
    pytest.importorskip("triton")
    from canvas_engineering.kernels import wkv
    from canvas_engineering.kernels.wkv import wkv_bwd, wkv_fwd

    monkeypatch.setattr(wkv, "MIN_STEPS", 4)
    monkeypatch.setattr(wkv, "CARRY_BLOCK", 2)
    monkeypatch.setattr(wkv, "TILE", 4)
    assert wkv._parts(len(LENGTHS), sum(LENGTHS), 6, 1) == 7

    k, v, w, u = inputs(LENGTHS)
    k, v = k.to(dtype), v.to(dtype)
    cotangent = torch.randn(k.shape, generator=torch.Generator().manual_seed(5))
    on_device = lambda t: t.to(DEVICE)
    cu = on_device(cu_seqlens(LENGTHS))
    y, part_state = wkv_fwd(on_device(k), on_device(v), on_device(w), on_device(u), cu)
    dk, dv, dw, du = wkv_bwd(
        on_device(cotangent.to(dtype)), on_device(k), on_device(v), on_device(w), on_device(u), part_state, cu
    )
    expected, grads = oracle(k, v, w, u, LENGTHS, cotangent.to(dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for actual, reference in zip((y, dk, dv, dw, du), (expected, *grads)):
        assert relative_error(actual.cpu(), reference) < tolerance


@pytest.mark.gpu
def test_kernel_is_stable_where_exponentials_overflow():
    """Saturated keys, a decay of 1e-4 per step, a bonus of 80 (e^90 > float32's range), M = 4096."""
    pytest.importorskip("triton")
    from canvas_engineering.kernels.wkv import wkv_fwd

    lengths = [4096]
    k, v, w, u = inputs(lengths, heads=1, head_dim=16, key_scale=50.0, decay=-1e-4, bonus=80.0)
    y, _ = wkv_fwd(k.to(DEVICE), v.to(DEVICE), w.to(DEVICE), u.to(DEVICE), cu_seqlens(lengths).to(DEVICE))
    expected = wkv_reference(k.double(), v.double(), w.double(), u.double(), cu_seqlens(lengths))
    assert torch.isfinite(y).all()
    assert relative_error(y.cpu(), expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
def test_kernel_gradients_are_stable_where_exponentials_overflow(monkeypatch):
    """The backward's recomputed sums under the same saturated keys and bonus of 80, over
    parts of 13 steps walked back in tiles of 4: every gradient finite, and dv (the bonus
    share of each step, near 1) matches; the others are of order e^-80 or cancel to it."""
    pytest.importorskip("triton")
    from canvas_engineering.kernels import wkv
    from canvas_engineering.kernels.wkv import wkv_bwd, wkv_fwd

    monkeypatch.setattr(wkv, "TILE", 4)
    lengths = [200]
    k, v, w, u = inputs(lengths, heads=1, head_dim=16, key_scale=50.0, decay=-1e-4, bonus=80.0)
    cotangent = torch.randn(k.shape, generator=torch.Generator().manual_seed(5))
    cu = cu_seqlens(lengths).to(DEVICE)
    y, part_state = wkv_fwd(k.to(DEVICE), v.to(DEVICE), w.to(DEVICE), u.to(DEVICE), cu)
    grads = wkv_bwd(cotangent.to(DEVICE), k.to(DEVICE), v.to(DEVICE), w.to(DEVICE), u.to(DEVICE), part_state, cu)
    _, expected = oracle(k, v, w, u, lengths, cotangent)
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert relative_error(grads[1].cpu(), expected[1]) < 1e-5


def test_eager_scan_matches_the_oracle():
    k, v, w, u = inputs(LENGTHS)
    cotangent = torch.randn(k.shape, generator=torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_(True) for t in (k, v, w, u)]
    bounds = cu_seqlens(LENGTHS).tolist()
    y = torch.cat(
        [wkv_scan(leaves[0][:, a:b], leaves[1][:, a:b], leaves[2], leaves[3]) for a, b in zip(bounds[:-1], bounds[1:])],
        dim=1,
    )
    y.backward(cotangent)
    expected, grads = oracle(k, v, w, u, LENGTHS, cotangent)
    assert relative_error(y, expected) < 1e-5
    for leaf, reference in zip(leaves, grads):
        assert relative_error(leaf.grad, reference) < 1e-5


def test_eager_scan_is_stable_at_16k():
    """M = 16384, saturated keys, slow decay, a bonus of 80: finite and equal to float64."""
    k, v, w, u = inputs([16384], heads=1, head_dim=8, key_scale=50.0, decay=-1e-4, bonus=80.0)
    y = wkv_scan(k, v, w, u)
    expected = wkv_scan(k.double(), v.double(), w.double(), u.double())
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < 1e-5
    assert (
        relative_error(
            y[:, :300], wkv_reference(k[:, :300].double(), v[:, :300].double(), w.double(), u.double(), [0, 300])
        )
        < 1e-5
    )


def test_eager_scan_gradcheck():
    """Chunks of 16, 16 and 8 steps: the carries between chunks and a short last chunk."""
    k, v, w, u = (t.double().requires_grad_(True) for t in inputs([40], heads=1, head_dim=3))
    assert torch.autograd.gradcheck(lambda *args: wkv_scan(*args, chunk=16), (k, v, w, u))


def test_segment_reads_follow_query_positions():
    """Query i of a segment reads step min(i, M - 1) of its key set's scan; shared key sets scan once."""
    index = SegmentIndex.build([3, 6, 2], [0, 0, 1], [4, 5])
    k, v, w, u = inputs([9], heads=1, head_dim=4)
    scanned = torch.cat([wkv_scan(k[:, :4], v[:, :4], w, u), wkv_scan(k[:, 4:], v[:, 4:], w, u)], dim=1)
    read = segment_wkv(k, v, w, u, index)
    expected_rows = [0, 1, 2, 0, 1, 2, 3, 3, 3, 4, 5]
    assert torch.allclose(read, scanned[:, expected_rows])


def test_keys_read_cuts_each_key_set_to_the_steps_read():
    """Key set 0 (input rows 0..7) is read up to step 5 by a segment of 6 queries, key set 1
    (rows 3..7, overlapping) up to step 1: the rows read are 0..5, each once, and the WKV
    over the cut index equals the WKV over the whole one (to float32 rounding: the scan's
    chunks have other lengths)."""
    index = SegmentIndex.build([3, 6, 2], [0, 0, 1], [8, 5], key_source=list(range(8)) + list(range(3, 8)))
    rows, cut = keys_read(index)
    assert rows.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert cut.keyset_sizes == (6, 2)
    k, v, w, u = inputs([8], heads=2, head_dim=3)
    whole = segment_wkv(index.pack_keys(k), index.pack_keys(v), w, u, index)
    assert (
        relative_error(segment_wkv(cut.pack_keys(rows.take(k)), cut.pack_keys(rows.take(v)), w, u, cut), whole) < 1e-6
    )


@pytest.mark.parametrize("n, m", [(3, 11), (11, 3), (4, 4)])
def test_module_projects_only_the_keys_it_reads(n, m):
    module = RWKVAttention(8, 2)
    projected_rows = []
    for projection in (module.k_proj, module.v_proj):
        projection.register_forward_hook(lambda _, args, __: projected_rows.append(args[0].shape[1]))
    keys = torch.randn(2, m, 8, requires_grad=True)
    module(torch.randn(2, n, 8), keys, keys).sum().backward()
    read = min(n, m)
    assert projected_rows == [read, read]
    assert (keys.grad[:, :read].abs().sum(-1) > 0).all()
    assert (keys.grad[:, read:] == 0).all()
