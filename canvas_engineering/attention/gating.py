"""The gating family: Flamingo-style gated cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn

from canvas_engineering.attention.base import SegmentAttention
from canvas_engineering.attention.dot_product import CrossAttention
from canvas_engineering.ops.segments import SegmentIndex


class GatedAttention(SegmentAttention):
    """Cross-attention scaled by ``sigmoid(gate)``, a learned scalar initialised to 0
    (so a new gated edge starts at half strength and learns how much context to take).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
    """

    complexity = "O(NM)"
    description = "sigmoid(gate) × cross-attention, gate initialised to 0"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = CrossAttention(d_model, n_heads, dropout)
        self.gate = nn.Parameter(torch.zeros(1))
        self.d_model = d_model

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        return torch.sigmoid(self.gate) * self.cross_attn.forward_segments(query_rows, key_rows, value_rows, index)

    def prepare(self, index: SegmentIndex) -> None:
        self.cross_attn.prepare(index)
