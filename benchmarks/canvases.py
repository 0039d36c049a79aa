"""The benchmark canvases, and their plain-data form for running them on the peer.

The specification's four design recipes at T=8, a 16x16 grid, d_model 256, and a
causal_temporal canvas at T=16 (every region reads itself at the same and the previous
frame, and every other region at the previous frame).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from canvas_engineering import CanvasLayout, CanvasTopology
from canvas_engineering.recipes import RECIPES, field_and_two_strips

D_MODEL, N_HEADS, BATCH = 256, 4, 2


def causal_temporal(T: int = 16, grid: int = 16, d_model: int = D_MODEL) -> tuple[CanvasTopology, CanvasLayout]:
    """Camera field (cross), proprioception (linear) and actions (cross), causal in time."""
    layout = field_and_two_strips(
        T, grid, d_model, ("camera", "cross_attention"), ("proprio", "linear_attention"), ("action", "cross_attention")
    )
    return CanvasTopology.causal_temporal(list(layout.regions)), layout


CANVASES = {name: (lambda builder=builder: builder(T=8, grid=16, d_model=D_MODEL)) for name, builder in RECIPES.items()}
CANVASES["causal_temporal"] = causal_temporal


def to_spec(topology: CanvasTopology, layout: CanvasLayout) -> dict[str, Any]:
    """The plain description ``tests/peer_runner.build_declarations`` rebuilds with either package."""
    return {
        "T": layout.T,
        "spatial_shape": tuple(layout.spatial_shape),
        "d_model": layout.d_model,
        "regions": {
            name: {"bounds": spec.bounds, "period": spec.period, "default_attn": spec.default_attn}
            for name, spec in ((n, layout.region_spec(n)) for n in layout.regions)
        },
        "connections": [{**asdict(c), "temporal_fill": c.temporal_fill.value} for c in topology.connections],
    }
