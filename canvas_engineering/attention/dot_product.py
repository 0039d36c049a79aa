"""The dot-product family: cross (softmax), linear, cosine and sigmoid attention.

Every module here maps ``queries (B, N, d_model)``, ``keys (B, M, d_model)`` and
``values (B, M, d_model)`` to ``(B, N, d_model)`` with ``forward``, and runs many segments
at once with ``forward_segments`` (see :class:`canvas_engineering.ops.segments.SegmentIndex`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from canvas_engineering.attention.base import ProjectedAttention
from canvas_engineering.ops.linear import FEATURE_MAPS, prepare_linear_attention, segment_linear_attention
from canvas_engineering.ops.segment_attention import segment_attention
from canvas_engineering.ops.segments import SegmentIndex


class CrossAttention(ProjectedAttention):
    """Standard multi-head scaled dot-product attention with softmax."""

    complexity = "O(NM)"
    description = "multi-head softmax attention"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_attention(q, k, v, index, self.scale, dropout_p=self.attention_dropout)


class LinearAttention(ProjectedAttention):
    """Linear attention, ``out = phi(q) (phi(k)^T v) / (phi(q) . sum_m phi(k_m) + 1e-6)`` per
    head, with the feature map phi = elu + 1 (default) or relu.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: accepted for a uniform constructor; not used.
        feature_map: ``"elu"`` or ``"relu"``.
    """

    complexity = "O(N+M)"
    description = "φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + 1e-6), φ = elu+1 or relu"
    eps = 1e-6

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, feature_map: str = "elu"):
        super().__init__(d_model, n_heads, dropout)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"LinearAttention: feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self.feature_map = feature_map

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_linear_attention(q, k, v, index, self.eps, self.feature_map)

    def prepare(self, index: SegmentIndex) -> None:
        prepare_linear_attention(index)


class CosineAttention(ProjectedAttention):
    """Softmax over cosine similarities of queries and keys, times a learned temperature
    (initialised to 10)."""

    complexity = "O(NM)"
    description = "softmax of cosine similarities × learned temperature (init 10)"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__(d_model, n_heads, dropout)
        self.temperature = nn.Parameter(torch.tensor(10.0))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return segment_attention(q, k, v, index, self.temperature, dropout_p=self.attention_dropout)


class SigmoidAttention(ProjectedAttention):
    """Each query gates each key independently: ``sigmoid(q k^T * scale) v``."""

    complexity = "O(NM)"
    description = "sigmoid(qkᵀ/√d) v, no normalisation"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        return segment_attention(q, k, v, index, self.scale, sigmoid=True, dropout_p=self.attention_dropout)
