"""Linear attention over packed segments: per key set the state ``sum phi(k)^T v`` and
normaliser ``sum phi(k)``, then per query ``phi(q) state / (phi(q) . normaliser + eps)``.

:func:`segment_linear_attention` runs the Triton kernels of
``canvas_engineering.kernels.linear_attention`` (the custom op
``canvas_engineering::linear_attention``, feature map fused) where :func:`use_triton` says
so, else the eager version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from canvas_engineering.ops.backend import use_triton
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex


class _EluPlusOne(torch.autograd.Function):
    """``elu(x) + 1``, whose derivative is ``min(elu(x) + 1, 1)`` (1 where x > 0, else
    ``exp(x)``, the output itself): the backward reads the saved output, with no second
    exponential (ATen's ``elu_backward`` takes several times as long). The gradient comes
    laid out by the products it left (heads outermost); it is made row-major first, as an
    elementwise product of two layouts runs several times slower."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        output = F.elu(x).add_(1.0)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        return grad_output.contiguous() * output.clamp(max=1.0)


FEATURE_MAPS = {"elu": _EluPlusOne.apply, "relu": torch.relu}
"""The feature maps phi: elu + 1 (the default) and relu."""


@torch.library.custom_op("canvas_engineering::linear_attention", mutates_args=())
def _linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, state, normaliser) of the Triton linear attention."""
    from canvas_engineering.kernels.linear_attention import linear_attention_fwd

    return linear_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, segment_keyset, block_segment, block_start, eps, relu
    )


@_linear_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, segment_keyset, block_segment, block_start, eps, relu):
    from canvas_engineering.kernels.linear_attention import _pad

    keysets, (batch, _, heads, head_dim), value_dim = cu_seqlens_k.shape[0] - 1, q.shape, v.shape[3]
    return (
        q.new_empty(q.shape[:3] + (value_dim,), dtype=v.dtype),
        q.new_empty((batch, heads, keysets, _pad(head_dim), _pad(value_dim)), dtype=torch.float32),
        q.new_empty((batch, heads, keysets, _pad(head_dim)), dtype=torch.float32),
    )


@torch.library.custom_op("canvas_engineering::linear_attention_backward", mutates_args=())
def _linear_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    state: torch.Tensor,
    normaliser: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the Triton linear attention."""
    from canvas_engineering.kernels.linear_attention import linear_attention_bwd

    return linear_attention_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        state,
        normaliser,
        cu_seqlens_q,
        cu_seqlens_k,
        segment_keyset,
        block_segment,
        block_start,
        eps,
        relu,
    )


@_linear_attention_backward_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    state,
    normaliser,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    block_segment,
    block_start,
    eps,
    relu,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *tables, eps, relu = inputs
    out, state, normaliser = output
    ctx.save_for_backward(q, k, v, out, state, normaliser, *tables)
    ctx.options = (eps, relu)


def _backward(ctx, grad_out, grad_state, grad_normaliser):
    q, k, v, out, state, normaliser, *tables = ctx.saved_tensors
    dq, dk, dv = _linear_attention_backward_op(
        grad_out.contiguous(), q, k, v, out, state, normaliser, *tables, *ctx.options
    )
    return (dq, dk, dv) + (None,) * 7


_linear_attention_op.register_autograd(_backward, setup_context=_setup_context)
_tables = PerIndexCache()


def prepare_linear_attention(index: SegmentIndex):
    """The kernels' tables of ``index`` (offsets, key set per segment, query blocks), built once."""
    return _tables.get(index, lambda: _kernel_tables(index))


def _kernel_tables(index: SegmentIndex):
    from canvas_engineering.kernels.linear_attention import BLOCK_ROWS

    device = index.query_segment.device
    query_lengths = [n for n, _ in index.shapes]
    offsets = lambda values: torch.tensor(
        [0] + [sum(values[: i + 1]) for i in range(len(values))], dtype=torch.int32, device=device
    )
    pairs = [(s, start) for s, n in enumerate(query_lengths) for start in range(0, n, BLOCK_ROWS)]
    return (
        offsets(query_lengths),
        offsets(list(index.keyset_sizes)),
        index.segment_keyset.to(torch.int32),
        torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device),
        torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device),
    )


def segment_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex, eps: float, feature_map: str = "elu"
) -> torch.Tensor:
    """Linear attention of each query over its key set.

    Args:
        q: ``(B, Tq, H, d)`` packed queries; k: ``(B, Tk, H, d)`` packed keys; v: ``(B, Tk, H, e)``.
        index: the segments.
        eps: added to the normaliser.
        feature_map: ``"elu"`` (phi = elu + 1) or ``"relu"``.

    Returns:
        ``(B, Tq, H, e)``. O(Tq + Tk) time, O(S_k * H * d * e) state.

    The eager version appends a column of ones to the values, so that one product gives each
    key set's state and normaliser, and one product per query gives numerator and denominator
    (a separate one-column denominator product meets a CPU inductor bug; docs/notes.md).
    """
    if use_triton(q) and max(q.shape[-1], v.shape[-1]) <= 128 and index.n_queries:
        tables = prepare_linear_attention(index)
        out, _, _ = _linear_attention_op(
            q.contiguous(), k.contiguous(), v.contiguous(), *tables, float(eps), feature_map == "relu"
        )
        return out
    phi_q, phi_k = FEATURE_MAPS[feature_map](q), FEATURE_MAPS[feature_map](k)
    states = []
    for bucket in index.keyset_buckets:
        keys = bucket.keys.gather(phi_k, zero_padding=True)
        values_and_ones = F.pad(bucket.keys.gather(v), (0, 1), value=1.0)
        states.append(torch.einsum("bnlhd,bnlhe->bnhde", keys, values_and_ones))
    order = torch.cat([bucket.members for bucket in index.keyset_buckets]).argsort()
    state = torch.cat(states, dim=1)[:, order]
    batches = []
    for bucket in index.segment_buckets:
        queries = bucket.queries.gather(phi_q)
        numerator_and_denominator = torch.einsum(
            "bnqhd,bnhde->bnqhe", queries, state[:, index.segment_keyset[bucket.members]]
        )
        numerator, denominator = numerator_and_denominator.split([v.shape[-1], 1], dim=-1)
        batches.append(numerator * (denominator + eps).reciprocal())
    return index.assemble_queries(batches)
