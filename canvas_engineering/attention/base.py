"""The bases of the built-in attention types: :class:`SegmentAttention` (one call runs many
segments) and :class:`ProjectedAttention` (its multi-head form, with q/k/v/out projections)."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from canvas_engineering.attention.validation import check_heads, check_qkv
from canvas_engineering.ops.segment_attention import prepare_segment_attention
from canvas_engineering.ops.segments import SegmentIndex, single_segment


class SegmentAttention(nn.Module):
    """Base of the built-in types: ``forward`` is ``forward_segments`` on one segment.

    ``forward_segments(query_rows (B, Rq, D), key_rows (B, Rk, D), value_rows (B, Rk, D), index)``
    returns the outputs of the index's packed query rows, ``(B, Tq, D)``; row-wise work
    (projections) is done once per input row, before the rows are packed.

    A built-in type sets the class attributes ``complexity`` (in N queries and M keys,
    e.g. ``"O(NM)"``) and ``description`` (one line on what it computes), which
    ``ATTENTION_TYPES``, ``AttentionDispatcher.explain()`` and the README's table show.
    """

    d_model: int
    complexity: str
    description: str

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        check_qkv(type(self).__name__, queries, keys, values, self.d_model)
        index = single_segment(queries.shape[1], keys.shape[1], queries.device)
        return self.forward_segments(queries, keys, values, index)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, index: SegmentIndex) -> None:
        """Build, ahead of any forward, what ``forward_segments`` derives from ``index`` (so
        that a forward only looks it up; torch.compile can then trace the first call).
        Returns nothing: a forward looks the built values up."""


class ParameterFreeAttention(SegmentAttention):
    """A type without parameters: ``d_model``, ``n_heads`` and ``dropout`` are accepted for a
    uniform constructor (only ``d_model`` is kept)."""

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model


class ProjectedAttention(SegmentAttention):
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
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project each input row once, split heads and pack: q ``(B, Tq, H, d)``, k, v ``(B, Tk, H, d)``."""
        split = "b t (h d) -> b t h d"
        q = index.pack_queries(rearrange(self.q_proj(query_rows), split, h=self.n_heads))
        k = index.pack_keys(rearrange(self.k_proj(key_rows), split, h=self.n_heads))
        v = index.pack_keys(rearrange(self.v_proj(value_rows), split, h=self.n_heads))
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, Tq, H, head_dim)`` to the projected output ``(B, Tq, d_model)``."""
        return self.out_proj(rearrange(out, "b t h d -> b t (h d)"))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        """The type's mixing of packed heads: ``(B, Tq, H, d)`` from q and the key sets."""
        raise NotImplementedError

    def prepare(self, index: SegmentIndex) -> None:
        prepare_segment_attention(index, self.head_dim)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        return self.merge_heads(self.attend(*self.project_heads(query_rows, key_rows, value_rows, index), index))
