"""Compile (topology, layout) into the ExecutionPlan a dispatcher's forward runs.

A segment is one application of an attention function: a set of query positions (from
the src region), a set of key/value positions (from the dst region) and the weight of its
output. A connection without frame offsets is one segment. A temporal connection becomes
one segment per reference frame and per fill anchor (HOLD and exact frames give one
anchor, INTERPOLATE up to ``order + 1``).

The plan groups the segments by attention type. Per group it holds the canvas positions
whose rows the type projects (each once), a :class:`SegmentIndex` over packed rows
(segments reading the same dst rows share one key set), and the share of every packed
query row in its position's result (its weight over the position's weight sum, so the
weighted outputs add up to the normalised result). Everything is decided at construction; a
forward only runs the groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from canvas_engineering.attention import ATTENTION_REGISTRY, unknown_attention_message
from canvas_engineering.canvas import CanvasLayout
from canvas_engineering.connectivity import CanvasTopology, Connection, fill_anchors
from canvas_engineering.ops.segments import RowSelection, SegmentIndex, moved_to


@dataclass(frozen=True)
class Segment:
    """One attention call of the plan.

    Attributes:
        connection_index: position of the source connection in ``topology.connections``.
        src: query region; dst: key/value region; fn: resolved attention type.
        query_positions: flat canvas positions of the queries, in region order.
        key_positions: flat canvas positions of the keys and values, in region order.
        weight: factor on the segment's output, and its share in the normalisation.
    """

    connection_index: int
    src: str
    dst: str
    fn: str
    query_positions: tuple[int, ...]
    key_positions: tuple[int, ...]
    weight: float


def resolve_connections(
    topology: CanvasTopology, layout: CanvasLayout, strict: bool = True, check_types: bool = True
) -> tuple[list[tuple[int, Connection, str]], list[tuple[int, str]]]:
    """The connections that run, with their index and resolved attention type.

    Args:
        topology: the declared edges.
        layout: the canvas; every region an edge names must be in it.
        strict: raise for an edge naming a region the layout lacks; when False, skip
            that edge with a warning.
        check_types: raise for a resolved type that is not registered (the topology's
            masks, which read no type, pass False).

    Returns:
        ``(resolved, skipped)``: ``(index, connection, fn)`` of every edge that runs, and
        ``(index, reason)`` of every edge skipped for a missing region (``strict=False``).

    Raises:
        TypeError: when ``topology.connections`` is not a list of :class:`Connection`.
        ValueError: for a missing region (strict) or an unregistered attention type
            (``check_types``).
    """
    if not isinstance(topology.connections, (list, tuple)):
        raise TypeError(
            f"CanvasTopology.connections must be a list of Connection, got {type(topology.connections).__name__}"
        )
    resolved, skipped = [], []
    for index, connection in enumerate(topology.connections):
        if not isinstance(connection, Connection):
            raise TypeError(f"connection {index} must be a Connection, got {type(connection).__name__} {connection!r}")
        missing = [r for r in (connection.src, connection.dst) if r not in layout.regions]
        if missing:
            message = (
                f"connection {index} ({connection.src!r} -> {connection.dst!r}) names "
                f"region(s) {missing} that the layout lacks; layout regions: {sorted(layout.regions)}"
            )
            if strict:
                raise ValueError(message + " (pass strict=False to skip such edges with a warning)")
            warnings.warn(message + "; the edge is skipped (strict=False)", stacklevel=3)
            skipped.append((index, f"names region(s) {missing} that the layout lacks (skipped, strict=False)"))
            continue
        fn = topology.resolve_fn(connection, layout)
        if check_types and fn not in ATTENTION_REGISTRY:
            raise ValueError(
                f"connection {index} ({connection.src!r} -> {connection.dst!r}): {unknown_attention_message(fn)}"
            )
        resolved.append((index, connection, fn))
    return resolved, skipped


def compile_segments(
    connections: list[tuple[int, Connection, str]], layout: CanvasLayout, skip_temporal: bool = False
) -> tuple[list[Segment], list[tuple[int, str]]]:
    """Expand resolved connections (from :func:`resolve_connections`) into their segments,
    in declaration order.

    A temporal connection (``t_src`` or ``t_dst`` set, unless ``skip_temporal``) is
    expanded over the reference frames ``ref`` in ``range(layout.T)``: its queries are the
    src positions at frame ``ref + t_src`` (all src positions when ``t_src`` is None; the
    frame is skipped when src lacks it) and its keys are the dst positions at the real
    time ``(ref + t_dst) * period(src)`` (period 1 when ``t_src`` is None), resolved by the
    connection's temporal fill; all dst positions when ``t_dst`` is None. Each connection
    uses its own offsets.

    Returns:
        ``(segments, idle)``: the segments, and ``(index, reason)`` for every connection
        that yields none (every reference frame misses src, or its fill reads nothing).
    """
    frame_positions = {
        name: {t: tuple(layout.region_indices_at_t(name, t)) for t in layout.region_timesteps(name)}
        for name in layout.regions
    }
    all_positions = {name: tuple(layout.region_indices(name)) for name in layout.regions}
    real_positions: dict[str, dict[int, tuple[int, ...]]] = {
        name: {t * layout.region_spec(name).period: positions for t, positions in frames.items()}
        for name, frames in frame_positions.items()
    }
    real_horizon = max([layout.T] + [max(frames) + 1 for frames in real_positions.values()])

    segments: list[Segment] = []
    idle: list[tuple[int, str]] = []
    for index, connection, fn in connections:
        src, dst = connection.src, connection.dst

        def add(queries: tuple[int, ...], keys: tuple[int, ...], weight: float) -> None:
            segments.append(Segment(index, src, dst, fn, queries, keys, weight))  # noqa: B023 (called in this iteration)

        if not connection.is_temporal or skip_temporal:
            add(all_positions[src], all_positions[dst], float(connection.weight))
            continue
        first, query_frames = len(segments), 0
        for ref in range(layout.T):
            if connection.t_src is None:
                queries = all_positions[src]
            elif ref + connection.t_src in frame_positions[src]:
                queries = frame_positions[src][ref + connection.t_src]
            else:
                continue
            query_frames += 1
            if connection.t_dst is None:
                add(queries, all_positions[dst], float(connection.weight))
                continue
            src_period = layout.region_spec(src).period if connection.t_src is not None else 1
            target_real = (ref + connection.t_dst) * src_period
            for real_frame, weight in fill_anchors(connection, sorted(real_positions[dst]), target_real, real_horizon):
                add(queries, real_positions[dst][real_frame], weight)
        if len(segments) == first:
            idle.append((index, idle_reason(connection, layout, query_frames, sorted(real_positions[dst]))))
    return segments, idle


def idle_reason(connection: Connection, layout: CanvasLayout, query_frames: int, dst_real_frames: list[int]) -> str:
    """Why a temporal connection yields no segment, for :meth:`ExecutionPlan.explain`."""
    if query_frames == 0:
        frames = layout.region_timesteps(connection.src)
        return (
            f"t_src={connection.t_src} selects no frame of {connection.src!r} (frames {frames[0]}..{frames[-1]}) "
            f"from the reference frames 0..{layout.T - 1}"
        )
    return (
        f"t_dst={connection.t_dst} with temporal_fill={connection.temporal_fill.value!r} reads no frame of "
        f"{connection.dst!r} (real frames {dst_real_frames}) from any reference frame"
    )


@dataclass(eq=False)
class GroupPlan:
    """All segments of one attention type, packed.

    Attributes:
        fn: the attention type.
        segments: the group's segments, in declaration order.
        query_positions: canvas positions of the query rows the type reads (each once).
        key_positions: canvas positions of the key/value rows (each once).
        index: packed segments over those rows (``query_source`` indexes ``query_positions``,
            ``key_source`` indexes ``key_positions``).
        row_positions: ``(Tq,)`` canvas position each packed query row writes.
        row_shares: ``(Tq,)`` float64 share of each packed query row in its position's
            result: its segment's weight over the sum of the weights written there (0 where
            that sum is 0).
        covers_canvas: whether the packed rows are exactly positions ``0 .. P-1`` in order.
    """

    fn: str
    segments: list[Segment]
    query_positions: RowSelection
    key_positions: RowSelection
    index: SegmentIndex
    row_positions: torch.Tensor
    row_shares: torch.Tensor
    covers_canvas: bool

    @staticmethod
    def build(fn: str, segments: list[Segment], weight_max: torch.Tensor, scaled_weight_sum: torch.Tensor) -> GroupPlan:
        """The group of ``segments``; ``weight_max`` and ``scaled_weight_sum`` are ``(P,)``
        per canvas position (see :meth:`ExecutionPlan.build`)."""
        query_positions = sorted({p for s in segments for p in s.query_positions})
        key_positions = sorted({p for s in segments for p in s.key_positions})
        query_row = {p: i for i, p in enumerate(query_positions)}
        key_row = {p: i for i, p in enumerate(key_positions)}
        keysets: dict[tuple[int, ...], int] = {}
        for segment in segments:
            keysets.setdefault(segment.key_positions, len(keysets))
        index = SegmentIndex.build(
            [len(s.query_positions) for s in segments],
            [keysets[s.key_positions] for s in segments],
            [len(keys) for keys in keysets],
            query_source=[query_row[p] for s in segments for p in s.query_positions],
            key_source=[key_row[p] for keys in keysets for p in keys],
        )
        rows = [p for s in segments for p in s.query_positions]
        weights = torch.tensor([s.weight for s in segments for _ in s.query_positions], dtype=torch.float64)
        row_positions = torch.tensor(rows, dtype=torch.long).reshape(-1)
        row_max, row_sum = weight_max[row_positions], scaled_weight_sum[row_positions]
        written = row_max > 0
        shares = weights / torch.where(written, row_max, 1.0) / torch.where(written, row_sum, 1.0)
        return GroupPlan(
            fn=fn,
            segments=segments,
            query_positions=RowSelection.of(query_positions),
            key_positions=RowSelection.of(key_positions),
            index=index,
            row_positions=row_positions,
            row_shares=torch.where(written, shares, 0.0),
            covers_canvas=rows == list(range(weight_max.shape[0])),
        )

    def to(self, device: torch.device) -> GroupPlan:
        """A copy with every tensor on ``device``."""
        return moved_to(self, torch.device(device))


@dataclass(eq=False)
class ExecutionPlan:
    """What one forward runs: one :class:`GroupPlan` per attention type, whose weighted
    outputs add up to the normalised result.

    Attributes:
        groups: in order of each type's first connection.
        written: ``(P,)`` bool, positions with a positive weight sum (the rest pass through).
        all_written: whether every position is written.
    """

    groups: list[GroupPlan]
    written: torch.Tensor
    all_written: bool

    @staticmethod
    def build(segments: list[Segment], num_positions: int, active: frozenset[str] | None = None) -> ExecutionPlan:
        """The plan of the segments whose src is in ``active`` (all when None).

        A row's share is its weight over the sum of the weights written to its position,
        both divided first by the largest of them, so that weights near the float64 limits
        (1e300, 1e-310) neither overflow nor vanish.
        """
        running = [s for s in segments if active is None or s.src in active]
        by_fn: dict[str, list[Segment]] = {}
        for segment in running:
            by_fn.setdefault(segment.fn, []).append(segment)
        positions = torch.tensor([p for s in running for p in s.query_positions], dtype=torch.long)
        weights = torch.tensor([s.weight for s in running for _ in s.query_positions], dtype=torch.float64)
        weight_max = torch.zeros(num_positions, dtype=torch.float64).scatter_reduce(0, positions, weights, "amax")
        written = weight_max > 0
        scaled = weights / torch.where(written, weight_max, 1.0)[positions]
        scaled_weight_sum = torch.zeros(num_positions, dtype=torch.float64).index_add(0, positions, scaled)
        groups = [GroupPlan.build(fn, group, weight_max, scaled_weight_sum) for fn, group in by_fn.items()]
        return ExecutionPlan(groups, written, bool(written.all()))

    def to(self, device: torch.device) -> ExecutionPlan:
        """A copy with every tensor on ``device``."""
        return moved_to(self, torch.device(device))

    def explain(self, complexity: Mapping[str, str], options: Mapping[str, str], idle: Sequence[str] = ()) -> str:
        """A table of the groups: segments, key sets, packed rows, padded batches and the
        number of (query, key) pairs each reads, with each type's ``complexity`` and
        ``options`` (keyed by type name); then the ``idle`` lines (the declared connections
        that run nothing, and why)."""
        header = [
            "fn",
            "segments",
            "key sets",
            "query rows",
            "key rows",
            "batches",
            "query-key pairs",
            "complexity",
            "options",
        ]
        rows = []
        for group in self.groups:
            index = group.index
            pairs = sum(n * m for n, m in index.shapes)
            rows.append(
                [
                    group.fn,
                    len(group.segments),
                    len(index.keyset_sizes),
                    index.n_queries,
                    index.n_keys,
                    len(index.segment_buckets),
                    pairs,
                    complexity[group.fn],
                    options[group.fn],
                ]
            )
        widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
        line = lambda values: "  ".join(
            str(v).rjust(w) if isinstance(v, int) else str(v).ljust(w) for v, w in zip(values, widths)
        )
        written = int(self.written.sum())
        footer = (
            f"{len(self.groups)} groups; {written} of {self.written.numel()} positions written, the rest pass through"
        )
        idle_lines = [f"{len(idle)} connection(s) run nothing:", *(f"  {reason}" for reason in idle)] if idle else []
        return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), *idle_lines, footer])
