"""The compression family: perceiver latents, mean pooling and direct copy."""

from __future__ import annotations

import torch
import torch.nn as nn

from canvas_engineering.attention.base import ParameterFreeAttention, SegmentAttention
from canvas_engineering.attention.dot_product import CrossAttention
from canvas_engineering.attention.validation import check_positive
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex


class PerceiverAttention(SegmentAttention):
    """Read dst through ``n_latents`` learned latents: the latents cross-attend to dst
    (``compress``), then the queries cross-attend to the latents (``readout``).
    Each key set is compressed once, whatever number of segments read it.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        n_latents: number of latents K (>= 1).
    """

    complexity = "O(NK+MK)"
    description = "K learned latents read dst, queries read the latents"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, n_latents: int = 8):
        super().__init__()
        check_positive("PerceiverAttention", n_latents=n_latents)
        self.d_model = d_model
        self.latents = nn.Parameter(torch.randn(1, n_latents, d_model) * 0.02)
        self.compress = CrossAttention(d_model, n_heads, dropout)
        self.readout = CrossAttention(d_model, n_heads, dropout)
        self._stages = PerIndexCache()

    def _stage_indexes(self, index: SegmentIndex) -> tuple[SegmentIndex, SegmentIndex]:
        """(latents reading each key set, queries reading their key set's latents)."""
        n_latents, n_keysets = self.latents.shape[1], len(index.keyset_sizes)
        compress = SegmentIndex.build(
            [n_latents] * n_keysets,
            list(range(n_keysets)),
            index.keyset_sizes,
            query_source=list(range(n_latents)) * n_keysets,
            key_source=index.key_source.index.tolist(),
        )
        readout = SegmentIndex.build(
            index.query_lengths,
            index.keyset_of,
            [n_latents] * n_keysets,
            query_source=index.query_source.index.tolist(),
        )
        device = index.query_source.index.device
        return compress.to(device), readout.to(device)

    def stages(self, index: SegmentIndex) -> tuple[SegmentIndex, SegmentIndex]:
        """The two stages' indexes (built once): latents reading each key set, queries reading
        their key set's latents."""
        return self._stages.get(index, lambda: self._stage_indexes(index))

    def prepare(self, index: SegmentIndex) -> None:
        compress_index, readout_index = self.stages(index)
        self.compress.prepare(compress_index)
        self.readout.prepare(readout_index)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        compress_index, readout_index = self.stages(index)
        latents = self.latents.expand(query_rows.shape[0], -1, -1)
        compressed = self.compress.forward_segments(latents, key_rows, value_rows, compress_index)
        return self.readout.forward_segments(query_rows, compressed, compressed, readout_index)


class PoolingAttention(SegmentAttention):
    """Mean of the values, projected, broadcast to every query.

    Args:
        d_model: model width. ``n_heads`` and ``dropout`` are accepted for a uniform
            constructor and not used.
    """

    complexity = "O(N+M)"
    description = "projected mean of dst, broadcast"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        check_positive("PoolingAttention", d_model=d_model)
        self.d_model = d_model
        self.proj = nn.Linear(d_model, d_model)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        values = index.pack_keys(value_rows)
        sums = values.new_zeros(values.shape[0], len(index.keyset_sizes), values.shape[2])
        means = sums.index_add(1, index.key_keyset, values) / index.keyset_length.view(1, -1, 1).to(values.dtype)
        return index.broadcast_keysets(self.proj(means))


class CopyAttention(ParameterFreeAttention):
    """The first N value rows, zero-padded when M < N. No parameters."""

    complexity = "O(N)"
    description = "first N dst rows, zero-padded"

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        if index.n_keys == 0:
            return value_rows.new_zeros(value_rows.shape[0], index.n_queries, value_rows.shape[2])
        source = index.key_source.index[(index.query_key_start + index.query_offset).clamp(max=index.n_keys - 1)]
        present = (index.query_offset < index.query_key_length).view(1, -1, 1)
        return torch.where(present, torch.index_select(value_rows, 1, source), 0.0)
