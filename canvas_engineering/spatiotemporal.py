"""The canvas as a tensor (canvas-engineering 0.5.0's ``SpatiotemporalCanvas``,
``SinusoidalPositionalEncodingND`` and ``PeriodEmbedding``; importable from
``canvas_engineering.canvas`` as in 0.5.0).

A canvas tensor is ``(B, N, d_model)`` with ``N = layout.num_positions``, positions
flattened row-major over ``(t, s0, s1, ...)``. An empty canvas holds, at every position,
the learned empty token plus the sinusoidal positional encoding, plus the period embedding
of every region covering the position (once per region). Placing region data overwrites
the region's positions with the data plus the region's learned modality embedding plus its
period embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from canvas_engineering.canvas import CanvasLayout


class SinusoidalPositionalEncodingND(nn.Module):
    """Sinusoidal positional encoding of a ``(max_T, *max_spatial)`` grid, held in the buffer
    ``pe`` of shape ``(max_T, *max_spatial, d_model)``.

    ``d_model`` is split over the ``1 + len(max_spatial)`` axes: ``d_model // n_axes``
    channels each, the last axis taking the remainder. Within an axis's ``d`` channels,
    channel ``2i`` holds ``sin(p * w_i)`` and channel ``2i + 1`` holds ``cos(p * w_i)`` at
    coordinate ``p``, with ``w_i = 10000 ** (-2i / d)``.
    """

    def __init__(self, d_model: int, max_T: int = 32, max_spatial: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        sizes = (max_T,) + tuple(max_spatial)
        share = d_model // len(sizes)
        widths = [share] * (len(sizes) - 1) + [d_model - share * (len(sizes) - 1)]
        parts = []
        for axis, (size, width) in enumerate(zip(sizes, widths)):
            shape = [1] * len(sizes) + [width]
            shape[axis] = size
            parts.append(self.axis_encoding(size, width).view(shape).expand(*sizes, width))
        self.register_buffer("pe", torch.cat(parts, dim=-1))

    @staticmethod
    def axis_encoding(length: int, width: int) -> torch.Tensor:
        """``(length, width)``: the interleaved sines and cosines of positions ``0..length-1``."""
        frequencies = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        angles = torch.arange(length, dtype=torch.float32).unsqueeze(1) * frequencies
        encoding = torch.empty(length, width)
        encoding[:, 0::2] = torch.sin(angles)
        encoding[:, 1::2] = torch.cos(angles[:, : width // 2])
        return encoding

    def forward(self, T: int, spatial_shape: tuple[int, ...]) -> torch.Tensor:
        """The encoding of the first ``T`` frames and ``spatial_shape`` positions:
        ``(T, *spatial_shape, d_model)``."""
        if len(spatial_shape) != self.pe.dim() - 2:
            raise ValueError(
                f"SinusoidalPositionalEncodingND: expected {self.pe.dim() - 2} spatial sizes, "
                f"got {tuple(spatial_shape)}"
            )
        limits = tuple(self.pe.shape[:-1])
        if any(size > limit for size, limit in zip((T,) + tuple(spatial_shape), limits)):
            raise ValueError(
                f"SinusoidalPositionalEncodingND: grid {(T,) + tuple(spatial_shape)} exceeds the encoded grid {limits}"
            )
        return self.pe[(slice(T),) + tuple(slice(size) for size in spatial_shape)]


class PeriodEmbedding(nn.Module):
    """A learned vector per log-spaced bucket of update periods (``embedding``, an
    ``nn.Embedding(n_buckets, d_model)`` initialised with std 0.02).

    Period 1 (and below) is bucket 0; period ``p > 1`` is bucket
    ``min(1 + floor(log(p) / log(max(max_period, 2)) * (n_buckets - 1)), n_buckets - 1)``.
    """

    def __init__(self, d_model: int, n_buckets: int = 16, max_period: int = 10000) -> None:
        super().__init__()
        self.n_buckets = n_buckets
        self.max_period = max_period
        self.embedding = nn.Embedding(n_buckets, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def bucket(self, period: int) -> int:
        """The bucket index of ``period``."""
        if period <= 1:
            return 0
        scaled = math.log(period) / math.log(max(self.max_period, 2)) * (self.n_buckets - 1)
        return min(int(scaled) + 1, self.n_buckets - 1)

    def forward(self, period: int) -> torch.Tensor:
        """The ``(d_model,)`` embedding of ``period``."""
        return self.embedding.weight[self.bucket(period)]


class SpatiotemporalCanvas(nn.Module):
    """Builds canvas tensors for a layout and moves region data on and off them.

    Parameters (0.5.0's state_dict names): ``pos_enc.pe`` (buffer, ``(T, *spatial_shape,
    d_model)``), ``period_embedding.embedding.weight`` (``(16, d_model)``), ``empty_token``
    (``(d_model,)``) and ``modality_embeddings.<region>`` (``(d_model,)`` each; a region
    name's ``.``, ``[`` and ``]`` become ``__``, ``_`` and ``_``). The layout's regions
    are read at construction.

    Args:
        layout: the canvas geometry and regions.
        semantic_conditioner: not supported by this package (must be None).
        program: not supported by this package (must be None).

    Raises:
        NotImplementedError: for a semantic conditioner or a program.
        TypeError: when ``layout`` is not a CanvasLayout.
        ValueError: when two region names give the same parameter name.
    """

    def __init__(self, layout: CanvasLayout, semantic_conditioner=None, program=None) -> None:
        super().__init__()
        if not isinstance(layout, CanvasLayout):
            raise TypeError(f"SpatiotemporalCanvas: layout must be a CanvasLayout, got {type(layout).__name__}")
        for label, value in (("semantic_conditioner", semantic_conditioner), ("program", program)):
            if value is not None:
                raise NotImplementedError(
                    f"SpatiotemporalCanvas: {label} is not supported by this package (canvas-engineering 0.5.0's "
                    f"semantic conditioning and canvas programs are not implemented); pass {label}=None"
                )
        self.layout = layout
        self.pos_enc = SinusoidalPositionalEncodingND(layout.d_model, max_T=layout.T, max_spatial=layout.spatial_shape)
        self.period_embedding = PeriodEmbedding(layout.d_model)
        self.empty_token = nn.Parameter(torch.randn(layout.d_model) * 0.02)
        self._key_map = self.parameter_keys(layout)
        self.modality_embeddings = nn.ParameterDict(
            {key: nn.Parameter(torch.randn(layout.d_model) * 0.02) for key in self._key_map.values()}
        )
        spans, positions, buckets, start = {}, [], [], 0
        for name in layout.regions:
            indices = layout.region_indices(name)
            spans[name] = (start, start + len(indices))
            start += len(indices)
            positions.extend(indices)
            buckets.extend([self.period_embedding.bucket(layout.region_spec(name).period)] * len(indices))
        self._spans: dict[str, tuple[int, int]] = spans
        self.register_buffer("_positions", torch.tensor(positions, dtype=torch.long), persistent=False)
        self.register_buffer("_buckets", torch.tensor(buckets, dtype=torch.long), persistent=False)

    @staticmethod
    def parameter_keys(layout: CanvasLayout) -> dict[str, str]:
        """Region name -> its key in ``modality_embeddings`` (``.`` -> ``__``, ``[`` and
        ``]`` -> ``_``); a ValueError when two regions get the same key."""
        keys: dict[str, str] = {}
        for name in layout.regions:
            key = name.replace(".", "__").replace("[", "_").replace("]", "_")
            clash = [other for other, taken in keys.items() if taken == key]
            if clash:
                raise ValueError(
                    f"SpatiotemporalCanvas: regions {clash[0]!r} and {name!r} both become the parameter name "
                    f"{key!r}; rename one of them"
                )
            keys[name] = key
        return keys

    def region_positions(self, region_name: str) -> torch.Tensor:
        """Flat canvas positions of a region, ``(region_numel,)`` int64, on the module's device."""
        if region_name not in self._spans:
            raise ValueError(
                f"SpatiotemporalCanvas: unknown region {region_name!r}; layout regions: {list(self._spans)}"
            )
        start, end = self._spans[region_name]
        return self._positions[start:end]

    def create_empty(self, batch_size: int) -> torch.Tensor:
        """A ``(batch_size, N, d_model)`` canvas: empty token + positional encoding + the
        period embedding of each region covering a position."""
        layout = self.layout
        filled = self.pos_enc(layout.T, layout.spatial_shape).reshape(layout.num_positions, layout.d_model)
        filled = filled.index_add(0, self._positions, self.period_embedding.embedding.weight[self._buckets])
        return (self.empty_token + filled).expand(batch_size, -1, -1).clone()

    def check_canvas(self, canvas: torch.Tensor) -> None:
        """A ValueError unless ``canvas`` is ``(B, N, d_model)``."""
        expected = (self.layout.num_positions, self.layout.d_model)
        if not isinstance(canvas, torch.Tensor) or canvas.dim() != 3 or tuple(canvas.shape[1:]) != expected:
            got = tuple(canvas.shape) if isinstance(canvas, torch.Tensor) else type(canvas).__name__
            raise ValueError(
                f"SpatiotemporalCanvas: expected a canvas of shape (B, {expected[0]}, {expected[1]}), got {got}"
            )

    def place(self, canvas: torch.Tensor, embeddings: torch.Tensor, region_name: str) -> torch.Tensor:
        """A copy of ``canvas`` whose region positions hold ``embeddings`` plus the region's
        modality and period embeddings.

        Args:
            canvas: ``(B, N, d_model)``.
            embeddings: ``(B, n, d_model)`` (or ``(1, n, d_model)``, broadcast over the batch);
                ``n`` is cut or zero-padded to the region's size.
            region_name: a region of the layout.

        Returns:
            ``(B, N, d_model)``.
        """
        self.check_canvas(canvas)
        positions = self.region_positions(region_name)
        size, width = positions.numel(), self.layout.d_model
        if (
            not isinstance(embeddings, torch.Tensor)
            or embeddings.dim() != 3
            or embeddings.shape[2] != width
            or embeddings.shape[0] not in (1, canvas.shape[0])
        ):
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(
                f"SpatiotemporalCanvas.place: expected embeddings of shape ({canvas.shape[0]} or 1, n, {width}) "
                f"for region {region_name!r} ({size} positions), got {got}"
            )
        embeddings = embeddings[:, :size]
        if embeddings.shape[1] < size:
            embeddings = nn.functional.pad(embeddings, (0, 0, 0, size - embeddings.shape[1]))
        region = self.modality_embeddings[self._key_map[region_name]]
        period = self.period_embedding(self.layout.region_spec(region_name).period)
        placed = canvas.clone()
        placed[:, positions] = embeddings + region + period
        return placed

    def extract(self, canvas: torch.Tensor, region_name: str) -> torch.Tensor:
        """The region's positions of ``canvas``: ``(B, region_numel, d_model)``."""
        self.check_canvas(canvas)
        return canvas[:, self.region_positions(region_name)]
