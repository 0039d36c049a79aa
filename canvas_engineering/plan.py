"""Compile (topology, layout) into the static list of attention segments a forward runs.

A segment is one call of an attention function: a set of query positions (from the src
region), a set of key/value positions (from the dst region) and the weight of its output.
A connection without frame offsets is one segment. A temporal connection becomes one
segment per reference frame and per fill anchor (HOLD and exact frames give one anchor,
INTERPOLATE up to ``order + 1``). Everything here is decided at construction; a forward
only runs the segments.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

from canvas_engineering.attention import ATTENTION_REGISTRY, unknown_attention_message
from canvas_engineering.canvas import CanvasLayout
from canvas_engineering.connectivity import CanvasTopology, Connection, fill_anchors


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
    query_positions: Tuple[int, ...]
    key_positions: Tuple[int, ...]
    weight: float


def resolve_connections(
    topology: CanvasTopology, layout: CanvasLayout, strict: bool = True
) -> List[Tuple[int, Connection, str]]:
    """The connections that run, with their index and resolved attention type.

    Args:
        topology: the declared edges.
        layout: the canvas; every region an edge names must be in it.
        strict: raise for an edge naming a region the layout lacks; when False, skip
            that edge with a warning.

    Raises:
        ValueError: for a missing region (strict) or an unregistered attention type.
    """
    resolved = []
    for index, connection in enumerate(topology.connections):
        missing = [r for r in (connection.src, connection.dst) if r not in layout.regions]
        if missing:
            message = (
                f"connection {index} ({connection.src!r} -> {connection.dst!r}) names "
                f"region(s) {missing} that the layout lacks; layout regions: {sorted(layout.regions)}"
            )
            if strict:
                raise ValueError(message + " (pass strict=False to skip such edges with a warning)")
            warnings.warn(message + "; the edge is skipped (strict=False)", stacklevel=3)
            continue
        fn = topology.resolve_fn(connection, layout)
        if fn not in ATTENTION_REGISTRY:
            raise ValueError(f"connection {index} ({connection.src!r} -> {connection.dst!r}): {unknown_attention_message(fn)}")
        resolved.append((index, connection, fn))
    return resolved


def compile_segments(
    connections: List[Tuple[int, Connection, str]], layout: CanvasLayout, skip_temporal: bool = False
) -> List[Segment]:
    """Expand resolved connections (from :func:`resolve_connections`) into their segments,
    in declaration order.

    A temporal connection (``t_src`` or ``t_dst`` set, unless ``skip_temporal``) is
    expanded over the reference frames ``ref`` in ``range(layout.T)``: its queries are the
    src positions at frame ``ref + t_src`` (all src positions when ``t_src`` is None; the
    frame is skipped when src lacks it) and its keys are the dst positions at the real
    time ``(ref + t_dst) * period(src)`` (period 1 when ``t_src`` is None), resolved by the
    connection's temporal fill; all dst positions when ``t_dst`` is None. Each connection
    uses its own offsets. A connection may yield no segment (every frame dropped).
    """
    frame_positions = {name: {t: tuple(layout.region_indices_at_t(name, t)) for t in layout.region_timesteps(name)} for name in layout.regions}
    all_positions = {name: tuple(layout.region_indices(name)) for name in layout.regions}
    real_positions: Dict[str, Dict[int, Tuple[int, ...]]] = {
        name: {t * layout.region_spec(name).period: positions for t, positions in frames.items()}
        for name, frames in frame_positions.items()
    }
    real_horizon = max([layout.T] + [max(frames) + 1 for frames in real_positions.values()])

    segments = []
    for index, connection, fn in connections:
        src, dst = connection.src, connection.dst

        def add(queries: Tuple[int, ...], keys: Tuple[int, ...], weight: float) -> None:
            segments.append(Segment(index, src, dst, fn, queries, keys, weight))

        if not connection.is_temporal or skip_temporal:
            add(all_positions[src], all_positions[dst], float(connection.weight))
            continue
        for ref in range(layout.T):
            if connection.t_src is None:
                queries = all_positions[src]
            elif ref + connection.t_src in frame_positions[src]:
                queries = frame_positions[src][ref + connection.t_src]
            else:
                continue
            if connection.t_dst is None:
                add(queries, all_positions[dst], float(connection.weight))
                continue
            src_period = layout.region_spec(src).period if connection.t_src is not None else 1
            target_real = (ref + connection.t_dst) * src_period
            for real_frame, weight in fill_anchors(connection, sorted(real_positions[dst]), target_real, real_horizon):
                add(queries, real_positions[dst][real_frame], weight)
    return segments
