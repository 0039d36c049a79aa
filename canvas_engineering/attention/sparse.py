"""The sparse and structured family: top-k and local windowed attention."""

from __future__ import annotations

import torch

from canvas_engineering.attention.base import ProjectedAttention
from canvas_engineering.attention.validation import check_positive
from canvas_engineering.ops.segment_attention import prepare_segment_attention, segment_attention
from canvas_engineering.ops.segments import SegmentIndex


class SparseAttention(ProjectedAttention):
    """Top-k attention: in each row, the logits below the k-th largest are dropped before
    the softmax (ties with the k-th largest are kept). k = min(top_k, M).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: accepted for a uniform constructor; not used.
        top_k: the number of logits kept per row (>= 1).
    """

    complexity = "O(NM) time, O(block·M) memory"
    description = "softmax over each row's top-k logits (ties kept)"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, top_k: int = 8):
        super().__init__(d_model, n_heads, dropout)
        check_positive("SparseAttention", top_k=top_k)
        self.top_k = top_k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_attention(q, k, v, index, self.scale, top_k=self.top_k)


class LocalAttention(ProjectedAttention):
    """Windowed attention: query i sees key m when ``|i - floor(m * N / M)| <= window_size // 2``
    (keys are spread over the query positions when M != N). A query whose window holds no
    key gets a zero attention output. Queries run in blocks that read only the keys their
    window can reach, so work and memory grow as N*W when M ~ N.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        window_size: the window W (>= 1).
    """

    complexity = "O(NW)"
    description = "key m in query i's window when |i − ⌊mN/M⌋| ≤ W//2"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, window_size: int = 8):
        super().__init__(d_model, n_heads, dropout)
        check_positive("LocalAttention", window_size=window_size)
        self.window_size = window_size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_attention(q, k, v, index, self.scale, window=self.window_size, dropout_p=self.attention_dropout)

    def prepare(self, index: SegmentIndex) -> None:
        prepare_segment_attention(index, self.head_dim, self.window_size)
