"""The linear attention Triton kernels (interpreter on CPU, compiled on CUDA) and the eager
version against the naive float64 oracle: outputs and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, cu_seqlens, relative_error
from reference.attention import linear_attention_reference

from canvas_engineering.ops.linear import segment_linear_attention
from canvas_engineering.ops.segments import SegmentIndex

QUERY_LENGTHS, KEYSET_OF, KEYSET_LENGTHS = [5, 1, 37, 20, 3], [0, 1, 2, 2, 0], [9, 3, 40]


def data(dtype, head_dim=20, value_dim=12, seed=0, query_lengths=QUERY_LENGTHS, keyset_lengths=KEYSET_LENGTHS):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sum(query_lengths), 3, head_dim, generator=generator)
    k = torch.randn(2, sum(keyset_lengths), 3, head_dim, generator=generator)
    v = torch.randn(2, sum(keyset_lengths), 3, value_dim, generator=generator)
    grad = torch.randn(2, sum(query_lengths), 3, value_dim, generator=generator)
    return [t.to(dtype) for t in (q, k, v, grad)]


def oracle(q, k, v, grad, relu, query_lengths=QUERY_LENGTHS, keyset_of=KEYSET_OF, keyset_lengths=KEYSET_LENGTHS):
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    expected = linear_attention_reference(*exact, query_lengths, keyset_of, keyset_lengths, relu=relu)
    expected.backward(grad.double())
    return expected, [t.grad for t in exact]


def kernel_errors(
    dtype,
    relu,
    query_lengths=QUERY_LENGTHS,
    keyset_of=KEYSET_OF,
    keyset_lengths=KEYSET_LENGTHS,
    head_dim=20,
    value_dim=12,
):
    """Relative errors of the kernels' output and (dq, dk, dv) against the oracle."""
    from canvas_engineering.kernels.linear_attention import BLOCK_ROWS, linear_attention_bwd, linear_attention_fwd

    q, k, v, grad = data(dtype, head_dim, value_dim, query_lengths=query_lengths, keyset_lengths=keyset_lengths)
    pairs = [(s, start) for s, n in enumerate(query_lengths) for start in range(0, n, BLOCK_ROWS)]
    tables = (
        cu_seqlens(query_lengths, DEVICE),
        cu_seqlens(keyset_lengths, DEVICE),
        torch.tensor(keyset_of, dtype=torch.int32, device=DEVICE),
        torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE),
        torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE),
    )
    on_device = [t.to(DEVICE) for t in (q, k, v, grad)]
    out, state, normaliser = linear_attention_fwd(*on_device[:3], *tables, 1e-6, relu)
    grads = linear_attention_bwd(on_device[3], *on_device[:3], out, state, normaliser, *tables, 1e-6, relu)
    expected, expected_grads = oracle(q, k, v, grad, relu, query_lengths, keyset_of, keyset_lengths)
    return [
        relative_error(actual.cpu(), reference) for actual, reference in zip((out, *grads), (expected, *expected_grads))
    ]


def tolerance(dtype) -> float:
    """The largest relative error allowed the kernels at inputs of ``dtype``."""
    return 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("relu", [False, True], ids=["elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_the_oracle(dtype, relu):
    pytest.importorskip("triton")
    assert max(kernel_errors(dtype, relu)) < tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_the_oracle_at_head_dim_128(dtype):
    """Head dim 128, value dim 96 (a 128 x 128 state): the launch configuration of more than
    64 columns (8 warps; 32 rows per step in the query backward, and in every part kernel at
    float32), parts of 32 rows over the 37-row segment."""
    pytest.importorskip("triton")
    assert max(kernel_errors(dtype, False, head_dim=128, value_dim=96)) < tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("wanted", [1, 48], ids=["one-part", "several-parts"])
def test_kernels_split_sets_into_parts(wanted, monkeypatch):
    """One part per set (each program walks several blocks), and several parts per set (at
    B x H = 6: 8 per key set, 4 per segment; non-empty ones summed by the launcher, empty
    ones after them)."""
    pytest.importorskip("triton")
    from canvas_engineering.kernels import linear_attention

    monkeypatch.setattr(linear_attention, "PROGRAMS_WANTED", wanted)
    errors = kernel_errors(torch.float32, False, query_lengths=[150, 9], keyset_of=[0, 0], keyset_lengths=[200])
    assert max(errors) < (1e-5 if DEVICE == "cpu" else 3e-3), errors


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_eager_matches_the_oracle(feature_map):
    q, k, v, grad = data(torch.float64)
    index = SegmentIndex.build(QUERY_LENGTHS, KEYSET_OF, KEYSET_LENGTHS)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = segment_linear_attention(*leaves, index, 1e-6, feature_map)
    out.backward(grad)
    expected, expected_grads = oracle(q, k, v, grad, feature_map == "relu")
    assert relative_error(out, expected) < 1e-12
    for leaf, reference in zip(leaves, expected_grads):
        assert relative_error(leaf.grad, reference) < 1e-12


def test_eager_gradcheck():
    index = SegmentIndex.build([3, 2], [0, 0], [4])
    generator = torch.Generator().manual_seed(2)
    inputs = [
        torch.randn(1, rows, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True) for rows in (5, 4, 4)
    ]
    assert torch.autograd.gradcheck(lambda q, k, v: segment_linear_attention(q, k, v, index, 1e-6), inputs)


def test_unknown_feature_map_is_refused():
    from canvas_engineering import create_attention

    with pytest.raises(ValueError, match="feature_map must be one of"):
        create_attention("linear_attention", 8, 2, feature_map="softplus")
