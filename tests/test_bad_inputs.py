"""Bad declarations and bad inputs: each one either gives a working dispatcher whose
output equals the edge-by-edge oracle, or raises ValueError/TypeError whose message names
the problem. Never another exception, never a NaN the oracle does not have, never an edge
dropped without ``explain()`` saying so."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_all_close, grid_inputs, make_top_k_ties_exact
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.dispatcher import reference_forward
from test_dispatcher import FNS, assert_matches_reference, canvases

from canvas_engineering import (
    BUILTIN_ATTENTION,
    AttentionDispatcher,
    CanvasLayout,
    CanvasTopology,
    Connection,
    RegionSpec,
    TemporalFill,
    create_attention,
)

pytestmark = pytest.mark.usefixtures("scaled_mean_registered")  # FNS and canvases() draw it
D_MODEL, N_HEADS = 8, 2
BUILTIN_FNS = sorted(BUILTIN_ATTENTION)


# ---------------------------------------------------------------- declarations


def build(description: dict[str, Any]) -> AttentionDispatcher:
    """The dispatcher of a plain description (its fields may hold bad values).

    ``description``: {"T", "spatial_shape", "d_model", "t_current", "regions": {name: RegionSpec
    kwargs} (or another object in place of the dict), "connections": [Connection kwargs or another
    object], "dispatcher": AttentionDispatcher kwargs}.
    """
    regions = description["regions"]
    if isinstance(regions, dict):
        regions = {
            name: RegionSpec(**fields) if isinstance(fields, dict) else fields for name, fields in regions.items()
        }
    layout = CanvasLayout(
        T=description["T"],
        spatial_shape=description["spatial_shape"],
        d_model=description["d_model"],
        t_current=description["t_current"],
        regions=regions,
    )
    connections = [Connection(**c) if isinstance(c, dict) else c for c in description["connections"]]
    return AttentionDispatcher(CanvasTopology(connections), layout, **description["dispatcher"])


OFFSETS = st.one_of(st.none(), st.integers(-4, 3))
"""A temporal connection's offset: none, or a step back or ahead."""


@st.composite
def descriptions(draw, offsets=OFFSETS):
    """A valid random description: 1 to 3 regions (overlaps allowed) on a (T, H, W) canvas,
    1 to 5 connections with random types, weights, offsets (some outside the canvas) and fills."""
    T, height, width = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 4))
    names = [f"r{i}" for i in range(draw(st.integers(1, 3)))]
    regions = {}
    for name in names:
        t0, h0, w0 = draw(st.integers(0, T - 1)), draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        regions[name] = {
            "bounds": (
                t0,
                draw(st.integers(t0 + 1, T)),
                h0,
                draw(st.integers(h0 + 1, height)),
                w0,
                draw(st.integers(w0 + 1, width)),
            ),
            "period": draw(st.integers(1, 3)),
            "default_attn": draw(st.sampled_from(BUILTIN_FNS)),
        }
    connections = [
        {
            "src": draw(st.sampled_from(names)),
            "dst": draw(st.sampled_from(names)),
            "weight": draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            "t_src": draw(offsets),
            "t_dst": draw(offsets),
            "fn": draw(st.one_of(st.none(), st.sampled_from(BUILTIN_FNS))),
            "temporal_fill": draw(st.sampled_from([m.value for m in TemporalFill])),
            "interpolation_order": draw(st.integers(1, 3)),
        }
        for _ in range(draw(st.integers(1, 5)))
    ]
    return {
        "T": T,
        "spatial_shape": (height, width),
        "d_model": D_MODEL,
        "t_current": 0,
        "regions": regions,
        "connections": connections,
        "dispatcher": {"d_model": D_MODEL, "n_heads": N_HEADS},
    }


@dataclass
class Mutation:
    """One change to a valid description: ``apply(description, value)`` plants ``value``;
    ``error`` is None when the result is still valid, else the exception type and a
    pattern its message must match (``{value}`` stands for ``re.escape(repr(value))``)."""

    name: str
    values: list[Any]
    apply: Callable[[dict[str, Any], Any], None]
    error: tuple[type[Exception], str] | None


def first_region(description: dict[str, Any]) -> dict[str, Any]:
    return next(iter(description["regions"].values()))


def set_region_field(field: str) -> Callable[[dict[str, Any], Any], None]:
    def apply(description: dict[str, Any], value: Any) -> None:
        first_region(description)[field] = value

    return apply


def set_connection_field(field: str) -> Callable[[dict[str, Any], Any], None]:
    def apply(description: dict[str, Any], value: Any) -> None:
        description["connections"][0][field] = value

    return apply


def set_top(field: str) -> Callable[[dict[str, Any], Any], None]:
    def apply(description: dict[str, Any], value: Any) -> None:
        description[field] = value

    return apply


def set_dispatcher(field: str) -> Callable[[dict[str, Any], Any], None]:
    def apply(description: dict[str, Any], value: Any) -> None:
        description["dispatcher"][field] = value

    return apply


def set_bounds(make: Callable[[tuple[int, ...], dict[str, Any]], Any]) -> Callable[[dict[str, Any], Any], None]:
    def apply(description: dict[str, Any], value: Any) -> None:
        region = first_region(description)
        region["bounds"] = make(region["bounds"], description)

    return apply


def use_default_attn(description: dict[str, Any], value: Any) -> None:
    """The first region's default_attn becomes ``value`` and the first connection uses it."""
    name = next(iter(description["regions"]))
    description["regions"][name]["default_attn"] = value
    description["connections"][0].update(src=name, fn=None)


def rename_first_region(description: dict[str, Any], value: Any) -> None:
    name, fields = next(iter(description["regions"].items()))
    description["regions"] = {value: fields, **{k: v for k, v in description["regions"].items() if k != name}}


def leave_canvas(bounds: tuple[int, ...], description: dict[str, Any]) -> tuple[int, ...]:
    return bounds[:3] + (description["spatial_shape"][0] + 1,) + bounds[4:]


MUTATIONS = [
    # Geometry.
    Mutation(
        "T", [0, -1, 2.5, "3", None, True], set_top("T"), (ValueError, r"T must be a positive integer, got {value}")
    ),
    Mutation(
        "d_model", [0, -4, 8.0], set_top("d_model"), (ValueError, r"d_model must be a positive integer, got {value}")
    ),
    Mutation(
        "spatial_shape",
        [(), (0, 2), (2, -1), (2.0, 3), 4, "ab", None],
        set_top("spatial_shape"),
        (ValueError, r"spatial_shape"),
    ),
    Mutation(
        "t_current",
        [-1, 99, 0.5],
        set_top("t_current"),
        (ValueError, r"t_current must be an integer in \[0, T=\d+\], got {value}"),
    ),
    Mutation(
        "regions container",
        [[("r0", (0, 1, 0, 1, 0, 1))], "r0"],
        set_top("regions"),
        (TypeError, r"regions must be a dict"),
    ),
    Mutation(
        "region name",
        ["", 3, None],
        rename_first_region,
        (ValueError, r"region names must be non-empty strings, got {value}"),
    ),
    # Regions.
    Mutation("bounds too short", [None], set_bounds(lambda b, d: b[:4]), (ValueError, r"have 4 entries; .* expects 6")),
    Mutation(
        "bounds too long", [None], set_bounds(lambda b, d: b + (0, 1)), (ValueError, r"have 8 entries; .* expects 6")
    ),
    Mutation("bounds odd length", [None], set_bounds(lambda b, d: b[:5]), (ValueError, r"2 \+ 2\*n_spatial_dims")),
    Mutation(
        "empty range",
        [None],
        set_bounds(lambda b, d: b[:2] + (b[2], b[2]) + b[4:]),
        (ValueError, r"empty or negative range on axis s0"),
    ),
    Mutation(
        "negative bound",
        [None],
        set_bounds(lambda b, d: (-1,) + b[1:]),
        (ValueError, r"empty or negative range on axis t"),
    ),
    Mutation(
        "bounds leave the canvas", [None], set_bounds(leave_canvas), (ValueError, r"leave the canvas on spatial axis 0")
    ),
    Mutation(
        "bounds not integers", [None], set_bounds(lambda b, d: (0.0,) + b[1:]), (ValueError, r"bounds must be integers")
    ),
    Mutation(
        "bounds not a tuple",
        ["0123", None, 3],
        set_region_field("bounds"),
        (ValueError, r"bounds must be a tuple .* got {value}"),
    ),
    Mutation(
        "period",
        [0, -1, 1.5, True, "2"],
        set_region_field("period"),
        (ValueError, r"period must be a positive integer, got {value}"),
    ),
    Mutation(
        "default_attn",
        ["", None, 3],
        set_region_field("default_attn"),
        (ValueError, r"default_attn must be a non-empty .* got {value}"),
    ),
    Mutation(
        "unknown default_attn",
        ["flash"],
        use_default_attn,
        (ValueError, r"connection 0 .*unknown attention type {value}"),
    ),
    Mutation(
        "loss_weight",
        [math.nan, -1.0, math.inf, "1"],
        set_region_field("loss_weight"),
        (ValueError, r"loss_weight must be a finite number >= 0, got {value}"),
    ),
    # Connections.
    Mutation(
        "src",
        ["", None, 3],
        set_connection_field("src"),
        (ValueError, r"src must be a non-empty region name, got {value}"),
    ),
    Mutation(
        "dst",
        ["", None, 3],
        set_connection_field("dst"),
        (ValueError, r"dst must be a non-empty region name, got {value}"),
    ),
    Mutation(
        "unknown region",
        ["ghost"],
        set_connection_field("dst"),
        (ValueError, r"connection 0 .* names region\(s\) \['ghost'\] that the layout lacks"),
    ),
    Mutation(
        "weight",
        [-1.0, math.nan, math.inf, -math.inf, "1", None, True],
        set_connection_field("weight"),
        (ValueError, r"weight must be a finite number >= 0, got {value}"),
    ),
    Mutation(
        "t_src",
        [1.5, "0", True],
        set_connection_field("t_src"),
        (ValueError, r"t_src must be an integer frame offset or None, got {value}"),
    ),
    Mutation(
        "t_dst",
        [1.5, "0", True],
        set_connection_field("t_dst"),
        (ValueError, r"t_dst must be an integer frame offset or None, got {value}"),
    ),
    Mutation(
        "fn",
        ["", 3],
        set_connection_field("fn"),
        (ValueError, r"fn must be a non-empty attention type name or None, got {value}"),
    ),
    Mutation(
        "unknown fn",
        ["flash", "sparse"],
        set_connection_field("fn"),
        (ValueError, r"connection 0 .*unknown attention type {value}; registered types: \["),
    ),
    Mutation(
        "temporal_fill",
        ["bogus", "HOLD", 3],
        set_connection_field("temporal_fill"),
        (ValueError, r"temporal_fill must be one of \['drop', 'hold', 'interpolate'\], got {value}"),
    ),
    Mutation(
        "interpolation_order",
        [0, -1, 1.5, True],
        set_connection_field("interpolation_order"),
        (ValueError, r"interpolation_order must be an integer >= 1, got {value}"),
    ),
    Mutation(
        "connection object",
        [("r0", "r0"), "r0->r0", None],
        lambda d, v: d["connections"].append(v),
        (TypeError, r"connection \d+ must be a Connection, got \w+ {value}"),
    ),
    # The dispatcher's own arguments.
    Mutation(
        "n_heads",
        [0, -2, 2.0, None],
        set_dispatcher("n_heads"),
        (ValueError, r"n_heads must be a positive integer, got {value}"),
    ),
    Mutation(
        "n_heads not dividing",
        [3, 16],
        set_dispatcher("n_heads"),
        (ValueError, r"d_model=8 is not divisible by n_heads={value}"),
    ),
    Mutation(
        "dispatcher d_model",
        [0, "8", 7.0],
        set_dispatcher("d_model"),
        (ValueError, r"d_model must be a positive integer, got {value}"),
    ),
    Mutation(
        "dropout",
        [-0.1, 1.5, math.nan, "0.1", None],
        set_dispatcher("dropout"),
        (ValueError, r"dropout must be a probability in \[0, 1\], got {value}"),
    ),
    # Unusual but valid: these must build and match the oracle.
    Mutation(
        "numpy integers",
        [None],
        lambda d, v: d.update(T=np.int64(d["T"]), spatial_shape=tuple(np.int32(s) for s in d["spatial_shape"])),
        None,
    ),
    Mutation("numpy bounds", [None], set_bounds(lambda b, d: tuple(np.int64(x) for x in b)), None),
    Mutation("list bounds", [None], set_bounds(lambda b, d: list(b)), None),
    Mutation("numpy period", [np.int64(2)], set_region_field("period"), None),
    Mutation(
        "numpy offsets", [np.int64(0), np.int16(-1)], lambda d, v: d["connections"][0].update(t_src=v, t_dst=v), None
    ),
    Mutation("numpy weight", [np.float32(0.75), np.float64(2.0), 3], set_connection_field("weight"), None),
    Mutation("offset outside the canvas", [7, -9], set_connection_field("t_src"), None),
    Mutation("layout d_model differs", [4, 64], set_top("d_model"), None),
    Mutation("numpy heads", [np.int64(2)], set_dispatcher("n_heads"), None),
    Mutation("duplicate connection", [None], lambda d, v: d["connections"].append(dict(d["connections"][0])), None),
]


def check_against_oracle(dispatcher: AttentionDispatcher, x: torch.Tensor, active=None) -> None:
    """Ours equals the oracle where the oracle is finite and is finite there; every
    connection either runs a segment or is listed by ``explain()``."""
    expected = reference_forward(dispatcher, x, active)
    actual = dispatcher(x, active)
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all(), "a NaN or Inf where the oracle has a finite value"
    if bool(torch.isfinite(x).all()):
        assert finite.all(), "the oracle itself made a NaN from finite input"
    assert_all_close({"output": actual[finite]}, {"output": expected[finite]}, 1e-10, 1e-14)
    running = {s.connection_index for s in dispatcher.segments if active is None or s.src in active}
    explained = dispatcher.explain(active)
    for index in range(len(dispatcher.topology.connections)):
        if index not in running:
            assert f"connection {index} (" in explained, (
                f"connection {index} runs nothing and explain() does not say so"
            )


@settings(max_examples=150, deadline=None)
@given(descriptions(), st.sampled_from(MUTATIONS), st.data())
def test_a_bad_declaration_is_named_and_a_valid_one_matches_the_oracle(description, mutation, data):
    """A random valid canvas with one planted value: a bad one raises the listed error
    whose message names the value; an unusual valid one (NumPy numbers, list bounds, offsets
    outside the canvas, duplicates) builds and matches the oracle."""
    value = data.draw(st.sampled_from(mutation.values), label="value")
    mutation.apply(description, value)
    if mutation.error is not None:
        error, pattern = mutation.error
        with pytest.raises(error, match=pattern.replace("{value}", re.escape(repr(value)))):
            build(description)
        return
    torch.manual_seed(0)
    dispatcher = build(description).double()
    check_against_oracle(dispatcher, torch.randn(2, dispatcher.layout.num_positions, D_MODEL, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.tuples(st.integers(1, 3), st.integers(1, 3)),
    st.lists(st.lists(st.integers(-1, 4), min_size=0, max_size=8), min_size=1, max_size=3),
)
def test_random_bounds_are_accepted_exactly_when_they_are_a_box_in_the_canvas(T, spatial_shape, boxes):
    """Bounds drawn at random (any length, negative, empty, overlapping, past the edge):
    a layout is built exactly when every box has 6 entries with 0 <= lo < hi <= size on
    each axis; otherwise the error names the region. A built one runs every region against
    every other, as the oracle does."""
    extents = (T,) + spatial_shape
    regions = {f"r{i}": tuple(box) for i, box in enumerate(boxes)}

    def is_box(box):
        return len(box) == 6 and all(0 <= box[2 * a] < box[2 * a + 1] <= extents[a] for a in range(3))

    if not all(is_box(box) for box in boxes):
        first_bad = next(name for name, box in regions.items() if not is_box(box))
        with pytest.raises(ValueError, match=rf"region '{first_bad}'"):
            CanvasLayout(T=T, spatial_shape=spatial_shape, d_model=D_MODEL, regions=regions)
        return
    layout = CanvasLayout(T=T, spatial_shape=spatial_shape, d_model=D_MODEL, regions=regions)
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(CanvasTopology.dense(list(regions)), layout, D_MODEL, N_HEADS).double()
    check_against_oracle(dispatcher, torch.randn(2, layout.num_positions, D_MODEL, dtype=torch.float64))


def test_wrong_classes_and_create_attention_arguments():
    layout = CanvasLayout(T=1, spatial_shape=(2,), d_model=D_MODEL, regions={"r": (0, 1, 0, 2)})
    topology = CanvasTopology([Connection("r", "r")])
    with pytest.raises(TypeError, match="topology must be a CanvasTopology, got list"):
        AttentionDispatcher([Connection("r", "r")], layout, D_MODEL, N_HEADS)
    with pytest.raises(TypeError, match="layout must be a CanvasLayout, got dict"):
        AttentionDispatcher(topology, {"r": (0, 1, 0, 2)}, D_MODEL, N_HEADS)
    with pytest.raises(TypeError, match="connections must be a list of Connection, got NoneType"):
        AttentionDispatcher(CanvasTopology(None), layout, D_MODEL, N_HEADS)
    with pytest.raises(TypeError, match="fn_name must be a string, got list"):
        create_attention(["cross_attention"], D_MODEL, N_HEADS)
    with pytest.raises(
        TypeError, match=r"'local_attention' \(LocalAttention\) takes no option 'window'; its options: window_size=8"
    ):
        create_attention("local_attention", D_MODEL, N_HEADS, window=3)
    with pytest.raises(ValueError, match=r"sparse_attention: dropout must be a probability in \[0, 1\], got -0.5"):
        create_attention("sparse_attention", D_MODEL, N_HEADS, dropout=-0.5)


# ---------------------------------------------------------------- edges that run nothing


def test_edges_that_run_nothing_are_listed_with_the_reason():
    """Offsets outside the canvas, fills that find nothing, inactive sources and regions
    skipped with strict=False run no segment (0.5.0 computes the same numbers) and
    ``explain()`` names each one."""
    layout = CanvasLayout(T=3, spatial_shape=(4,), d_model=D_MODEL, regions={"a": (0, 3, 0, 2), "b": (1, 3, 2, 4)})
    topology = CanvasTopology(
        [
            Connection("a", "b"),
            Connection("a", "b", t_src=5, t_dst=0),
            Connection("a", "b", t_src=0, t_dst=-2, temporal_fill="drop"),
            Connection("b", "a", t_src=0, t_dst=-1, temporal_fill="hold"),
            Connection("a", "ghost"),
        ]
    )
    with pytest.warns(UserWarning, match="ghost"):
        dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS, strict=False)
    assert {s.connection_index for s in dispatcher.segments} == {0, 3}
    text = dispatcher.explain()
    assert "3 connection(s) run nothing:" in text
    assert "connection 1 ('a' -> 'b'): t_src=5 selects no frame of 'a' (frames 0..2)" in text
    assert (
        "connection 2 ('a' -> 'b'): t_dst=-2 with temporal_fill='drop' reads no frame of 'b' (real frames [1, 2])"
        in text
    )
    assert "connection 4 ('a' -> 'ghost'): names region(s) ['ghost'] that the layout lacks" in text
    assert "connection 3 ('b' -> 'a'): src 'b' is not in active_regions" in dispatcher.explain({"a"})
    x = torch.randn(2, layout.num_positions, D_MODEL, dtype=torch.float64)
    check_against_oracle(dispatcher.double(), x)


# ---------------------------------------------------------------- weights


@settings(max_examples=25, deadline=None)
@given(canvases(), st.sampled_from([2.0**1020, 2.0**-1030]))
def test_weights_at_the_float64_limits_give_the_same_average(canvas, scale):
    """Scaling every weight by 2**1020 (sums past 1.8e308) or 2**-1030 (subnormal weights,
    whose reciprocal overflows) leaves each position's weighted average unchanged."""
    topology, layout, skip_temporal, active = canvas
    scaled = CanvasTopology([Connection(**{**vars(c), "weight": c.weight * scale}) for c in topology.connections])
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS, skip_temporal=skip_temporal).double()
    extreme = AttentionDispatcher(scaled, layout, D_MODEL, N_HEADS, skip_temporal=skip_temporal).double()
    extreme.load_state_dict(dispatcher.state_dict())
    x = torch.randn(2, layout.num_positions, D_MODEL, dtype=torch.float64)
    output = extreme(x, active)
    assert torch.isfinite(output).all()
    assert_all_close({"output": output}, {"output": reference_forward(dispatcher, x, active)}, 1e-10, 1e-14)


# ---------------------------------------------------------------- values of x


@st.composite
def hidden_states(draw, layout: CanvasLayout, dtype=torch.float64):
    """``(B, P, D)`` on the grid of ``grid_inputs`` (so that top-k ties are exact ties) with
    some entries replaced by NaN, +Inf or -Inf, and a pattern: Gaussian, all equal (every
    logit ties), or repeated rows (ties within a row)."""
    batch = draw(st.integers(1, 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = grid_inputs(torch.randn(batch, layout.num_positions, D_MODEL, generator=generator, dtype=dtype))
    pattern = draw(st.sampled_from(["gaussian", "constant", "repeated rows"]))
    if pattern == "constant":
        x = torch.full_like(x, 0.5)
    elif pattern == "repeated rows":
        x = x[:, torch.arange(layout.num_positions) % 2]
    x = x.clone()
    spots = draw(
        st.lists(
            st.tuples(st.integers(0, batch - 1), st.integers(0, layout.num_positions - 1), st.integers(0, D_MODEL - 1)),
            max_size=3,
        )
    )
    for b, p, d in spots:
        x[b, p, d] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


@settings(max_examples=60, deadline=None)
@given(canvases(), st.data())
def test_nan_and_inf_reach_only_the_positions_the_oracle_gives_them(canvas, data):
    """A NaN or Inf in x shows up only where the edge-by-edge oracle has it (packing rows
    of several edges into one batch must not spread it), and finite x gives finite output;
    ties (constant x, repeated rows) change nothing: they are exact (``make_top_k_ties_exact``),
    so the packed dispatcher and the edge-by-edge oracle keep the same keys."""
    topology, layout, skip_temporal, active = canvas
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS, skip_temporal=skip_temporal).double()
    make_top_k_ties_exact(dispatcher)
    check_against_oracle(dispatcher, data.draw(hidden_states(layout)), active)


@settings(max_examples=30, deadline=None)
@given(canvases())
def test_zero_batch_gives_an_empty_output(canvas):
    topology, layout, skip_temporal, active = canvas
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS, skip_temporal=skip_temporal)
    x = torch.randn(0, layout.num_positions, D_MODEL, requires_grad=True)
    output = dispatcher(x, active)
    assert output.shape == x.shape and output.dtype == x.dtype
    parameters = [p for p in dispatcher.parameters() if p.requires_grad]
    grads = torch.autograd.grad(output.sum(), [x] + parameters, allow_unused=True)
    assert grads[0].shape == x.shape
    for grad in grads[1:]:
        assert grad is None or not grad.any()


@pytest.mark.parametrize("name", sorted(BUILTIN_ATTENTION))
def test_zero_batch_runs_every_module(name):
    """Each module, called directly with B = 0, gives an empty output and a backward."""
    module = create_attention(name, D_MODEL, N_HEADS)
    queries = torch.randn(0, 3, D_MODEL, requires_grad=True)
    keys = torch.randn(0, 5, D_MODEL, requires_grad=True)
    output = module(queries, keys, keys)
    assert output.shape == (0, 3, D_MODEL)
    if output.requires_grad:
        output.sum().backward()


def strided_copy(x: torch.Tensor, order: tuple[int, ...], step: int, expand: bool) -> torch.Tensor:
    """A view equal to ``x`` whose memory follows ``order`` (a permutation of (B, P, D)),
    every ``step``-th element of a larger buffer, or a batch broadcast with stride 0."""
    if expand:
        return x[:1].expand_as(x)
    buffer = torch.zeros([x.shape[a] * (step if a == order[-1] else 1) for a in order], dtype=x.dtype)
    view = buffer[..., ::step].permute([order.index(a) for a in range(3)])
    view.copy_(x)
    return view


@settings(max_examples=30, deadline=None)
@given(canvases(), st.permutations([0, 1, 2]), st.sampled_from([1, 2, 3]), st.booleans())
def test_strided_inputs_give_what_their_contiguous_copies_give(canvas, order, step, expand):
    """Transposed views, strided slices, channels-last-like layouts and stride-0 batches
    give the outputs and gradients (x and every parameter) of the contiguous copy."""
    topology, layout, skip_temporal, active = canvas
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS, skip_temporal=skip_temporal).double()
    x = torch.randn(2, layout.num_positions, D_MODEL, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn_like(x)
    names = ["output", "x"] + [name for name, _ in dispatcher.named_parameters()]
    results = []
    for contiguous in (False, True):
        view = strided_copy(x, tuple(order), step, expand)
        output = dispatcher(view.contiguous() if contiguous else view, active)
        grads = torch.autograd.grad(output, [x, *dispatcher.parameters()], cotangent, allow_unused=True)
        results.append(dict(zip(names, [output, *grads])))
    assert_all_close(results[0], results[1], 1e-12, 1e-14)


# ---------------------------------------------------------------- dtypes, devices, shapes


def every_type_dispatcher() -> AttentionDispatcher:
    """One edge of every built-in type (and the custom one) on a small canvas."""
    layout = CanvasLayout(
        T=2,
        spatial_shape=(2, 3),
        d_model=D_MODEL,
        regions={"a": (0, 2, 0, 1, 0, 3), "b": (0, 2, 1, 2, 0, 2), "c": (1, 2, 0, 2, 1, 3)},
    )
    pairs = [("a", "b"), ("b", "a"), ("c", "a"), ("a", "c"), ("b", "c"), ("c", "c")]
    connections = [
        Connection(*pairs[i % len(pairs)], fn=fn, t_src=0 if i % 3 == 0 else None, t_dst=0 if i % 3 == 0 else None)
        for i, fn in enumerate(FNS)
    ]
    torch.manual_seed(0)
    return AttentionDispatcher(CanvasTopology(connections), layout, D_MODEL, N_HEADS)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64, torch.complex128]
)
def test_non_floating_x_is_a_type_error(dtype):
    dispatcher = every_type_dispatcher()
    x = torch.zeros(2, dispatcher.layout.num_positions, D_MODEL, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x must be a floating-point tensor of shape \(B, 12, 8\), got {dtype}"):
        dispatcher(x)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_x_in_another_float_dtype_names_both(x_dtype):
    dispatcher = every_type_dispatcher()
    with pytest.raises(ValueError, match=rf"x is {x_dtype} on cpu but the parameters are torch.float32 on cpu"):
        dispatcher(torch.zeros(2, dispatcher.layout.num_positions, D_MODEL, dtype=x_dtype))


# float16 / bfloat16 keep 11 / 8 significant bits: unit roundoff 2**-11 / 2**-8; the
# output's relative error against float64 stays within 8 unit roundoffs.
HALF_TOLERANCE = {torch.float16: 8 * 2.0**-11, torch.bfloat16: 8 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", FNS)
def test_half_precision_on_cpu_runs_every_type(fn, dtype):
    """A dispatcher moved to float16/bfloat16 runs on CPU and stays within a few units of
    that format's rounding of the float64 oracle."""
    layout = CanvasLayout(
        T=2, spatial_shape=(2, 3), d_model=D_MODEL, regions={"a": (0, 2, 0, 1, 0, 3), "b": (0, 2, 1, 2, 0, 2)}
    )
    torch.manual_seed(0)
    topology = CanvasTopology(
        [Connection("a", "b", fn=fn), Connection("b", "a", fn=fn, t_src=0, t_dst=0), Connection("b", "b", fn=fn)]
    )
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS)
    x = torch.randn(2, layout.num_positions, D_MODEL, dtype=torch.float64)
    expected = reference_forward(dispatcher.double(), x)
    output = dispatcher.to(dtype)(x.to(dtype))
    assert output.dtype == dtype and torch.isfinite(output).all()
    assert_all_close({"output": output}, {"output": expected}, HALF_TOLERANCE[dtype], 0.0)


def test_meta_tensors():
    """x on meta against CPU parameters names both devices; a dispatcher of every type
    moves to meta (deferred initialisation), refuses a forward there (no data), and
    comes back with to_empty + load_state_dict equal to the original."""
    dispatcher = every_type_dispatcher()
    x = torch.randn(2, dispatcher.layout.num_positions, D_MODEL)
    with pytest.raises(ValueError, match="x is torch.float32 on meta but the parameters are torch.float32 on cpu"):
        dispatcher(x.to("meta"))
    state = dispatcher.state_dict()
    expected = dispatcher(x)
    dispatcher.to("meta")
    with pytest.raises(ValueError, match="x is on the meta device, which holds no data"):
        dispatcher(x.to("meta"))
    dispatcher.to_empty(device="cpu")
    dispatcher.load_state_dict(state)
    assert torch.equal(dispatcher(x), expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 13), min_size=0, max_size=4))
def test_a_wrong_shape_names_the_expected_and_the_received(shape):
    dispatcher = every_type_dispatcher()
    x = torch.zeros(shape)
    if len(shape) == 3 and shape[1:] == [12, D_MODEL]:
        assert dispatcher(x).shape == x.shape
        return
    with pytest.raises(ValueError, match=re.escape(f"expected x of shape ('B', 12, 8), got {tuple(shape)}")):
        dispatcher(x)


@pytest.mark.parametrize(
    "x", [None, 1.0, [[0.0] * 8] * 12, np.zeros((1, 12, 8))], ids=["None", "float", "list", "ndarray"]
)
def test_x_that_is_not_a_tensor_is_a_type_error(x):
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor of shape \(B, 12, 8\), got"):
        every_type_dispatcher()(x)


def test_active_regions_forms():
    """Any collection of names works like the set; a bare string, a non-string entry and
    an unknown name are named."""
    dispatcher = every_type_dispatcher()
    x = torch.randn(1, dispatcher.layout.num_positions, D_MODEL)
    expected = dispatcher(x, {"a", "c"})
    for form in (["c", "a"], ("a", "c"), frozenset({"a", "c"}), (name for name in "ac"), {"a": 1, "c": 2}.keys()):
        assert torch.equal(dispatcher(x, form), expected)
    with pytest.raises(TypeError, match=r"got the string 'a'; pass \{'a'\} for one region"):
        dispatcher(x, "a")
    with pytest.raises(TypeError, match=r"must hold region names \(strings\), got \[3\]"):
        dispatcher(x, ["a", 3])
    with pytest.raises(ValueError, match=r"unknown region\(s\) \['ghost'\]; layout regions: \['a', 'b', 'c'\]"):
        dispatcher(x, {"a", "ghost"})
    with pytest.raises(ValueError, match=r"unknown region\(s\) \['ghost'\]"):
        dispatcher.explain({"ghost"})
    assert torch.equal(dispatcher(x, set()), x)
    assert_matches_reference(dispatcher.double(), x.double(), {"a", "c"})
