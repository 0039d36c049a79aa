"""Every import and call of the specification, as written there."""

from __future__ import annotations

import torch
import torch.nn as nn

import canvas_engineering
from canvas_engineering import CanvasLayout, CanvasTopology, Connection, RegionSpec


def test_declaration_calls():
    region = RegionSpec(bounds=(0, 1, 0, 2, 0, 2), default_attn="linear_attention")
    connection = Connection(src="thought", dst="visual", fn="perceiver")
    assert region.default_attn == "linear_attention" and connection.fn == "perceiver"


def test_quickstart_dispatch():
    from canvas_engineering import AttentionDispatcher

    layout = CanvasLayout(
        T=2,
        H=4,
        W=4,
        d_model=256,
        regions={
            "visual": RegionSpec(bounds=(0, 2, 0, 3, 0, 4)),
            "thought": RegionSpec(bounds=(0, 2, 3, 4, 0, 4), default_attn="linear_attention"),
        },
    )
    topology = CanvasTopology(
        connections=[
            Connection(src="visual", dst="visual"),
            Connection(src="thought", dst="visual", fn="perceiver"),
            Connection(src="thought", dst="thought"),
        ]
    )
    dispatcher = AttentionDispatcher(
        topology=topology,
        layout=layout,
        d_model=256,
        n_heads=4,
    )
    hidden_states = torch.randn(2, layout.num_positions, 256)
    output = dispatcher(hidden_states)  # per-connection dispatch
    assert output.shape == hidden_states.shape and torch.isfinite(output).all()
    assert set(dispatcher.fn_modules) == {"cross_attention", "perceiver", "linear_attention"}


def test_all_types_live_in_canvas_engineering_attention():
    import canvas_engineering.attention as attention

    for name in (
        "CrossAttention",
        "LinearAttention",
        "CosineAttention",
        "SigmoidAttention",
        "GatedAttention",
        "PerceiverAttention",
        "PoolingAttention",
        "CopyAttention",
        "MambaAttention",
        "RWKVAttention",
        "HyenaAttention",
        "SparseAttention",
        "LocalAttention",
        "NoneAttention",
        "RandomFixedAttention",
        "MixtureAttention",
        "CogVideoXAttention",
    ):
        assert issubclass(getattr(attention, name), nn.Module)
        assert getattr(canvas_engineering, name) is getattr(attention, name)


def test_register_at_runtime():
    from canvas_engineering import register_attention

    class MyCustomAttentionModule(nn.Module):
        def __init__(self, d_model, n_heads=4, dropout=0.0):
            super().__init__()
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, queries, keys, values):
            return self.proj(queries)

    try:
        register_attention("my_custom_attn", MyCustomAttentionModule)
        layout = CanvasLayout(T=1, H=1, W=4, d_model=8, regions={"a": (0, 1, 0, 1, 0, 4)})
        dispatcher = canvas_engineering.AttentionDispatcher(
            CanvasTopology([Connection("a", "a", fn="my_custom_attn")]), layout, 8, 2
        )
        x = torch.randn(1, 4, 8)
        assert torch.allclose(dispatcher(x), dispatcher.fn_modules["my_custom_attn"].proj(x))
    finally:
        del canvas_engineering.ATTENTION_REGISTRY["my_custom_attn"]


def test_readme_quickstart_runs():
    """The README's quickstart block, executed as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = re.findall(r"## Quickstart\n\n```python\n(.*?)```", readme, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["output"].shape == (2, 2048, 256)
    assert torch.isfinite(namespace["output"]).all()
