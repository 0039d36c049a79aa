"""The sparse and structured family: top-k and local windowed attention."""

from __future__ import annotations

import torch

from canvas_engineering.attention.dot_product import ProjectedAttention
from canvas_engineering.attention.validation import check_positive
from canvas_engineering.ops.segment_attention import segment_masked_attention
from canvas_engineering.ops.segments import SegmentBucket, SegmentIndex


def window_keep(query_lengths: torch.Tensor, key_lengths: torch.Tensor, n_queries: int, n_keys: int, window_size: int) -> torch.Tensor:
    """The local window of sequences of ``(N_s, M_s)`` laid out ``n_queries x n_keys`` (padded).

    Key m is placed at query position ``floor(m * N_s / M_s)`` and is in query i's window
    when ``|i - floor(m * N_s / M_s)| <= window_size // 2``.

    Returns:
        bool ``(n, n_queries, n_keys)``.
    """
    device = query_lengths.device
    query_pos = torch.arange(n_queries, device=device).view(1, -1, 1)
    key_pos = torch.div(
        torch.arange(n_keys, device=device).view(1, -1) * query_lengths.view(-1, 1),
        key_lengths.clamp(min=1).view(-1, 1),
        rounding_mode="floor",
    )
    return (query_pos - key_pos.unsqueeze(1)).abs() <= window_size // 2


class SparseAttention(ProjectedAttention):
    """Top-k attention: in each row, the logits below the k-th largest are dropped before
    the softmax (ties with the k-th largest are kept). k = min(top_k, M).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: accepted for a uniform constructor; not used.
        top_k: the number of logits kept per row (>= 1).
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, top_k: int = 8):
        super().__init__(d_model, n_heads, dropout)
        check_positive("SparseAttention", top_k=top_k)
        self.top_k = top_k

    def _keep_top_k(self, bucket: SegmentBucket, logits: torch.Tensor) -> torch.Tensor:
        """Keep each row's logits >= its k-th largest, k = min(top_k, M_s)."""
        largest = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values
        kth = (bucket.keys.lengths.clamp(max=self.top_k) - 1).view(1, -1, 1, 1, 1)
        threshold = largest.gather(-1, kth.expand(largest.shape[:-1] + (1,)))
        return logits >= threshold

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_masked_attention(q, k, v, index, self.scale, select=self._keep_top_k)


class LocalAttention(ProjectedAttention):
    """Windowed attention: query i sees key m when ``|i - floor(m * N / M)| <= window_size // 2``
    (keys are spread over the query positions when M != N). A query whose window holds no
    key gets a zero attention output. O(N*W).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        window_size: the window W (>= 1).
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, window_size: int = 8):
        super().__init__(d_model, n_heads, dropout)
        check_positive("LocalAttention", window_size=window_size)
        self.window_size = window_size

    def _keep_window(self, bucket: SegmentBucket, logits: torch.Tensor) -> torch.Tensor:
        keep = window_keep(bucket.queries.lengths, bucket.keys.lengths, logits.shape[-2], logits.shape[-1], self.window_size)
        return keep.unsqueeze(0).unsqueeze(2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_masked_attention(q, k, v, index, self.scale, select=self._keep_window, dropout=self.dropout)
