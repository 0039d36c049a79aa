"""Canvas geometry: regions of a (T, *spatial_shape) token grid.

Pure declarations: nothing here holds tensors or module state. A canvas is a grid of
``T * prod(spatial_shape)`` positions, flattened row-major over ``(t, s0, s1, ...)``.
Each named region is a box in that grid, given as flat bounds
``(t0, t1, s0_lo, s0_hi, s1_lo, s1_hi, ...)`` with half-open ranges.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


Bounds = tuple[int, ...]


def as_integer(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (``int``, a NumPy or 0-d torch
    integer: anything with ``__index__``) and not a bool; otherwise None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_real(value: object) -> float | None:
    """``value`` as a Python float when it is a real number (``int``, ``float``, a NumPy
    scalar, ...) and not a bool; otherwise None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_bounds(bounds: Sequence[int], where: str) -> Bounds:
    """Validate flat region bounds on their own and return them as a tuple of ints.

    Args:
        bounds: ``(t0, t1, s0_lo, s0_hi, ...)``: an even number (at least 4) of integers
            (NumPy integers too), each range non-empty (``lo < hi``) and non-negative.
        where: what the bounds belong to, for the error message.

    Raises:
        ValueError: naming ``where``, the bad bounds and what was expected.
    """
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
        raise ValueError(f"{where}: bounds must be a tuple (t0, t1, s0_lo, s0_hi, ...), got {bounds!r}")
    integers = tuple(as_integer(b) for b in bounds)
    if any(b is None for b in integers):
        raise ValueError(f"{where}: bounds must be integers, got {tuple(bounds)!r}")
    bounds = integers
    if len(bounds) < 4 or len(bounds) % 2:
        raise ValueError(
            f"{where}: bounds must have 2 + 2*n_spatial_dims entries (at least 4), got {len(bounds)}: {tuple(bounds)!r}"
        )
    for axis in range(len(bounds) // 2):
        lo, hi = bounds[2 * axis], bounds[2 * axis + 1]
        axis_name = "t" if axis == 0 else f"s{axis - 1}"
        if lo < 0 or hi <= lo:
            raise ValueError(
                f"{where}: bounds {bounds!r} give an empty or negative range on axis "
                f"{axis_name}: [{lo}, {hi}); expected 0 <= lo < hi"
            )
    return bounds


@dataclass(frozen=True)
class RegionSpec:
    """Declaration of one canvas region.

    Args:
        bounds: ``(t0, t1, s0_lo, s0_hi, ...)``, half-open ranges; length ``2 + 2 * n_spatial_dims``.
        period: canvas frames per real-world update (1 = every frame). Canvas frame ``t``
            of the region is real time ``t * period``.
        is_output: whether the region takes part in the diffusion loss.
        loss_weight: relative loss weight of the region's positions.
        semantic_type: human-readable description of the modality.
        semantic_embedding: frozen embedding of ``semantic_type``.
        embedding_model: the model that produced ``semantic_embedding``.
        default_attn: attention type of this region's outgoing connections, unless a
            connection names its own ``fn``.
        carrier: dynamics carrier ("deterministic", "diffusive", "filter", "memory", "residual").
    """

    bounds: Bounds
    period: int = 1
    is_output: bool = True
    loss_weight: float = 1.0
    semantic_type: str | None = None
    semantic_embedding: tuple[float, ...] | None = None
    embedding_model: str = "openai/text-embedding-3-small"
    default_attn: str = "cross_attention"
    carrier: str = "deterministic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", check_bounds(self.bounds, "RegionSpec"))
        period = as_integer(self.period)
        if period is None or period < 1:
            raise ValueError(f"RegionSpec: period must be a positive integer, got {self.period!r}")
        object.__setattr__(self, "period", period)
        loss_weight = as_real(self.loss_weight)
        if loss_weight is None or not math.isfinite(loss_weight) or loss_weight < 0:
            raise ValueError(f"RegionSpec: loss_weight must be a finite number >= 0, got {self.loss_weight!r}")
        if not isinstance(self.default_attn, str) or not self.default_attn:
            raise ValueError(
                f"RegionSpec: default_attn must be a non-empty attention type name, got {self.default_attn!r}"
            )


@dataclass
class CanvasLayout:
    """Canvas geometry and named regions.

    The canvas is a ``(T, *spatial_shape)`` grid of ``d_model``-dimensional vectors; a
    hidden state over it has shape ``(B, num_positions, d_model)``. ``H`` and ``W`` are the
    two-dimensional shorthand for ``spatial_shape=(H, W)``.

    Args:
        T: number of canvas frames.
        d_model: width of each position's vector.
        spatial_shape: sizes of the spatial axes (any number of them, at least one).
        regions: name to :class:`RegionSpec` or raw bounds tuple.
        t_current: first frame that is a diffusion output.

    Raises:
        ValueError: for a non-positive size, or a region whose bounds have the wrong
            length, are empty, or leave the canvas.
    """

    T: int
    d_model: int
    spatial_shape: tuple[int, ...] = ()
    regions: dict[str, Bounds | RegionSpec] = field(default_factory=dict)
    t_current: int = 0
    H: int | None = field(default=None, repr=False)
    W: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.H is not None or self.W is not None:
            if self.spatial_shape != ():
                raise ValueError(
                    f"CanvasLayout: give either spatial_shape or H/W, got spatial_shape="
                    f"{self.spatial_shape!r} and H={self.H!r}, W={self.W!r}"
                )
            self.spatial_shape = (
                self.H if self.H is not None else 1,
                self.W if self.W is not None else 1,
            )
        if isinstance(self.spatial_shape, Sequence) and not self.spatial_shape:
            raise ValueError("CanvasLayout: spatial_shape (or H and W) is required")
        self.validate()

    def validate(self) -> None:
        """Check the geometry and every region against it; ``T``, ``d_model``,
        ``spatial_shape`` and ``t_current`` become Python ints (from NumPy integers, say).

        Raises:
            ValueError: naming the bad value and what was expected.
            TypeError: when ``regions`` is not a mapping.
        """
        if (
            isinstance(self.spatial_shape, (str, bytes))
            or not isinstance(self.spatial_shape, Sequence)
            or not self.spatial_shape
        ):
            raise ValueError(
                "CanvasLayout: spatial_shape must be a non-empty tuple of positive integers, "
                f"got {self.spatial_shape!r}"
            )
        for label in ("T", "d_model"):
            value = as_integer(getattr(self, label))
            if value is None or value < 1:
                raise ValueError(f"CanvasLayout: {label} must be a positive integer, got {getattr(self, label)!r}")
            setattr(self, label, value)
        sizes = tuple(as_integer(size) for size in self.spatial_shape)
        for axis, size in enumerate(sizes):
            if size is None or size < 1:
                raise ValueError(
                    f"CanvasLayout: spatial_shape must hold positive integers, got "
                    f"{tuple(self.spatial_shape)!r} (axis {axis})"
                )
        self.spatial_shape = sizes
        self.H = sizes[0]
        self.W = sizes[1] if len(sizes) >= 2 else None
        t_current = as_integer(self.t_current)
        if t_current is None or not 0 <= t_current <= self.T:
            raise ValueError(f"CanvasLayout: t_current must be an integer in [0, T={self.T}], got {self.t_current!r}")
        self.t_current = t_current
        if not isinstance(self.regions, Mapping):
            raise TypeError(
                f"CanvasLayout: regions must be a dict of name -> bounds tuple or RegionSpec, "
                f"got {type(self.regions).__name__}"
            )
        extents = (self.T,) + self.spatial_shape
        for name in self.regions:
            if not isinstance(name, str) or not name:
                raise ValueError(f"CanvasLayout: region names must be non-empty strings, got {name!r}")
            region = self.regions[name]
            bounds = check_bounds(region.bounds if isinstance(region, RegionSpec) else region, f"region {name!r}")
            if len(bounds) != 2 * len(extents):
                raise ValueError(
                    f"region {name!r}: bounds {bounds!r} have {len(bounds)} entries; a canvas "
                    f"with {self.n_spatial_dims} spatial dims expects {2 * len(extents)} "
                    f"(t0, t1, then lo, hi per spatial axis)"
                )
            for axis, extent in enumerate(extents):
                if bounds[2 * axis + 1] > extent:
                    axis_name = "T" if axis == 0 else f"spatial axis {axis - 1}"
                    raise ValueError(
                        f"region {name!r}: bounds {bounds!r} leave the canvas on {axis_name} "
                        f"(upper bound {bounds[2 * axis + 1]} > size {extent})"
                    )

    @property
    def n_spatial_dims(self) -> int:
        """Number of spatial axes."""
        return len(self.spatial_shape)

    @property
    def spatial_volume(self) -> int:
        """Positions per frame: ``prod(spatial_shape)``."""
        return math.prod(self.spatial_shape)

    @property
    def num_positions(self) -> int:
        """All canvas positions: ``T * prod(spatial_shape)``."""
        return self.T * self.spatial_volume

    @property
    def _strides(self) -> tuple[int, ...]:
        """Row-major strides of ``(t, s0, s1, ...)``; the last is 1."""
        strides = [1]
        for size in reversed(self.spatial_shape):
            strides.append(strides[-1] * size)
        return tuple(reversed(strides))

    def flat_index(self, t: int, *spatial_coords: int) -> int:
        """Flat position of coordinates ``(t, s0, s1, ...)``."""
        return sum(c * s for c, s in zip((t,) + spatial_coords, self._strides))

    def _raw_bounds(self, name: str) -> Bounds:
        region = self.regions[name]
        return region.bounds if isinstance(region, RegionSpec) else tuple(map(operator.index, region))

    def region_spec(self, name: str) -> RegionSpec:
        """The region's :class:`RegionSpec` (raw bounds get the defaults). KeyError if unknown."""
        region = self.regions[name]
        return region if isinstance(region, RegionSpec) else RegionSpec(bounds=tuple(region))

    def region_size(self, name: str) -> tuple[int, ...]:
        """Extent of the region along ``(t, s0, s1, ...)``."""
        bounds = self._raw_bounds(name)
        return tuple(bounds[i + 1] - bounds[i] for i in range(0, len(bounds), 2))

    def region_numel(self, name: str) -> int:
        """Number of positions in the region."""
        return math.prod(self.region_size(name))

    def _frame_offsets(self, name: str) -> list[int]:
        """Flat offsets of the region's positions within one frame, row-major."""
        bounds = self._raw_bounds(name)
        axes = [range(bounds[i], bounds[i + 1]) for i in range(2, len(bounds), 2)]
        strides = self._strides[1:]
        return [sum(c * s for c, s in zip(coords, strides)) for coords in product(*axes)]

    def region_indices(self, name: str) -> list[int]:
        """Flat positions of the region, frame by frame, row-major within a frame."""
        offsets = self._frame_offsets(name)
        frame = self._strides[0]
        return [t * frame + o for t in self.region_timesteps(name) for o in offsets]

    def region_indices_at_t(self, name: str, t_abs: int) -> list[int]:
        """Flat positions of the region at absolute frame ``t_abs`` (empty if outside it)."""
        if t_abs not in self.region_timesteps(name):
            return []
        base = t_abs * self._strides[0]
        return [base + o for o in self._frame_offsets(name)]

    def region_timesteps(self, name: str) -> list[int]:
        """Absolute canvas frames the region covers."""
        bounds = self._raw_bounds(name)
        return list(range(bounds[0], bounds[1]))

    def output_mask(self) -> list[int]:
        """Flat positions of the frames at or after ``t_current``."""
        frame = self._strides[0]
        return list(range(self.t_current * frame, self.T * frame))

    def loss_weight_mask(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Per-position loss weights, shape ``(num_positions,)``.

        Output regions add their ``loss_weight`` to their positions (overlaps add up);
        other positions get 0.
        """
        import torch

        weights = torch.zeros(self.num_positions, device=device)
        for name in self.regions:
            spec = self.region_spec(name)
            if spec.is_output:
                idx = torch.tensor(self.region_indices(name), dtype=torch.long, device=device)
                weights.index_add_(0, idx, torch.full(idx.shape, float(spec.loss_weight), device=device))
        return weights

    def real_frame(self, name: str, canvas_t: int) -> int:
        """Real-world frame of the region's canvas frame ``canvas_t``: ``canvas_t * period``."""
        return canvas_t * self.region_spec(name).period

    def canvas_frame(self, name: str, real_t: int) -> int | None:
        """The region's canvas frame (relative to its start) at real frame ``real_t``, or None
        when ``real_t`` is not on the region's period grid or outside its extent."""
        frame, remainder = divmod(real_t, self.region_spec(name).period)
        if remainder or not 0 <= frame < self.region_size(name)[0]:
            return None
        return frame


CANVAS_MODULES = ("SpatiotemporalCanvas", "SinusoidalPositionalEncodingND", "PeriodEmbedding")
"""The canvas nn.Modules, defined in ``canvas_engineering.spatiotemporal`` and importable
from this module too (where canvas-engineering 0.5.0 defines them)."""


def __getattr__(name: str):
    """Loads the names in :data:`CANVAS_MODULES` and ``ATTENTION_TYPES`` (the built-in
    attention types and what each computes, derived from their classes in
    ``canvas_engineering.attention``) on first access, so that this module itself holds no
    torch state."""
    if name in CANVAS_MODULES:
        from canvas_engineering import spatiotemporal

        return getattr(spatiotemporal, name)
    if name == "ATTENTION_TYPES":
        from canvas_engineering.attention import ATTENTION_TYPES

        return ATTENTION_TYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
