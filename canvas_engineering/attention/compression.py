"""The compression family: perceiver latents, mean pooling and direct copy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from canvas_engineering.attention.dot_product import CrossAttention
from canvas_engineering.attention.validation import check_positive, check_qkv


class PerceiverAttention(nn.Module):
    """Read dst through ``n_latents`` learned latents: the latents cross-attend to dst
    (``compress``), then the queries cross-attend to the latents (``readout``). O(N*K + M*K).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        n_latents: number of latents K (>= 1).
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, n_latents: int = 8):
        super().__init__()
        check_positive("PerceiverAttention", n_latents=n_latents)
        self.latents = nn.Parameter(torch.randn(1, n_latents, d_model) * 0.02)
        self.compress = CrossAttention(d_model, n_heads, dropout)
        self.readout = CrossAttention(d_model, n_heads, dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        latents = self.latents.expand(queries.shape[0], -1, -1)
        compressed = self.compress(latents, keys, values)
        return self.readout(queries, compressed, compressed)


class PoolingAttention(nn.Module):
    """Mean of the values, projected, broadcast to every query. O(N + M).

    Args:
        d_model: model width. ``n_heads`` and ``dropout`` are accepted for a uniform
            constructor and not used.
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        check_positive("PoolingAttention", d_model=d_model)
        self.d_model = d_model
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, values ``(B, M, d_model)``, M >= 1 -> ``(B, N, d_model)``."""
        check_qkv("PoolingAttention", queries, keys, values, self.d_model)
        return self.proj(values.mean(dim=1, keepdim=True)).expand_as(queries)


class CopyAttention(nn.Module):
    """The first N value rows, zero-padded when M < N. No parameters. O(N).

    ``d_model``, ``n_heads`` and ``dropout`` are accepted for a uniform constructor.
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        check_qkv("CopyAttention", queries, keys, values, self.d_model)
        n_queries = queries.shape[1]
        return F.pad(values[:, :n_queries], (0, 0, 0, max(0, n_queries - values.shape[1])))
