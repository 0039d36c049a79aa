"""Attention over packed segments: softmax (optionally masked), and sigmoid gating.

Queries ``q (B, Tq, H, d)`` are the packed query rows of a :class:`SegmentIndex`; keys and
values ``(B, Tk, H, d)`` its packed key rows. Each query attends only to the keys of its
own segment's key set. Outputs are ``(B, Tq, H, d_v)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from canvas_engineering.ops.segments import SegmentBucket, SegmentIndex

KeySelector = Callable[[SegmentBucket, torch.Tensor], torch.Tensor]
"""(bucket, logits (B, n, H, Lq, Lk) with padding at -inf) -> bool keep mask, broadcastable."""


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
        fold = lambda t: t.flatten(0, 1).transpose(1, 2)  # noqa: E731  (B*n, H, L, d)
        mask = None
        if bucket.keys.padded:
            mask = bucket.keys.valid[:, None, None, :].repeat(q.shape[0], 1, 1, 1)
        attended = F.scaled_dot_product_attention(fold(qp), fold(kp), fold(vp), attn_mask=mask, dropout_p=dropout_p, scale=scale)
        batches.append(attended.transpose(1, 2).unflatten(0, qp.shape[:2]))
    return index.assemble_queries(batches)


def segment_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: Union[float, torch.Tensor],
    select: Optional[KeySelector] = None,
    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Softmax attention over the keys that ``select`` keeps (all keys when None).

    The logits ``q . k * scale`` are formed per bucket; a query that keeps no key gets zeros
    (not NaN). ``dropout`` applies to the attention weights.
    """
    batches = []
    for bucket in index.segment_buckets:
        qp, kp, vp = _padded(q, k, v, bucket)
        if kp.shape[2] == 0:
            batches.append(qp.new_zeros(qp.shape[:-1] + vp.shape[-1:]))
            continue
        logits = torch.einsum("bnqhd,bnkhd->bnhqk", qp, kp) * scale
        keep = bucket.keys.valid[None, :, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        if select is not None:
            keep = keep & select(bucket, logits)
        weights = masked_softmax(logits, keep)
        if dropout is not None:
            weights = dropout(weights)
        batches.append(torch.einsum("bnhqk,bnkhd->bnqhd", weights, vp))
    return index.assemble_queries(batches)


def segment_sigmoid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex, scale: float,
    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """``sigmoid(q . k * scale)`` weights (no normalisation) over each query's key set."""
    batches = []
    for bucket in index.segment_buckets:
        qp, kp, vp = _padded(q, k, v, bucket)
        gates = torch.sigmoid(torch.einsum("bnqhd,bnkhd->bnhqk", qp, kp) * scale)
        if bucket.keys.padded:
            gates = gates * bucket.keys.valid[None, :, None, None, :].to(gates.dtype)
        if dropout is not None:
            gates = dropout(gates)
        batches.append(torch.einsum("bnhqk,bnkhd->bnqhd", gates, vp))
    return index.assemble_queries(batches)


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept entries of the last axis; rows that keep nothing are zeros.

    Args:
        logits: ``(..., M)``.
        keep: bool, broadcastable to ``logits``.
    """
    masked = logits.masked_fill(~keep, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(masked - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))
