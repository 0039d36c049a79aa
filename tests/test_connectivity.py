"""Connections, temporal fill and topology constructors, against hand-computed answers."""

from __future__ import annotations

import math

import pytest

from canvas_engineering import CanvasLayout, CanvasTopology, Connection, RegionSpec, TemporalFill
from canvas_engineering.connectivity import fill_anchors


def anchors(fill, frames, target, horizon=20, weight=1.0, order=1):
    connection = Connection("a", "b", weight=weight, t_dst=0, temporal_fill=fill, interpolation_order=order)
    return fill_anchors(connection, frames, target, horizon)


def test_exact_frame_wins_for_every_mode():
    for fill in TemporalFill:
        assert anchors(fill, [0, 4, 8], 4, weight=0.5) == [(4, 0.5)]


def test_drop_and_hold():
    assert anchors(TemporalFill.DROP, [0, 4, 8], 5) == []
    assert anchors(TemporalFill.HOLD, [0, 4, 8], 7, weight=2.0) == [(4, 2.0)]
    assert anchors(TemporalFill.HOLD, [4, 8], 3) == []
    assert anchors(TemporalFill.HOLD, [0, 4], -1) == []


def test_linear_interpolation():
    assert anchors(TemporalFill.INTERPOLATE, [0, 4, 8], 5, weight=2.0) == [(4, 2.0 * 3 / 4), (8, 2.0 * 1 / 4)]
    assert anchors(TemporalFill.INTERPOLATE, [0, 4], 6) == [(4, 1.0)]
    assert anchors(TemporalFill.INTERPOLATE, [4, 8], 2) == [(4, 1.0)]
    assert anchors(TemporalFill.INTERPOLATE, [4, 8], -1) == [(4, 1.0)]
    assert anchors(TemporalFill.INTERPOLATE, [4, 8], 2, horizon=4) == []


def test_inverse_distance_interpolation():
    result = anchors(TemporalFill.INTERPOLATE, [0, 3, 4, 10], 2, order=2, weight=3.0)
    raw = {3: 1 / 1**2, 0: 1 / 2**2, 4: 1 / 2**2}
    total = sum(raw.values())
    assert [t for t, _ in result] == [3, 0, 4]
    for t, w in result:
        assert math.isclose(w, 3.0 * raw[t] / total)
    assert anchors(TemporalFill.INTERPOLATE, [], 2, order=3) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": -1.0}, "weight must be a finite number >= 0"),
        ({"weight": float("nan")}, "weight must be a finite number >= 0"),
        ({"weight": float("inf")}, "weight must be a finite number >= 0"),
        ({"t_src": 0.5}, "t_src must be an integer"),
        ({"fn": ""}, "fn must be a non-empty"),
        ({"temporal_fill": "sometimes"}, "temporal_fill must be one of"),
        ({"interpolation_order": 0}, "interpolation_order must be an integer >= 1"),
        ({"src": ""}, "src must be a non-empty region name"),
    ],
)
def test_bad_connections_are_refused(kwargs, message):
    fields = {"src": "a", "dst": "b", **kwargs}
    with pytest.raises(ValueError, match=message):
        Connection(**fields)


def test_fill_given_as_string():
    assert Connection("a", "b", temporal_fill="interpolate").temporal_fill is TemporalFill.INTERPOLATE


def test_topology_constructors():
    pairs = lambda t: [(c.src, c.dst) for c in t.connections]
    assert pairs(CanvasTopology.dense(["a", "b"])) == [("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]
    assert pairs(CanvasTopology.isolated(["a", "b"])) == [("a", "a"), ("b", "b")]
    assert pairs(CanvasTopology.hub_spoke("h", ["x", "y"])) == [
        ("h", "h"),
        ("x", "x"),
        ("y", "y"),
        ("h", "x"),
        ("x", "h"),
        ("h", "y"),
        ("y", "h"),
    ]
    assert pairs(CanvasTopology.hub_spoke("h", ["x"], bidirectional=False)) == [("h", "h"), ("x", "x"), ("h", "x")]
    assert pairs(CanvasTopology.causal_chain(["a", "b", "c"])) == [
        ("a", "a"),
        ("b", "b"),
        ("c", "c"),
        ("b", "a"),
        ("c", "b"),
    ]
    temporal = CanvasTopology.causal_temporal(["a", "b"], temporal_fill=TemporalFill.DROP)
    assert [(c.src, c.dst, c.t_src, c.t_dst) for c in temporal.connections] == [
        ("a", "a", 0, 0),
        ("a", "a", 0, -1),
        ("b", "b", 0, 0),
        ("b", "b", 0, -1),
        ("a", "b", 0, -1),
        ("b", "a", 0, -1),
    ]
    assert all(c.temporal_fill is TemporalFill.DROP for c in temporal.connections)
    assert temporal.has_temporal_constraints and not CanvasTopology.dense(["a"]).has_temporal_constraints
    assert temporal.regions == {"a", "b"}


def test_fn_resolution_order():
    layout = CanvasLayout(
        T=1,
        H=1,
        W=2,
        d_model=4,
        regions={"a": RegionSpec((0, 1, 0, 1, 0, 1), default_attn="rwkv"), "b": (0, 1, 0, 1, 1, 2)},
    )
    topology = CanvasTopology(
        [Connection("a", "b", fn="mamba"), Connection("a", "b"), Connection("b", "a"), Connection("z", "a")]
    )
    assert [topology.resolve_fn(c, layout) for c in topology.connections] == [
        "mamba",
        "rwkv",
        "cross_attention",
        "cross_attention",
    ]
    assert topology.resolve_fn(topology.connections[1]) == "cross_attention"
    assert topology.attention_ops(layout)[1] == ("a", "b", 1.0, "rwkv")
    assert topology.neighbors_of("a") == ["b", "b"] and topology.attended_by("a") == ["b", "z"]
    assert topology.to_block_adjacency()[("a", "b")] == 1.0
    assert "a → b" in topology.summary() or "a ↔ b" in topology.summary()
