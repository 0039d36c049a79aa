"""The dot-product family: cross (softmax), linear, cosine and sigmoid attention.

Every module here maps ``queries (B, N, d_model)``, ``keys (B, M, d_model)`` and
``values (B, M, d_model)`` to ``(B, N, d_model)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from canvas_engineering.attention.validation import check_heads, check_qkv


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax attention over all keys.

    Args:
        q: ``(B, H, N, d)``; k, v: ``(B, H, M, d)``.
        scale: multiplies the logits ``q @ k^T``.
        dropout_p: dropout on the attention weights.

    Returns:
        ``(B, H, N, d)``; rows are zero when ``M == 0``.
    """
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


class ProjectedAttention(nn.Module):
    """Shared parts of the multi-head types: the q/k/v/out projections and the head split.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights (types that use it).
    """

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        check_heads(type(self).__name__, d_model, n_heads)
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    @property
    def attention_dropout(self) -> float:
        """The dropout probability in force now (0 in eval mode)."""
        return self.dropout.p if self.training else 0.0

    def project_heads(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split heads: ``(B, N|M, d_model)`` to ``(B, H, N|M, head_dim)`` each."""
        check_qkv(type(self).__name__, queries, keys, values, self.d_model)
        split = "b n (h d) -> b h n d"
        q = rearrange(self.q_proj(queries), split, h=self.n_heads)
        k = rearrange(self.k_proj(keys), split, h=self.n_heads)
        v = rearrange(self.v_proj(values), split, h=self.n_heads)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, head_dim)`` to the projected output ``(B, N, d_model)``."""
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(ProjectedAttention):
    """Standard multi-head scaled dot-product attention with softmax. O(N*M)."""

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        return self.merge_heads(softmax_attention(q, k, v, self.scale, self.attention_dropout))


class LinearAttention(ProjectedAttention):
    """Linear attention with the feature map phi(x) = elu(x) + 1. O(N + M).

    ``out = phi(q) (phi(k)^T v) / (phi(q) . sum_m phi(k_m) + 1e-6)``, per head.
    """

    eps = 1e-6

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        state = torch.einsum("bhmd,bhme->bhde", k, v)
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=-2)).unsqueeze(-1)
        return self.merge_heads(torch.einsum("bhnd,bhde->bhne", q, state) / (normaliser + self.eps))


class CosineAttention(ProjectedAttention):
    """Softmax over cosine similarities of queries and keys, times a learned temperature
    (initialised to 10). O(N*M)."""

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__(d_model, n_heads, dropout)
        self.temperature = nn.Parameter(torch.tensor(10.0))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        similarity = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        weights = self.dropout(F.softmax(similarity * self.temperature, dim=-1))
        return self.merge_heads(weights @ v)


class SigmoidAttention(ProjectedAttention):
    """Each query gates each key independently: ``sigmoid(q k^T * scale) v``. O(N*M)."""

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        q, k, v = self.project_heads(queries, keys, values)
        gates = self.dropout(torch.sigmoid(q @ k.transpose(-2, -1) * self.scale))
        return self.merge_heads(gates @ v)
