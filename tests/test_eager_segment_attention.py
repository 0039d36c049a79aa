"""The eager segment attention ops (what CPUs run) against the naive oracle on ragged,
key-sharing segments, including the chunked top-k path, and gradcheck in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import cu_seqlens, relative_error
from reference.attention import segment_attention_reference

import canvas_engineering.ops.segment_attention as segment_ops
from canvas_engineering.ops.segment_attention import segment_attention
from canvas_engineering.ops.segments import SegmentIndex

QUERY_LENGTHS = [5, 1, 37, 20, 16, 9]
KEYSET_OF = [0, 1, 2, 2, 3, 0]
KEYSET_LENGTHS = [9, 3, 20, 37]
MODES = {
    "softmax": dict(),
    "local_w1": dict(window=1),
    "local_w5": dict(window=5),
    "local_w33": dict(window=33),
    "top3": dict(top_k=3),
    "sigmoid": dict(sigmoid=True),
}


def ragged(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = SegmentIndex.build(QUERY_LENGTHS, KEYSET_OF, KEYSET_LENGTHS)
    q = torch.randn(2, index.n_queries, 3, 8, generator=generator, dtype=dtype)
    k = torch.randn(2, index.n_keys, 3, 8, generator=generator, dtype=dtype)
    v = torch.randn(2, index.n_keys, 3, 8, generator=generator, dtype=dtype)
    return index, q, k, v


def expanded_reference(index, q, k, v, scale, **mode):
    """The oracle on each segment's own copy of its key set."""
    starts = cu_seqlens(KEYSET_LENGTHS).tolist()
    rows = [starts[s] + i for s in KEYSET_OF for i in range(KEYSET_LENGTHS[s])]
    cu_q = cu_seqlens(QUERY_LENGTHS).tolist()
    key_lengths = [KEYSET_LENGTHS[s] for s in KEYSET_OF]
    cu_k = cu_seqlens(key_lengths).tolist()
    return segment_attention_reference(q, k[:, rows], v[:, rows], cu_q, cu_k, scale, **mode)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_eager_matches_the_oracle(mode):
    index, q, k, v = ragged()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    exact = [t.clone().requires_grad_(True) for t in (q, k, v)]
    actual = segment_attention(*leaves, index, 0.4, **MODES[mode])
    expected = expanded_reference(index, *exact, 0.4, **MODES[mode])
    cotangent = torch.randn_like(expected)
    actual.backward(cotangent)
    expected.backward(cotangent)
    assert relative_error(actual, expected) < 1e-12
    for mine, theirs in zip(leaves, exact):
        assert relative_error(mine.grad, theirs.grad) < 1e-12


def test_chunked_top_k_equals_unchunked(monkeypatch):
    index, q, k, v = ragged()
    whole = segment_attention(q, k, v, index, 0.4, top_k=4)
    monkeypatch.setattr(segment_ops, "SCORE_BUDGET", 2 * 3 * 40)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    chunked = segment_attention(*leaves, index, 0.4, top_k=4)
    assert relative_error(chunked, whole) < 1e-12
    exact = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expanded_reference(index, *exact, 0.4, top_k=4).sum().backward()
    chunked.sum().backward()
    for mine, theirs in zip(leaves, exact):
        assert relative_error(mine.grad, theirs.grad) < 1e-12


@pytest.mark.parametrize("mode", sorted(MODES))
def test_eager_gradcheck(mode):
    index = SegmentIndex.build([3, 1, 4], [0, 1, 0], [5, 2])
    generator = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(1, rows, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True) for rows in (8, 7, 7)
    ]
    assert torch.autograd.gradcheck(lambda q, k, v: segment_attention(q, k, v, index, 0.5, **MODES[mode]), inputs)
