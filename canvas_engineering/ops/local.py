"""Local windowed attention over packed segments, in query blocks: O(N * W) work and memory.

In a segment of N queries and M keys, key m sits at query position ``floor(m * N / M)`` and
is in query i's window when ``|i - floor(m * N / M)| <= W // 2``. The keys a block of
queries ``[i0, i1)`` can see form one contiguous range, found in closed form; each block
reads only that range (padded to the widest range of its bucket).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from canvas_engineering.ops.segments import PerIndexCache, SegmentBucket, SegmentIndex, length_class


def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def window_keep(
    query_pos: torch.Tensor, key_pos: torch.Tensor, n_queries: torch.Tensor, n_keys: torch.Tensor, window_size: int
) -> torch.Tensor:
    """Whether key ``key_pos`` is in the window of query ``query_pos`` (all broadcast together)
    in a segment of ``n_queries`` queries and ``n_keys`` keys."""
    placed = torch.div(key_pos * n_queries, n_keys.clamp(min=1), rounding_mode="floor")
    return (query_pos - placed).abs() <= window_size // 2


@dataclass(eq=False)
class BlockedWindows:
    """The key ranges of one bucket's query blocks.

    Attributes:
        block: queries per block; n_blocks: blocks per member; width: keys read per block.
        key_slot: ``(n, n_blocks, width)`` key slot (within the member's key set) per block and column.
        keep: ``(n, n_blocks, block, width)`` whether each query of a block sees each column's key
            (inside the block's range and the query's window).
        member: ``(n, 1, 1)`` the member of each row of ``key_slot``, for gathering.
    """

    block: int
    n_blocks: int
    width: int
    key_slot: torch.Tensor
    keep: torch.Tensor
    member: torch.Tensor

    @staticmethod
    def build(bucket: SegmentBucket, window_size: int) -> BlockedWindows:
        block = min(64, max(16, length_class(window_size)))
        n_blocks = max(1, -(-bucket.queries.width // block))
        n_queries = bucket.queries.lengths.view(-1, 1)
        n_keys = bucket.keys.lengths.view(-1, 1)
        starts = torch.arange(n_blocks, device=n_queries.device).view(1, -1) * block
        first = (starts - window_size // 2).clamp(min=0)
        last = starts + block - 1 + window_size // 2
        low = _ceil_div(first * n_keys, n_queries.clamp(min=1)).clamp(max=n_keys)
        high = _ceil_div((last + 1) * n_keys, n_queries.clamp(min=1)).clamp(max=n_keys)
        width = max(1, int((high - low).max())) if bucket.keys.width else 0
        columns = torch.arange(width, device=n_queries.device).view(1, 1, -1)
        key_slot = low.unsqueeze(-1) + columns
        query_pos = (starts.view(-1, 1) + torch.arange(block, device=starts.device)).view(1, n_blocks, block, 1)
        keep = window_keep(
            query_pos, key_slot.unsqueeze(2), n_queries.view(-1, 1, 1, 1), n_keys.view(-1, 1, 1, 1), window_size
        )
        keep = keep & (key_slot < high.unsqueeze(-1)).unsqueeze(2)
        member = torch.arange(key_slot.shape[0], device=starts.device).view(-1, 1, 1)
        return BlockedWindows(block, n_blocks, width, key_slot.clamp(max=max(bucket.keys.width - 1, 0)), keep, member)


_windows = PerIndexCache()


def blocked_windows(index: SegmentIndex, window_size: int) -> list[BlockedWindows]:
    """The blocked key ranges of every segment bucket of ``index`` (cached per index and window)."""
    by_window = _windows.get(index, dict)
    if window_size not in by_window:
        by_window[window_size] = [BlockedWindows.build(bucket, window_size) for bucket in index.segment_buckets]
    return by_window[window_size]


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


def segment_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SegmentIndex,
    scale: float | torch.Tensor,
    window_size: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of each query over the keys in its window; a query whose window
    holds no key gets zeros.

    Args:
        q: ``(B, Tq, H, d)`` packed query rows; k, v: ``(B, Tk, H, d)`` packed key rows.
        index: the segments.
        scale: multiplies the logits.
        window_size: W.
        dropout_p: dropout on the attention weights.

    Returns:
        ``(B, Tq, H, d)``.
    """
    batches = []
    for bucket, blocks in zip(index.segment_buckets, blocked_windows(index, window_size)):
        queries = bucket.queries.gather(q)
        width = queries.shape[2]
        if blocks.width == 0:
            batches.append(queries.new_zeros(queries.shape[:-1] + v.shape[-1:]))
            continue
        padded_width = blocks.n_blocks * blocks.block
        queries = F.pad(queries, (0, 0, 0, 0, 0, padded_width - width)).unflatten(2, (blocks.n_blocks, blocks.block))
        keys = bucket.keys.gather(k)[:, blocks.member, blocks.key_slot]
        values = bucket.keys.gather(v)[:, blocks.member, blocks.key_slot]
        logits = torch.einsum("bnjqhd,bnjkhd->bnhjqk", queries, keys) * scale
        weights = masked_softmax(logits, blocks.keep.unsqueeze(1))
        if dropout_p:
            weights = F.dropout(weights, dropout_p)
        attended = torch.einsum("bnhjqk,bnjkhd->bnjqhd", weights, values).flatten(2, 3)[:, :, :width]
        batches.append(attended)
    return index.assemble_queries(batches)
