"""torch.compile(fullgraph=True) traces a dispatcher's first forward, every type included
(the plan and everything the modules derive from it are built at construction)."""

from __future__ import annotations

import torch

from canvas_engineering import BUILTIN_ATTENTION, AttentionDispatcher, CanvasLayout, CanvasTopology, Connection
from conftest import relative_error


def test_first_forward_compiles_with_every_type():
    names = sorted(BUILTIN_ATTENTION)
    layout = CanvasLayout(
        T=2, spatial_shape=(len(names), 4), d_model=16,
        regions={f"r{i}": (0, 2, i, i + 1, 0, 4) for i in range(len(names))},
    )
    connections = [Connection(f"r{i}", f"r{(i + 1) % len(names)}", fn=name) for i, name in enumerate(names)]
    connections += [Connection(f"r{i}", f"r{i}", fn=name, t_src=0, t_dst=-1, temporal_fill="interpolate") for i, name in enumerate(names)]
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(CanvasTopology(connections), layout, d_model=16, n_heads=2)
    x = torch.randn(2, layout.num_positions, 16)
    compiled = torch.compile(dispatcher, fullgraph=True)(x)
    assert relative_error(compiled, dispatcher(x)) < 1e-5
