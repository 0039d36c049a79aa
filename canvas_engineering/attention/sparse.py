"""The sparse and structured family: top-k and local windowed attention."""

from __future__ import annotations

import torch

from canvas_engineering.attention.dot_product import ProjectedAttention
from canvas_engineering.attention.validation import check_positive


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept logits of each row.

    Args:
        logits: ``(B, H, N, M)``.
        keep: boolean, broadcastable to ``logits``; False entries get zero weight.

    Returns:
        weights ``(B, H, N, M)``; a row that keeps no key is all zeros (not NaN).
    """
    masked = logits.masked_fill(~keep, float("-inf"))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(masked - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def window_keep(n_queries: int, n_keys: int, window_size: int, device: torch.device) -> torch.Tensor:
    """The local window as a boolean ``(N, M)`` matrix.

    Key m is placed at query position ``floor(m * N / M)`` and is in query i's window when
    ``|i - floor(m * N / M)| <= window_size // 2``.
    """
    query_pos = torch.arange(n_queries, device=device).unsqueeze(1)
    key_pos = torch.div(torch.arange(n_keys, device=device) * n_queries, max(n_keys, 1), rounding_mode="floor")
    return (query_pos - key_pos.unsqueeze(0)).abs() <= window_size // 2


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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        logits = q @ k.transpose(-2, -1) * self.scale
        kept = min(self.top_k, logits.shape[-1])
        if kept == 0:
            return self.merge_heads(q.new_zeros(q.shape))
        threshold = logits.topk(kept, dim=-1).values[..., -1:]
        return self.merge_heads(masked_softmax(logits, logits >= threshold) @ v)


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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        keep = window_keep(q.shape[-2], k.shape[-2], self.window_size, q.device)
        logits = q @ k.transpose(-2, -1) * self.scale
        return self.merge_heads(self.dropout(masked_softmax(logits, keep)) @ v)
