"""Connectivity declarations: which region attends to which, when, and with what function.

Pure declarations: nothing here holds tensors or module state.

A :class:`Connection` says that the positions of ``src`` (the queries) read from the
positions of ``dst`` (keys and values). ``t_src`` and ``t_dst`` are optional frame offsets
from a shared reference frame: for every reference frame ``ref`` in ``range(T)``, the src
positions at frame ``ref + t_src`` read the dst positions at frame ``ref + t_dst``. A side
left as ``None`` takes all of its region's frames. When dst has no positions at the frame
asked for, the connection's :class:`TemporalFill` decides what it reads instead; frames are
compared in real time (canvas frame times the region's ``period``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from canvas_engineering.canvas import CanvasLayout, as_integer, as_real

if TYPE_CHECKING:
    import torch
    from torch.nn.attention.flex_attention import BlockMask


class TemporalFill(str, Enum):
    """What a temporal connection reads when dst has no positions at the frame asked for.

    DROP: nothing; the connection is skipped for that reference frame.
    HOLD: the most recent earlier dst frame (zero-order hold).
    INTERPOLATE: with ``interpolation_order`` 1, the nearest earlier and later dst frames,
        weighted linearly by distance (only one of them: that one, fully); with order
        n >= 2, the n + 1 nearest dst frames, weighted by ``1 / distance**n``, normalised
        (nothing, as in 0.5.0, when those raw weights sum below 1e-12: every dst frame is
        far for the order, such as 3 or more frames away with n >= 26).
    """

    DROP = "drop"
    HOLD = "hold"
    INTERPOLATE = "interpolate"


@dataclass(frozen=True)
class MaskSpec:
    """Sparsity pattern of a connection, as canvas-engineering 0.5.0 declares it.

    Only ``kind="full"`` (every src position reads every dst position, the default) is
    applied by this package; a :class:`Connection` refuses the other kinds.

    Args:
        kind: "full", "tile" (spatial tiles) or "sparse" (a rectangle cover).
        tile_h, tile_w: tile height and width of a two-dimensional "tile" mask.
        tile_shape: tile shape of an N-dimensional "tile" mask.
    """

    kind: str = "full"
    tile_h: int = 1
    tile_w: int = 1
    tile_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Connection:
    """One attention edge: ``src`` queries read ``dst`` keys and values.

    Args:
        src: region whose positions are the queries (and receive the output).
        dst: region whose positions are the keys and values.
        weight: the edge's share in the weighted average of all edges into ``src``
            (finite, >= 0).
        t_src: frame offset of the query positions from the reference frame; None = all frames.
        t_dst: frame offset of the key/value positions; None = all frames.
        fn: attention type; None = the src region's ``default_attn``.
        operator: semantic intent of the edge ("attend", "observe", "predict", ...).
        write_mode: how the output accumulates ("add", "replace", "gate").
        temporal_fill: what to read when dst has no positions at the frame asked for
            (only used when ``t_dst`` is set).
        interpolation_order: order of :attr:`TemporalFill.INTERPOLATE` (>= 1).
        mask: None or ``MaskSpec(kind="full")``: every src position reads every dst
            position (the only pattern applied here).

    Integers may be NumPy integers and the weight any real number; they are stored as
    ``int`` and ``float``.

    Raises:
        ValueError: for an empty region name or fn, a weight that is negative or not
            finite, a non-integer offset, an unknown fill mode, an order below 1 or a
            mask other than a full one.
        TypeError: for a mask that is not a :class:`MaskSpec`.
    """

    src: str
    dst: str
    weight: float = 1.0
    t_src: int | None = None
    t_dst: int | None = None
    fn: str | None = None
    operator: str = "attend"
    write_mode: str = "add"
    temporal_fill: TemporalFill = TemporalFill.HOLD
    interpolation_order: int = 1
    mask: MaskSpec | None = None

    def __post_init__(self) -> None:
        for label in ("src", "dst"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Connection: {label} must be a non-empty region name, got {value!r}")
        weight = as_real(self.weight)
        if weight is None or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"Connection {self.src!r} -> {self.dst!r}: weight must be a finite number >= 0, got {self.weight!r}"
            )
        object.__setattr__(self, "weight", weight)
        for label in ("t_src", "t_dst"):
            value = getattr(self, label)
            offset = None if value is None else as_integer(value)
            if value is not None and offset is None:
                raise ValueError(
                    f"Connection {self.src!r} -> {self.dst!r}: {label} must be an integer frame "
                    f"offset or None, got {value!r}"
                )
            object.__setattr__(self, label, offset)
        if self.fn is not None and (not isinstance(self.fn, str) or not self.fn):
            raise ValueError(
                f"Connection {self.src!r} -> {self.dst!r}: fn must be a non-empty attention "
                f"type name or None, got {self.fn!r}"
            )
        try:
            object.__setattr__(self, "temporal_fill", TemporalFill(self.temporal_fill))
        except ValueError:
            raise ValueError(
                f"Connection {self.src!r} -> {self.dst!r}: temporal_fill must be one of "
                f"{[m.value for m in TemporalFill]}, got {self.temporal_fill!r}"
            ) from None
        order = as_integer(self.interpolation_order)
        if order is None or order < 1:
            raise ValueError(
                f"Connection {self.src!r} -> {self.dst!r}: interpolation_order must be an "
                f"integer >= 1, got {self.interpolation_order!r}"
            )
        object.__setattr__(self, "interpolation_order", order)
        if self.mask is not None and not isinstance(self.mask, MaskSpec):
            raise TypeError(
                f"Connection {self.src!r} -> {self.dst!r}: mask must be None or a MaskSpec, "
                f"got {type(self.mask).__name__} {self.mask!r}"
            )
        if self.mask is not None and self.mask.kind != "full":
            raise ValueError(
                f"Connection {self.src!r} -> {self.dst!r}: mask {self.mask!r} is not applied by this "
                f"package; expected None or MaskSpec(kind='full') (every src position reads every dst "
                f"position). Split the edge into several connections between smaller regions instead"
            )

    @property
    def is_temporal(self) -> bool:
        """Whether either side is constrained to a frame offset."""
        return self.t_src is not None or self.t_dst is not None


def fill_anchors(
    connection: Connection,
    dst_real_frames: Sequence[int],
    target_real: int,
    real_horizon: int,
) -> list[tuple[int, float]]:
    """The dst frames a temporal connection reads at one reference frame, with their weights.

    Args:
        connection: the edge; its ``weight``, ``temporal_fill`` and ``interpolation_order`` apply.
        dst_real_frames: the real-time frames at which dst has positions, ascending.
        target_real: the real-time frame asked for (may be negative or past the end).
        real_horizon: one past the last real-time frame searched for a later anchor.

    Returns:
        ``[(real_frame, weight), ...]``: one pair when dst exists at ``target_real`` or
        for HOLD; up to two for linear INTERPOLATE, up to ``order + 1`` for higher orders;
        empty when nothing is read (see :class:`TemporalFill`).
    """
    available = set(dst_real_frames)
    weight = float(connection.weight)
    if target_real in available:
        return [(target_real, weight)]
    fill = connection.temporal_fill
    if fill == TemporalFill.DROP:
        return []
    past = max((t for t in available if 0 <= t < target_real), default=None)
    if fill == TemporalFill.HOLD:
        return [] if past is None else [(past, weight)]
    order = connection.interpolation_order
    if order == 1:
        future = min((t for t in available if target_real < t < real_horizon), default=None)
        if past is not None and future is not None:
            span = future - past
            return [
                (past, (future - target_real) / span * weight),
                (future, (target_real - past) / span * weight),
            ]
        if past is not None:
            return [(past, weight)]
        return [] if future is None else [(future, weight)]
    nearest = sorted(sorted(available), key=lambda t: abs(t - target_real))[: order + 1]
    raw = [1.0 / abs(t - target_real) ** order for t in nearest]
    total = sum(raw)
    if total < 1e-12:
        return []
    return [(t, r / total * weight) for t, r in zip(nearest, raw)]


@dataclass
class CanvasTopology:
    """The set of attention edges of a canvas: the compute graph of one attention layer.

    Self-connections (``src == dst``) are self-attention within a region.
    """

    connections: list[Connection] = field(default_factory=list)

    @staticmethod
    def dense(regions: list[str]) -> CanvasTopology:
        """Every region reads every region (itself included)."""
        return CanvasTopology([Connection(src=s, dst=d) for s in regions for d in regions])

    @staticmethod
    def isolated(regions: list[str]) -> CanvasTopology:
        """Each region reads only itself."""
        return CanvasTopology([Connection(src=r, dst=r) for r in regions])

    @staticmethod
    def hub_spoke(hub: str, spokes: list[str], bidirectional: bool = True) -> CanvasTopology:
        """Self-loops everywhere; the hub reads each spoke, and each spoke the hub if bidirectional."""
        connections = [Connection(src=r, dst=r) for r in [hub] + list(spokes)]
        for spoke in spokes:
            connections.append(Connection(src=hub, dst=spoke))
            if bidirectional:
                connections.append(Connection(src=spoke, dst=hub))
        return CanvasTopology(connections)

    @staticmethod
    def causal_chain(regions: list[str]) -> CanvasTopology:
        """Self-loops, and each region reads the one before it."""
        connections = [Connection(src=r, dst=r) for r in regions]
        connections += [Connection(src=b, dst=a) for a, b in zip(regions, regions[1:])]
        return CanvasTopology(connections)

    @staticmethod
    def causal_temporal(
        regions: list[str],
        layout: CanvasLayout | None = None,
        temporal_fill: TemporalFill = TemporalFill.HOLD,
    ) -> CanvasTopology:
        """Each region reads itself at the same frame and at the previous frame, and every
        other region at the previous frame; all temporal edges use ``temporal_fill``.
        ``layout`` is accepted for compatibility and not used."""
        connections = []
        for r in regions:
            connections.append(Connection(r, r, t_src=0, t_dst=0, temporal_fill=temporal_fill))
            connections.append(Connection(r, r, t_src=0, t_dst=-1, temporal_fill=temporal_fill))
        for s in regions:
            for d in regions:
                if s != d:
                    connections.append(Connection(s, d, t_src=0, t_dst=-1, temporal_fill=temporal_fill))
        return CanvasTopology(connections)

    @property
    def regions(self) -> set[str]:
        """Every region named by a connection."""
        return {c.src for c in self.connections} | {c.dst for c in self.connections}

    @property
    def has_temporal_constraints(self) -> bool:
        """Whether any connection has a frame offset."""
        return any(c.is_temporal for c in self.connections)

    def resolve_fn(self, connection: Connection, layout: CanvasLayout | None = None) -> str:
        """The attention type of a connection: ``connection.fn``, else the src region's
        ``default_attn`` (when the layout has the region), else ``"cross_attention"``."""
        if connection.fn is not None:
            return connection.fn
        if layout is not None and connection.src in layout.regions:
            return layout.region_spec(connection.src).default_attn
        return "cross_attention"

    def attention_ops(self, layout: CanvasLayout | None = None) -> list[tuple[str, str, float, str]]:
        """``(src, dst, weight, fn)`` of every connection, in declaration order."""
        return [(c.src, c.dst, c.weight, self.resolve_fn(c, layout)) for c in self.connections]

    def neighbors_of(self, region: str) -> list[str]:
        """The regions that ``region`` reads."""
        return [c.dst for c in self.connections if c.src == region]

    def attended_by(self, region: str) -> list[str]:
        """The regions that read ``region``."""
        return [c.src for c in self.connections if c.dst == region]

    def to_block_adjacency(self) -> dict[tuple[str, str], float]:
        """Region-level adjacency: ``(src, dst)`` to the largest weight between them."""
        adjacency: dict[tuple[str, str], float] = {}
        for c in self.connections:
            adjacency[(c.src, c.dst)] = max(adjacency.get((c.src, c.dst), 0.0), c.weight)
        return adjacency

    def summary(self) -> str:
        """A readable multi-line description of the edges: each (src, dst) pair with its
        largest weight, then the count of temporal edges per fill mode and of edges per
        operator other than "attend" (when there are any)."""
        adjacency = self.to_block_adjacency()
        lines = [f"CanvasTopology ({len(self.connections)} ops, {len(self.regions)} regions):"]
        for (src, dst), weight in sorted(adjacency.items()):
            if src == dst:
                lines.append(f"  {src} ↺ self  (w={weight:.2f})")
            else:
                arrow = "↔" if (dst, src) in adjacency else "→"
                lines.append(f"  {src} {arrow} {dst}  (w={weight:.2f})")
        temporal = [c for c in self.connections if c.is_temporal]
        if temporal:
            fills: dict[str, int] = {}
            for c in temporal:
                fills[c.temporal_fill.value] = fills.get(c.temporal_fill.value, 0) + 1
            fill_text = ", ".join(f"{mode}={n}" for mode, n in sorted(fills.items()))
            lines.append(f"  [{len(temporal)} temporal constraints: {fill_text}]")
        operators: dict[str, int] = {}
        for c in self.connections:
            if c.operator != "attend":
                operators[c.operator] = operators.get(c.operator, 0) + 1
        if operators:
            lines.append(f"  [operators: {', '.join(f'{op}={n}' for op, n in sorted(operators.items()))}]")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CanvasTopology(connections={len(self.connections)}, regions={sorted(self.regions)})"

    def to_attention_mask(
        self, layout: CanvasLayout, device: str | torch.device = "cpu", strict: bool = True
    ) -> torch.Tensor:
        """The topology as one ``(P, P)`` weight mask over the canvas (``P = layout.num_positions``).

        ``mask[i, j]`` is the largest weight with which position i (a query) reads position
        j (a key), over every connection and fill anchor; 0 where i does not read j. The
        frames follow :func:`compile_segments`: each connection's own offsets, periods in
        real time, DROP / HOLD / INTERPOLATE fills (an interpolated frame gets its share of
        the weight). In torch's default dtype, on ``device``.

        Raises:
            ValueError: for a connection naming a region the layout lacks (with
                ``strict=False``: a warning, and the connection is left out, as 0.5.0 does).
        """
        from canvas_engineering.masks import MaskTables

        return MaskTables.build(self, layout, strict).to(device).weight_mask()

    def to_additive_mask(
        self, layout: CanvasLayout, device: str | torch.device = "cpu", strict: bool = True
    ) -> torch.Tensor:
        """The ``(P, P)`` additive mask for one attention over the canvas (``nn.Transformer``,
        ``scaled_dot_product_attention``): 0.0 where :meth:`to_attention_mask` is positive,
        ``-inf`` elsewhere, except that a position reading nothing attends to itself (no
        row is all ``-inf``, so softmax gives no NaN). Default dtype, on ``device``.

        Raises:
            ValueError: for a connection naming a region the layout lacks (with
                ``strict=False``: a warning, and the connection is left out, as 0.5.0 does).
        """
        from canvas_engineering.masks import MaskTables

        return MaskTables.build(self, layout, strict).to(device).additive_mask()

    def to_block_mask(
        self,
        layout: CanvasLayout,
        block_size: int = 128,
        device: str | torch.device = "cpu",
        self_attend_unread: bool = False,
        strict: bool = True,
    ) -> BlockMask:
        """The topology as a FlexAttention ``BlockMask`` over ``(P, P)``, never built dense.

        Its pattern is exactly ``to_attention_mask(layout) > 0``; with
        ``self_attend_unread`` it is that of :meth:`to_additive_mask` (positions that read
        nothing attend to themselves). Blocks of ``block_size`` x ``block_size`` that hold
        no read pair are skipped, blocks where every pair is read are full (no mask_mod),
        and the rest are exact through a ``mask_mod`` that looks up per-position class
        tables. Memory: ``O((P / block_size)**2)`` for the block tables plus ``O(P)``.
        Batch and head dimensions are 1 (broadcast by ``flex_attention``). Pair it with
        :meth:`to_score_mod` to add the log of the weights.

        Raises:
            ValueError: for a region missing from the layout (unless ``strict=False``, see
                :meth:`to_attention_mask`), or a block_size that is not a positive integer.
        """
        from canvas_engineering.masks import MaskTables

        return MaskTables.build(self, layout, strict).to(device).block_mask(block_size, self_attend_unread)

    def to_score_mod(self, layout: CanvasLayout, device: str | torch.device = "cpu", strict: bool = True) -> Callable:
        """A FlexAttention ``score_mod`` adding ``log(to_attention_mask(layout)[q, k])`` to each
        read pair's score (0 where the mask is 0, which :meth:`to_block_mask` masks out),
        so that softmax weighs each key by its connection weight.

        Raises:
            ValueError: for a connection naming a region the layout lacks (with
                ``strict=False``: a warning, and the connection is left out, as 0.5.0 does).
        """
        from canvas_engineering.masks import MaskTables

        return MaskTables.build(self, layout, strict).to(device).score_mod()

    def explain_mask(self, layout: CanvasLayout, block_size: int = 128, strict: bool = True) -> str:
        """How dense the topology's mask is: the read (query, key) pairs, and the block
        density of :meth:`to_block_mask` (computed blocks over all blocks, partial and full).

        Raises:
            ValueError: for a region missing from the layout (unless ``strict=False``), or a
                bad block_size.
        """
        from canvas_engineering.masks import MaskTables

        return MaskTables.build(self, layout, strict).explain(block_size)
