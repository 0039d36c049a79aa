"""The segment attention Triton kernels (interpreter on CPU, compiled on CUDA) against the
naive float64 oracle: outputs and the gradients of q, k and v."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, cu_seqlens, relative_error
from reference.attention import segment_attention_reference

triton = pytest.importorskip("triton", reason="the kernel tests need triton (the 'triton' extra)")

from canvas_engineering.kernels.segment_attention import (  # noqa: E402
    block_rows,
    segment_attention_bwd,
    segment_attention_fwd,
    segment_topk_attention_bwd,
    segment_topk_attention_fwd,
    selection_threshold,
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
BLOCK = block_rows(64, torch.device(DEVICE), torch.float32)
TOLERANCE = {torch.float32: 1e-5 if DEVICE == "cpu" else 3e-3, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def blocks(lengths, size):
    pairs = [(s, start) for s, n in enumerate(lengths) for start in range(0, n, size)]
    return (
        torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE),
        torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE),
    )


SEPARATION = 1e-4
"""The least gap between a row's k-th and (k+1)-th largest exact logit that random test
inputs must have: 100 times the float32 rounding of these logits, so that no machine's
rounding can reorder them."""


def assert_no_near_ties(q, k, cu_seqlens_q, cu_seqlens_k, scale, top_k):
    """The k-th and (k+1)-th largest exact logits of every row are equal (an exact tie) or
    at least SEPARATION apart: the test's top-k selection does not depend on rounding."""
    for s in range(len(cu_seqlens_q) - 1):
        queries = q[:, cu_seqlens_q[s] : cu_seqlens_q[s + 1]].double()
        keys = k[:, cu_seqlens_k[s] : cu_seqlens_k[s + 1]].double()
        if queries.shape[1] == 0 or keys.shape[1] <= top_k:
            continue
        largest = (torch.einsum("bnhd,bmhd->bhnm", queries, keys) * scale).topk(top_k + 1, dim=-1).values
        gap = largest[..., top_k - 1] - largest[..., top_k]
        assert ((gap == 0) | (gap > SEPARATION)).all(), (
            f"segment {s}: a near-tie of {gap[(gap > 0) & (gap <= SEPARATION)].min().item():.1e}"
        )


def run_case(
    query_lengths,
    key_lengths,
    heads,
    head_dim,
    dtype,
    window=0,
    top_k=0,
    sigmoid=False,
    ties=False,
    seed=0,
    block=BLOCK,
    keyset_of=None,
):
    """Kernel forward and backward against the oracle; returns the four relative errors.

    ``key_lengths`` are the key sets' lengths; segment s reads key set ``keyset_of[s]``
    (its own when None). ``ties``: q and k hold small integers (every logit exact in any
    format, so many rows tie at their k-th largest logit, the same on every machine) and
    every odd key repeats the key before it."""
    keyset_of = list(range(len(query_lengths))) if keyset_of is None else keyset_of
    generator = torch.Generator().manual_seed(seed)
    batch = 2
    if ties:
        q = torch.randint(-2, 3, (batch, sum(query_lengths), heads, head_dim), generator=generator).float()
        k = torch.randint(-2, 3, (batch, sum(key_lengths), heads, head_dim), generator=generator).float()
        k[:, 1::2] = k[:, 0:-1:2][:, : k[:, 1::2].shape[1]]
    else:
        q = torch.randn(batch, sum(query_lengths), heads, head_dim, generator=generator)
        k = torch.randn(batch, sum(key_lengths), heads, head_dim, generator=generator)
    v = torch.randn(batch, sum(key_lengths), heads, head_dim, generator=generator)
    grad_out = torch.randn(batch, sum(query_lengths), heads, head_dim, generator=generator)
    q, k, v, grad_out = (t.to(dtype).to(DEVICE) for t in (q, k, v, grad_out))
    cu_q, cu_k = cu_seqlens(query_lengths, DEVICE), cu_seqlens(key_lengths, DEVICE)
    q_blocks, k_blocks = blocks(query_lengths, block), blocks(key_lengths, block)
    readers = [[s for s, keyset in enumerate(keyset_of) if keyset == j] for j in range(len(key_lengths))]
    keysets = (
        torch.tensor(keyset_of, dtype=torch.int32, device=DEVICE),
        torch.tensor(sum(readers, []), dtype=torch.int32, device=DEVICE),
        cu_seqlens([len(r) for r in readers], DEVICE),
    )
    read = torch.tensor([row for j in keyset_of for row in range(cu_k[j], cu_k[j + 1])], dtype=torch.long)
    cu_read = cu_seqlens([key_lengths[j] for j in keyset_of], DEVICE).cpu()
    scale = head_dim**-0.5
    if top_k:
        assert_no_near_ties(q.cpu(), k.cpu()[:, read], cu_q.tolist(), cu_read.tolist(), scale, top_k)
        out, lse, selection = segment_topk_attention_fwd(
            q, k, v, cu_q, cu_k, keysets[0], *q_blocks, scale, block, top_k
        )
        dq, dk, dv = segment_topk_attention_bwd(
            grad_out, q, k, v, out, lse, selection, cu_q, cu_k, *keysets, *q_blocks, *k_blocks, scale, block
        )
    else:
        out, lse = segment_attention_fwd(q, k, v, cu_q, cu_k, keysets[0], *q_blocks, scale, block, window, sigmoid)
        dq, dk, dv = segment_attention_bwd(
            grad_out, q, k, v, out, lse, cu_q, cu_k, *keysets, *q_blocks, *k_blocks, scale, block, window, sigmoid
        )

    exact = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    expected = segment_attention_reference(
        exact[0], exact[1][:, read], exact[2][:, read], cu_q.cpu(), cu_read, scale, window, top_k, sigmoid
    )
    expected.backward(grad_out.cpu().double())
    return [relative_error(a.cpu(), b) for a, b in zip((out, dq, dk, dv), (expected, *(t.grad for t in exact)))]


RAGGED = ([5, 0, 1, 37, 20, 16], [9, 4, 3, 20, 37, 16])
CASES = {
    "softmax": dict(),
    "local_w1": dict(window=1),
    "local_w5": dict(window=5),
    "local_w33": dict(window=33),
    "top1": dict(top_k=1),
    "top3": dict(top_k=3),
    "top3_ties": dict(top_k=3, ties=True),
    "sigmoid": dict(sigmoid=True),
    "sigmoid_local": dict(sigmoid=True, window=3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ragged_segments_match_the_oracle(case, dtype):
    errors = run_case(*RAGGED, heads=2, head_dim=24, dtype=dtype, **CASES[case])
    assert max(errors) < TOLERANCE[dtype], errors


@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("case", ["local_w5", "top3_ties", "sigmoid_local"])
def test_gpu_block_sizes(case, block):
    """The block sizes a GPU uses (block_rows), on the same ragged segments."""
    errors = run_case(*RAGGED, heads=2, head_dim=24, dtype=torch.float32, block=block, **CASES[case])
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["softmax", "local_w5", "top3", "sigmoid"])
def test_half_precision_inputs(case):
    errors = run_case(*RAGGED, heads=2, head_dim=24, dtype=torch.float16, **CASES[case])
    assert max(errors) < TOLERANCE[torch.float16], errors


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 128])
def test_head_dims(head_dim):
    errors = run_case([17, 3], [5, 30], heads=1, head_dim=head_dim, dtype=torch.float32, window=4)
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.gpu
def test_many_queries_few_keys_leave_empty_windows():
    """N >> M with a window of 1: most queries see no key and must come out as zeros."""
    errors = run_case([40], [3], heads=2, head_dim=16, dtype=torch.float32, window=1)
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["softmax", "local_w5", "top3", "top3_ties"])
def test_shared_key_sets(case):
    """Segments that read one key set (in place, gradients summed over its readers), and
    a key set that no segment reads (zero gradients)."""
    errors = run_case(
        [5, 0, 19, 12], [20, 9, 4], heads=2, head_dim=24, dtype=torch.float32, keyset_of=[0, 1, 0, 0], **CASES[case]
    )
    assert max(errors) < TOLERANCE[torch.float32], errors


def test_threshold_is_the_kth_largest_logit():
    query_lengths, key_lengths = [3, 18], [7, 18]
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 21, 1, 16, generator=generator).to(DEVICE)
    k = torch.randn(1, 25, 1, 16, generator=generator).to(DEVICE)
    keysets = torch.arange(2, dtype=torch.int32, device=DEVICE)
    _, _, selection = segment_topk_attention_fwd(
        q,
        k,
        k,
        cu_seqlens(query_lengths, DEVICE),
        cu_seqlens(key_lengths, DEVICE),
        keysets,
        *blocks(query_lengths, BLOCK),
        0.5,
        BLOCK,
        4,
    )
    threshold = selection_threshold(selection)
    for s, (start_q, start_k) in enumerate([(0, 0), (3, 7)]):
        logits = (
            torch.einsum(
                "qd,kd->qk",
                q[0, start_q : start_q + query_lengths[s], 0].double(),
                k[0, start_k : start_k + key_lengths[s], 0].double(),
            )
            * 0.5
        )
        expected = logits.topk(4, dim=-1).values[:, -1]
        assert torch.allclose(
            threshold[0, 0, start_q : start_q + query_lengths[s]].double().cpu(), expected.cpu(), rtol=1e-5
        )


@pytest.mark.gpu
def test_topk_backward_keeps_the_forward_selection():
    """Keys repeated at several positions (in different key tiles and columns) tie in exact
    arithmetic: float32 dots may round them apart or not, depending on the machine and the
    tile, so the forward keeps k of them or more. The values are one-hot (key m of a key
    set holds e_m), so the forward's output shows the weights of the keys it kept; the
    backward must give the float64 gradients of exactly that selection (with one larger
    key kept as well, so that dQ is not zero)."""
    query_lengths, key_lengths, heads, head_dim, top_k, scale = [21, 30], [40, 35], 2, 64, 3, 0.125
    generator = torch.Generator().manual_seed(5)
    q = torch.rand(2, sum(query_lengths), heads, head_dim, generator=generator) + 0.5
    k = torch.randn(2, sum(key_lengths), heads, head_dim, generator=generator) * 0.3
    repeated = [1, 17, 18, 34, 40 + 3, 40 + 16, 40 + 31]
    k[:, repeated] = torch.rand(heads, head_dim, generator=generator) * 0.2 + 0.3
    largest = [5, 40 + 20]
    k[:, largest] = torch.rand(2, heads, head_dim, generator=generator) * 0.2 + 0.4
    v = torch.zeros_like(k)
    for start, length in ((0, 40), (40, 35)):
        v[:, start : start + length, :, :length] = torch.eye(length)[:, None, :]
    grad_out = torch.randn(2, sum(query_lengths), heads, head_dim, generator=generator)
    keysets = (torch.arange(2, dtype=torch.int32, device=DEVICE),) * 2 + (cu_seqlens([1, 1], DEVICE),)
    inputs = [t.to(DEVICE) for t in (q, k, v, grad_out)]
    cu_q, cu_k = cu_seqlens(query_lengths, DEVICE), cu_seqlens(key_lengths, DEVICE)
    out, lse, selection = segment_topk_attention_fwd(
        *inputs[:3], cu_q, cu_k, keysets[0], *blocks(query_lengths, BLOCK), scale, BLOCK, top_k
    )
    grads = segment_topk_attention_bwd(
        inputs[3],
        *inputs[:3],
        out,
        lse,
        selection,
        cu_q,
        cu_k,
        *keysets,
        *blocks(query_lengths, BLOCK),
        *blocks(key_lengths, BLOCK),
        scale,
        BLOCK,
    )

    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    expected = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        kept = out.cpu()[:, q0:q1, :, : k1 - k0].transpose(1, 2) > 0
        assert (kept.sum(-1) >= top_k).all() and not kept[
            ..., [m for m in range(k1 - k0) if m + k0 not in repeated + largest]
        ].any()
        logits = torch.einsum("bnhd,bmhd->bhnm", exact[0][:, q0:q1], exact[1][:, k0:k1]) * scale
        weights = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1)
        expected.append(torch.einsum("bhnm,bmhd->bnhd", weights, exact[2][:, k0:k1]))
    expected = torch.cat(expected, dim=1)
    expected.backward(grad_out.double())
    errors = [relative_error(a.cpu(), b) for a, b in zip((out, *grads), (expected, *(t.grad for t in exact)))]
    assert max(errors) < TOLERANCE[torch.float32], errors
