"""The edge-by-edge dispatcher: the oracle for the compiled plan.

It walks the connections at forward time, frame by frame, resolving temporal fill as it
goes, and calls the dispatcher's own modules once per (connection, frame, anchor), with
each connection's own frame offsets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from canvas_engineering import AttentionDispatcher
from canvas_engineering.connectivity import fill_anchors


def reference_forward(
    dispatcher: AttentionDispatcher, x: torch.Tensor, active_regions: Iterable[str] | None = None
) -> torch.Tensor:
    """What ``dispatcher(x, active_regions)`` must return, computed edge by edge."""
    layout, topology = dispatcher.layout, dispatcher.topology
    output = torch.zeros_like(x)
    weight_of = torch.zeros(layout.num_positions, dtype=torch.float64)

    def run(fn: str, queries: list, keys: list, weight: float) -> None:
        nonlocal output
        q_index, k_index = torch.tensor(queries), torch.tensor(keys)
        attended = dispatcher.fn_modules[fn](x[:, q_index], x[:, k_index], x[:, k_index])
        contribution = torch.zeros_like(x)
        contribution[:, q_index] = attended * weight
        output = output + contribution
        weight_of[q_index] += weight

    real_frames = {
        name: {
            t * layout.region_spec(name).period: layout.region_indices_at_t(name, t)
            for t in layout.region_timesteps(name)
        }
        for name in layout.regions
    }
    horizon = max([layout.T] + [max(frames) + 1 for frames in real_frames.values()])
    for connection in topology.connections:
        if connection.src not in layout.regions or connection.dst not in layout.regions:
            continue
        if active_regions is not None and connection.src not in set(active_regions):
            continue
        fn = topology.resolve_fn(connection, layout)
        if not connection.is_temporal or dispatcher.skip_temporal:
            run(fn, layout.region_indices(connection.src), layout.region_indices(connection.dst), connection.weight)
            continue
        for ref in range(layout.T):
            if connection.t_src is None:
                queries = layout.region_indices(connection.src)
                src_period = 1
            else:
                queries = layout.region_indices_at_t(connection.src, ref + connection.t_src)
                src_period = layout.region_spec(connection.src).period
            if not queries:
                continue
            if connection.t_dst is None:
                run(fn, queries, layout.region_indices(connection.dst), connection.weight)
                continue
            frames = real_frames[connection.dst]
            for real_frame, weight in fill_anchors(
                connection, sorted(frames), (ref + connection.t_dst) * src_period, horizon
            ):
                run(fn, queries, frames[real_frame], weight)
    written = weight_of > 0
    result = x.clone()
    result[:, written] = output[:, written] / weight_of[written].to(x.dtype).view(1, -1, 1)
    return result
