"""Linear attention over packed segments: per key set the state ``sum phi(k)^T v`` and
normaliser ``sum phi(k)``, then per query ``phi(q) state / (phi(q) . normaliser + eps)``.

:func:`segment_linear_attention` runs the Triton kernels of
``canvas_engineering.kernels.linear_attention`` (the custom op
``canvas_engineering::linear_attention``, feature map fused) where :func:`use_triton` says
so, else :func:`eager_linear_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from canvas_engineering.ops.backend import HAS_TRITON, use_triton
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
    from canvas_engineering.kernels.operands import dot_width

    keysets, (batch, _, heads, head_dim), value_dim = cu_seqlens_k.shape[0] - 1, q.shape, v.shape[3]
    return (
        q.new_empty(q.shape[:3] + (value_dim,), dtype=v.dtype),
        q.new_empty((batch, heads, keysets, dot_width(head_dim), dot_width(value_dim)), dtype=torch.float32),
        q.new_empty((batch, heads, keysets, dot_width(head_dim)), dtype=torch.float32),
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


def _linear_attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, *tables, eps, relu = inputs
    out, state, normaliser = output
    ctx.save_for_backward(q, k, v, out, state, normaliser, *tables)
    ctx.options = (eps, relu)


def _linear_attention_backward(ctx, grad_out, grad_state, grad_normaliser):
    q, k, v, out, state, normaliser, *tables = ctx.saved_tensors
    dq, dk, dv = _linear_attention_backward_op(
        grad_out.contiguous(), q, k, v, out, state, normaliser, *tables, *ctx.options
    )
    return (dq, dk, dv) + (None,) * (len(tables) + len(ctx.options))


_linear_attention_op.register_autograd(_linear_attention_backward, setup_context=_linear_attention_setup_context)


@dataclass(eq=False)
class LinearAttentionTables:
    """What the kernels need of a :class:`SegmentIndex` (int32): segment offsets ``(S + 1,)``,
    key-set offsets ``(S_k + 1,)``, each segment's key set ``(S,)``, and the query-block table
    (block's segment, its first row) of ``BLOCK_ROWS`` rows per block."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    segment_keyset: torch.Tensor
    block_segment: torch.Tensor
    block_start: torch.Tensor

    @staticmethod
    def build(index: SegmentIndex) -> LinearAttentionTables:
        from canvas_engineering.kernels.linear_attention import BLOCK_ROWS

        return LinearAttentionTables(
            index.int32_table(index.query_offsets),
            index.int32_table(index.keyset_offsets),
            index.int32_table(index.keyset_of),
            *index.block_table(index.query_lengths, BLOCK_ROWS),
        )

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tables in the order the custom ops take them."""
        return (self.cu_seqlens_q, self.cu_seqlens_k, self.segment_keyset, self.block_segment, self.block_start)


_tables = PerIndexCache()


def linear_attention_tables(index: SegmentIndex) -> LinearAttentionTables:
    """The kernels' tables of ``index`` (cached)."""
    return _tables.get(index, lambda: LinearAttentionTables.build(index))


def prepare_linear_attention(index: SegmentIndex) -> None:
    """Build ahead of a forward what :func:`segment_linear_attention` derives from ``index``:
    the kernel tables, where Triton is installed."""
    if HAS_TRITON:
        linear_attention_tables(index)


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
    """
    if use_triton(q) and max(q.shape[-1], v.shape[-1]) <= 128 and index.n_queries:
        tables = linear_attention_tables(index)
        out, _, _ = _linear_attention_op(
            q.contiguous(), k.contiguous(), v.contiguous(), *tables.tensors, float(eps), feature_map == "relu"
        )
        return out
    return eager_linear_attention(q, k, v, index, eps, feature_map)


def eager_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex, eps: float, feature_map: str = "elu"
) -> torch.Tensor:
    """:func:`segment_linear_attention` in eager PyTorch: q ``(B, Tq, H, d)``, k ``(B, Tk, H, d)``,
    v ``(B, Tk, H, e)`` to ``(B, Tq, H, e)``.

    It appends a column of ones to the values, so that one product gives each key set's
    state and normaliser, and one product per query gives numerator and denominator (a
    separate one-column denominator product meets a CPU inductor bug; docs/notes.md).
    """
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
