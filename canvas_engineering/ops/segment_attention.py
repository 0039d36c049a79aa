"""Attention over packed segments: softmax (plain, windowed or top-k) and sigmoid gating.

Queries ``q (B, Tq, H, d)`` are the packed query rows of a :class:`SegmentIndex`; keys and
values ``(B, Tk, H, d)`` its packed key rows. Each query attends only to the keys of its
own segment's key set. Outputs are ``(B, Tq, H, d)``.

:func:`segment_attention` is the entry point. It runs the Triton kernels of
``canvas_engineering.kernels.segment_attention`` (through the custom op
``canvas_engineering::segment_attention``) where :func:`use_triton` says so, for head dims up
to 128 and without attention dropout; otherwise :func:`eager_segment_attention`, whose
versions pad segments of similar length into batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from canvas_engineering.ops.backend import HAS_TRITON, use_triton
from canvas_engineering.ops.local import blocked_windows, masked_softmax, segment_local_attention
from canvas_engineering.ops.segments import PerIndexCache, SegmentBucket, SegmentIndex, offsets

KeySelector = Callable[[SegmentBucket, torch.Tensor], torch.Tensor]
"""(bucket, logits (B, n, H, Lq, Lk) with padding at -inf) -> bool keep mask, broadcastable."""


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: float | torch.Tensor,
    *,
    window: int = 0,
    top_k: int = 0,
    sigmoid: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of each query over its key set.

    Args:
        q: ``(B, Tq, H, d)``; k, v: ``(B, Tk, H, d)``.
        index: the segments.
        scale: multiplies the logits (a tensor, e.g. a learned temperature, is allowed).
        window: if > 0, query i sees key m only when ``|i - floor(m N / M)| <= window // 2``.
        top_k: if > 0, a query sees only the keys whose logit is ``>=`` its k-th largest.
        sigmoid: ``sigmoid(logit)`` weights, not normalised, instead of a softmax.
        dropout_p: dropout on the attention weights (eager only).

    Returns:
        ``(B, Tq, H, d)``; a query that sees no key gets zeros.

    Raises:
        ValueError: for ``sigmoid`` combined with ``window`` or ``top_k``, or ``window``
            with ``top_k`` (no type uses them, and the eager versions do not implement them).
    """
    if sigmoid and (window or top_k):
        raise ValueError(f"segment_attention: sigmoid weights with window={window} or top_k={top_k} is not supported")
    if window and top_k:
        raise ValueError(f"segment_attention: a window ({window}) and top_k ({top_k}) together are not supported")
    if use_triton(q) and q.shape[-1] <= 128 and dropout_p == 0.0:
        return _triton_segment_attention(q, k, v, index, scale, window, top_k, sigmoid)
    return eager_segment_attention(q, k, v, index, scale, window, top_k, sigmoid, dropout_p)


def eager_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: float | torch.Tensor,
    window: int = 0,
    top_k: int = 0,
    sigmoid: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """:func:`segment_attention` in eager PyTorch: q ``(B, Tq, H, d)``, k, v ``(B, Tk, H, d)``
    to ``(B, Tq, H, d)``, by the version its options call for (with ``sigmoid``, ``window``
    and ``top_k`` not combined)."""
    if sigmoid:
        return segment_masked_attention(q, k, v, index, scale, dropout_p=dropout_p, sigmoid=True)
    if window:
        return segment_local_attention(q, k, v, index, scale, window, dropout_p)
    if top_k:
        return segment_masked_attention(q, k, v, index, scale, select=keep_top_k(top_k), dropout_p=dropout_p)
    if isinstance(scale, torch.Tensor):
        return segment_masked_attention(q, k, v, index, scale, dropout_p=dropout_p)
    return segment_softmax_attention(q, k, v, index, scale, dropout_p)


def keep_top_k(top_k: int) -> KeySelector:
    """A selector keeping each row's logits ``>=`` its k-th largest, k = min(top_k, M_s)."""

    def select(bucket: SegmentBucket, logits: torch.Tensor) -> torch.Tensor:
        largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values
        kth = (bucket.keys.lengths.clamp(max=top_k) - 1).view(1, -1, 1, 1, 1)
        threshold = largest.gather(-1, kth.expand(largest.shape[:-1] + (1,)))
        return logits >= threshold

    return select


@dataclass(eq=False)
class SegmentAttentionTables:
    """What the kernels need of a :class:`SegmentIndex` (int32): segment offsets ``(S + 1,)``,
    key-set offsets into the packed key rows (read in place) ``(S_k + 1,)``, each segment's
    key set ``(S,)``, the segments grouped by key set ``(S,)`` with the groups' offsets
    ``(S_k + 1,)``, and the query- and key-block tables (block's segment or key set, its first
    row) of ``block`` rows per block."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    segment_keyset: torch.Tensor
    keyset_segments: torch.Tensor
    cu_keyset_segments: torch.Tensor
    q_block_segment: torch.Tensor
    q_block_start: torch.Tensor
    k_block_keyset: torch.Tensor
    k_block_start: torch.Tensor
    block: int

    @staticmethod
    def build(index: SegmentIndex, block: int) -> SegmentAttentionTables:
        readers = [
            [s for s, keyset in enumerate(index.keyset_of) if keyset == j] for j in range(len(index.keyset_sizes))
        ]
        return SegmentAttentionTables(
            index.int32_table(index.query_offsets),
            index.int32_table(index.keyset_offsets),
            index.int32_table(index.keyset_of),
            index.int32_table(s for segments in readers for s in segments),
            index.int32_table(offsets(len(segments) for segments in readers)),
            *index.block_table(index.query_lengths, block),
            *index.block_table(index.keyset_sizes, block),
            block,
        )

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tables in the order the custom ops take them."""
        return (
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.segment_keyset,
            self.keyset_segments,
            self.cu_keyset_segments,
            self.q_block_segment,
            self.q_block_start,
            self.k_block_keyset,
            self.k_block_start,
        )


@torch.library.custom_op("canvas_engineering::segment_attention", mutates_args=())
def _segment_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    keyset_segments: torch.Tensor,
    cu_keyset_segments: torch.Tensor,
    q_block_segment: torch.Tensor,
    q_block_start: torch.Tensor,
    k_block_keyset: torch.Tensor,
    k_block_start: torch.Tensor,
    scale: float,
    block: int,
    window: int,
    top_k: int,
    sigmoid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, selection) of the Triton forward; the selection record (the kept keys of
    each row, see ``segment_topk_attention_fwd``) is empty unless top_k > 0."""
    from canvas_engineering.kernels.segment_attention import segment_attention_fwd, segment_topk_attention_fwd

    if top_k:
        return segment_topk_attention_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, segment_keyset, q_block_segment, q_block_start, scale, block, top_k
        )
    out, lse = segment_attention_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        segment_keyset,
        q_block_segment,
        q_block_start,
        scale,
        block,
        window,
        sigmoid,
    )
    if sigmoid:
        lse.zero_()  # sigmoid weights have no log-sum-exp: the kernel leaves it unwritten
    return out, lse, lse.new_empty(0, dtype=torch.int32)


@_segment_attention_op.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    keyset_segments,
    cu_keyset_segments,
    q_block_segment,
    q_block_start,
    k_block_keyset,
    k_block_start,
    scale,
    block,
    window,
    top_k,
    sigmoid,
):
    from canvas_engineering.kernels.segment_attention import top_slots

    statistics = (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(statistics, dtype=torch.float32)
    selection = q.new_empty(statistics + (top_slots(top_k) + 2,) if top_k else (0,), dtype=torch.int32)
    return torch.empty_like(q), lse, selection


@torch.library.custom_op("canvas_engineering::segment_attention_backward", mutates_args=())
def _segment_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    keyset_segments: torch.Tensor,
    cu_keyset_segments: torch.Tensor,
    q_block_segment: torch.Tensor,
    q_block_start: torch.Tensor,
    k_block_keyset: torch.Tensor,
    k_block_start: torch.Tensor,
    scale: float,
    block: int,
    window: int,
    top_k: int,
    sigmoid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the Triton backward (top-k: from the forward's saved selection)."""
    from canvas_engineering.kernels.segment_attention import segment_attention_bwd, segment_topk_attention_bwd

    tables = (
        cu_seqlens_q,
        cu_seqlens_k,
        segment_keyset,
        keyset_segments,
        cu_keyset_segments,
        q_block_segment,
        q_block_start,
        k_block_keyset,
        k_block_start,
    )
    if top_k:
        return segment_topk_attention_bwd(grad_out, q, k, v, out, lse, selection, *tables, scale, block)
    return segment_attention_bwd(grad_out, q, k, v, out, lse, *tables, scale, block, window, sigmoid)


@_segment_attention_backward_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    selection,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    keyset_segments,
    cu_keyset_segments,
    q_block_segment,
    q_block_start,
    k_block_keyset,
    k_block_start,
    scale,
    block,
    window,
    top_k,
    sigmoid,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _segment_attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, *tables, scale, block, window, top_k, sigmoid = inputs
    out, lse, selection = output
    ctx.save_for_backward(q, k, v, out, lse, selection, *tables)
    ctx.options = (scale, block, window, top_k, sigmoid)


def _segment_attention_backward(ctx, grad_out, grad_lse, grad_selection):
    q, k, v, out, lse, selection, *tables = ctx.saved_tensors
    dq, dk, dv = _segment_attention_backward_op(
        grad_out.contiguous(), q, k, v, out, lse, selection, *tables, *ctx.options
    )
    return (dq, dk, dv) + (None,) * (len(tables) + len(ctx.options))


_segment_attention_op.register_autograd(_segment_attention_backward, setup_context=_segment_attention_setup_context)


_tables = PerIndexCache()


def segment_attention_tables(index: SegmentIndex, head_dim: int, dtype: torch.dtype) -> SegmentAttentionTables:
    """The kernels' tables for ``index`` at the block size its device uses for inputs of
    ``dtype`` (cached)."""
    from canvas_engineering.kernels.segment_attention import block_rows

    block = block_rows(head_dim, index.query_segment.device, dtype)
    by_block = _tables.get(index, dict)
    if block not in by_block:
        by_block[block] = SegmentAttentionTables.build(index, block)
    return by_block[block]


def prepare_segment_attention(index: SegmentIndex, head_dim: int, window: int = 0) -> None:
    """Build ahead of a forward what :func:`segment_attention` derives from ``index``: the
    eager version's windows, and where Triton is installed the kernel tables at the block
    sizes of half-precision and float32 inputs."""
    if window:
        blocked_windows(index, window)
    if HAS_TRITON and head_dim <= 128:
        for dtype in (torch.bfloat16, torch.float32):
            segment_attention_tables(index, head_dim, dtype)


def _triton_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: float | torch.Tensor,
    window: int,
    top_k: int,
    sigmoid: bool,
) -> torch.Tensor:
    tables = segment_attention_tables(index, q.shape[-1], q.dtype)
    block = tables.block
    if isinstance(scale, torch.Tensor):
        q, scale = q * scale, 1.0
    out, _, _ = _segment_attention_op(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        *tables.tensors,
        float(scale),
        block,
        int(window),
        int(top_k),
        bool(sigmoid),
    )
    return out


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: SegmentBucket):
    return bucket.queries.gather(q), bucket.keys.gather(k), bucket.keys.gather(v)


def segment_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax attention of each query over its key set (scaled dot product).

    Queries whose key set is empty get zeros.
    """
    batches = []
    for bucket in index.segment_buckets:
        qp, kp, vp = _padded(q, k, v, bucket)
        fold = lambda t: t.flatten(0, 1).transpose(1, 2)  # (B*n, H, L, d)
        mask = None
        if bucket.keys.padded:
            mask = bucket.keys.valid[:, None, None, :].repeat(q.shape[0], 1, 1, 1)
        attended = F.scaled_dot_product_attention(
            fold(qp), fold(kp), fold(vp), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        batches.append(attended.transpose(1, 2).unflatten(0, qp.shape[:2]))
    return index.assemble_queries(batches)


SCORE_BUDGET = 1 << 22
"""Most score elements (batch x members x heads x rows x keys) the eager masked attention
holds at once; larger buckets run in row chunks, each recomputed in the backward pass."""


def segment_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: float | torch.Tensor,
    select: KeySelector | None = None,
    dropout_p: float = 0.0,
    sigmoid: bool = False,
) -> torch.Tensor:
    """Softmax attention over the keys that ``select`` keeps (all keys when None); with
    ``sigmoid``, the weights are ``sigmoid(logit)`` of the kept keys, not normalised.

    The logits ``q . k * scale`` are formed per bucket, in chunks of rows that keep at most
    :data:`SCORE_BUDGET` scores alive (checkpointed, so the backward pass holds no more);
    a query that keeps no key gets zeros (not NaN). ``dropout_p`` applies to the weights.
    """

    def attend(bucket: SegmentBucket, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bnqhd,bnkhd->bnhqk", queries, keys) * scale
        keep = bucket.keys.valid[None, :, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        if select is not None:
            keep = keep & select(bucket, logits)
        weights = torch.sigmoid(logits) * keep.to(logits.dtype) if sigmoid else masked_softmax(logits, keep)
        if dropout_p:
            weights = F.dropout(weights, dropout_p)
        return torch.einsum("bnhqk,bnkhd->bnqhd", weights, values)

    batches = []
    for bucket in index.segment_buckets:
        qp, kp, vp = _padded(q, k, v, bucket)
        if kp.shape[2] == 0:
            batches.append(qp.new_zeros(qp.shape[:-1] + vp.shape[-1:]))
            continue
        per_row = max(1, qp.shape[0] * qp.shape[1] * qp.shape[3] * kp.shape[2])
        rows = max(1, SCORE_BUDGET // per_row)
        if rows >= qp.shape[2]:
            batches.append(attend(bucket, qp, kp, vp))
            continue
        chunks = [
            checkpoint(attend, bucket, qp[:, :, start : start + rows], kp, vp, use_reentrant=False)
            for start in range(0, qp.shape[2], rows)
        ]
        batches.append(torch.cat(chunks, dim=2))
    return index.assemble_queries(batches)
