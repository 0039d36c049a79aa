"""AttentionDispatcher: the compiled segments against the edge-by-edge oracle, the
deviations from canvas-engineering 0.5.0, and the errors for bad input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from conftest import assert_all_close
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.dispatcher import reference_forward

from canvas_engineering import (
    ATTENTION_REGISTRY,
    BUILTIN_ATTENTION,
    AttentionDispatcher,
    CanvasLayout,
    CanvasTopology,
    Connection,
    RegionSpec,
    TemporalFill,
)
from canvas_engineering.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("scaled_mean_registered")
FNS = sorted(BUILTIN_ATTENTION) + ["scaled_mean"]
"""Every built-in type and the custom one; a module that draws from it uses the
``scaled_mean_registered`` fixture."""


def assert_matches_reference(dispatcher, x, active_regions=None, tolerance=1e-10, zero_floor=1e-14):
    """Output and the gradients of x and of every parameter equal the oracle's. A gradient
    that does not reach a leaf counts as zero (an output that depends on no input, as when
    every edge is of type none, needs no graph at all)."""
    cotangent = torch.randn_like(x)
    names = ["output", "x"] + [name for name, _ in dispatcher.named_parameters()]
    results = []
    for run in (dispatcher, lambda inputs, active: reference_forward(dispatcher, inputs, active)):
        inputs = x.clone().requires_grad_(True)
        leaves = [inputs, *dispatcher.parameters()]
        output = run(inputs, active_regions)
        grads = (
            torch.autograd.grad(output, leaves, cotangent, allow_unused=True)
            if output.requires_grad
            else [None] * len(leaves)
        )
        results.append(
            dict(zip(names, [output, *(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))]))
        )
    assert_all_close(results[0], results[1], tolerance, zero_floor)


@st.composite
def canvases(draw):
    """A random canvas: regions with random boxes and periods, edges with random fns,
    weights, offsets and fill modes."""
    T = draw(st.integers(1, 4))
    height, width = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    names = [f"r{i}" for i in range(draw(st.integers(1, 4)))]
    regions = {}
    for name in names:
        t0 = draw(st.integers(0, T - 1))
        h0, w0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        regions[name] = RegionSpec(
            (
                t0,
                draw(st.integers(t0 + 1, T)),
                h0,
                draw(st.integers(h0 + 1, height)),
                w0,
                draw(st.integers(w0 + 1, width)),
            ),
            period=draw(st.integers(1, 3)),
            default_attn=draw(st.sampled_from(FNS)),
        )
    offsets = st.one_of(st.none(), st.integers(-2, 1))
    connections = [
        Connection(
            draw(st.sampled_from(names)),
            draw(st.sampled_from(names)),
            weight=draw(st.sampled_from([0.0, 0.25, 1.0, 2.5])),
            t_src=draw(offsets),
            t_dst=draw(offsets),
            fn=draw(st.one_of(st.none(), st.sampled_from(FNS))),
            temporal_fill=draw(st.sampled_from(list(TemporalFill))),
            interpolation_order=draw(st.integers(1, 3)),
        )
        for _ in range(draw(st.integers(1, 6)))
    ]
    layout = CanvasLayout(T=T, spatial_shape=(height, width), d_model=8, regions=regions)
    active = draw(st.one_of(st.none(), st.sets(st.sampled_from(names))))
    return CanvasTopology(connections), layout, draw(st.booleans()), active


@settings(max_examples=60, deadline=None)
@given(canvases(), st.sampled_from([torch.float64, torch.float32]))
def test_random_canvases_match_the_oracle(canvas, dtype):
    """The plan (all segments of a type in one call) equals the edge-by-edge oracle: within
    1e-10 relative (plus 1e-14 of the whole result's norm) in float64, and 1e-5 (plus 1e-7)
    in float32."""
    topology, layout, skip_temporal, active = canvas
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, d_model=8, n_heads=2, skip_temporal=skip_temporal).to(dtype)
    x = torch.randn(2, layout.num_positions, 8, dtype=dtype)
    if dtype == torch.float64:
        assert_matches_reference(dispatcher, x, active)
    else:
        assert_matches_reference(dispatcher, x, active, tolerance=1e-5, zero_floor=1e-7)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_match_the_oracle(recipe):
    topology, layout = RECIPES[recipe](T=2, grid=4, d_model=16)
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, d_model=16, n_heads=4).double()
    assert_matches_reference(dispatcher, torch.randn(2, layout.num_positions, 16, dtype=torch.float64))


def single_region(T=3, fn="cross_attention"):
    return CanvasLayout(T=T, spatial_shape=(2,), d_model=8, regions={"r": RegionSpec((0, T, 0, 2), default_attn=fn)})


def test_each_connection_uses_its_own_offsets():
    """Deviation 1: causal_temporal's previous-frame self edge reads the previous frame
    (the peer runs it as a second same-frame edge, so frame t never sees frame t-1)."""
    layout = single_region()
    dispatcher = AttentionDispatcher(CanvasTopology.causal_temporal(["r"]), layout, d_model=8, n_heads=2)
    x = torch.randn(1, 6, 8, requires_grad=True)
    output = dispatcher(x)
    (grad,) = torch.autograd.grad(output[0, 2:4].sum(), x)
    assert grad[0, 0:2].abs().sum() > 0, "frame 1 must read frame 0"
    assert grad[0, 4:6].abs().sum() == 0, "frame 1 must not read frame 2"
    same_frame_only = AttentionDispatcher(
        CanvasTopology([Connection("r", "r", t_src=0, t_dst=0), Connection("r", "r", t_src=0, t_dst=0)]), layout, 8, 2
    )
    same_frame_only.load_state_dict(dispatcher.state_dict())
    assert not torch.allclose(same_frame_only(x), output)


@pytest.mark.parametrize("fn", ["local_attention", "sparse_attention", "random_fixed"])
def test_query_without_keys_gets_zeros_not_nan(fn):
    """Deviation 2: with N > M a local window can be empty; the attended value is then 0,
    so the module returns out_proj's bias for that row."""
    torch.manual_seed(0)
    layout = CanvasLayout(T=1, spatial_shape=(40,), d_model=8, regions={"big": (0, 1, 0, 36), "small": (0, 1, 36, 40)})
    dispatcher = AttentionDispatcher(CanvasTopology([Connection("big", "small", fn=fn)]), layout, 8, 2)
    x = torch.randn(2, 40, 8, requires_grad=True)
    output = dispatcher(x)
    output.sum().backward()
    assert torch.isfinite(output).all() and torch.isfinite(x.grad).all()
    if fn == "local_attention":
        module = dispatcher.fn_modules["local_attention"]
        from canvas_engineering.ops.local import window_keep

        keep = window_keep(
            torch.arange(36).view(-1, 1),
            torch.arange(4).view(1, -1),
            torch.tensor(36),
            torch.tensor(4),
            module.window_size,
        )
        empty_rows = (~keep).all(dim=1)
        assert empty_rows.any()
        assert torch.allclose(output[:, :36][:, empty_rows], module.out_proj.bias.expand(2, int(empty_rows.sum()), 8))


def test_missing_region_is_an_error_unless_not_strict():
    """Deviation 4: the peer drops such an edge silently."""
    layout = single_region()
    topology = CanvasTopology([Connection("r", "r"), Connection("r", "ghost")])
    with pytest.raises(ValueError, match=r"connection 1 \('r' -> 'ghost'\) names region\(s\) \['ghost'\]"):
        AttentionDispatcher(topology, layout, 8, 2)
    with pytest.warns(UserWarning, match="ghost.*skipped"):
        lenient = AttentionDispatcher(topology, layout, 8, 2, strict=False)
    plain = AttentionDispatcher(CanvasTopology([Connection("r", "r")]), layout, 8, 2)
    plain.load_state_dict(lenient.state_dict())
    x = torch.randn(2, 6, 8)
    assert torch.equal(lenient(x), plain(x))


def test_unattended_positions_pass_through():
    layout = CanvasLayout(T=1, spatial_shape=(5,), d_model=8, regions={"a": (0, 1, 0, 2), "b": (0, 1, 2, 4)})
    dispatcher = AttentionDispatcher(CanvasTopology([Connection("a", "b")]), layout, 8, 2)
    x = torch.randn(3, 5, 8)
    output = dispatcher(x)
    assert torch.equal(output[:, 2:], x[:, 2:])
    assert not torch.allclose(output[:, :2], x[:, :2])
    assert torch.equal(dispatcher(x, active_regions={"b"}), x)


def test_custom_registered_type_runs_in_a_dispatcher():
    class Negate(nn.Module):
        def __init__(self, d_model, n_heads=4, dropout=0.0):
            super().__init__()

        def forward(self, queries, keys, values):
            return -values.mean(dim=1, keepdim=True).expand_as(queries)

    ATTENTION_REGISTRY["negate_mean"] = Negate
    try:
        layout = CanvasLayout(T=1, spatial_shape=(4,), d_model=8, regions={"a": (0, 1, 0, 2), "b": (0, 1, 2, 4)})
        dispatcher = AttentionDispatcher(CanvasTopology([Connection("a", "b", fn="negate_mean")]), layout, 8, 2)
        x = torch.randn(2, 4, 8)
        assert torch.allclose(dispatcher(x)[:, :2], -x[:, 2:].mean(dim=1, keepdim=True).expand(2, 2, 8))
    finally:
        del ATTENTION_REGISTRY["negate_mean"]


def test_unknown_fn_lists_known_names():
    layout = single_region()
    with pytest.raises(
        ValueError, match=r"connection 0 \('r' -> 'r'\): unknown attention type 'flash'.*'cross_attention'"
    ):
        AttentionDispatcher(CanvasTopology([Connection("r", "r", fn="flash")]), layout, 8, 2)
    with pytest.raises(ValueError, match="unknown attention type 'sparse'"):
        AttentionDispatcher(CanvasTopology([Connection("r", "r")]), single_region(fn="sparse"), 8, 2)


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        AttentionDispatcher(CanvasTopology([Connection("r", "r")]), single_region(), 10, 4)


def test_bounds_checked_again_at_construction():
    layout = single_region()
    layout.regions["late"] = (0, 9, 0, 2)
    with pytest.raises(ValueError, match="region 'late'.*leave the canvas on T"):
        AttentionDispatcher(CanvasTopology([Connection("r", "r")]), layout, 8, 2)


def test_bad_forward_input_names_both_shapes():
    dispatcher = AttentionDispatcher(CanvasTopology([Connection("r", "r")]), single_region(), 8, 2)
    with pytest.raises(ValueError, match=r"expected x of shape \('B', 6, 8\), got \(2, 5, 8\)"):
        dispatcher(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"expected x of shape \('B', 6, 8\), got \(6, 8\)"):
        dispatcher(torch.randn(6, 8))
    with pytest.raises(TypeError, match="floating-point"):
        dispatcher(torch.ones(2, 6, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="x is torch.float64 on cpu but the parameters are torch.float32 on cpu"):
        dispatcher(torch.randn(2, 6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x is torch.float32 on meta but the parameters are torch.float32 on cpu"):
        dispatcher(torch.randn(2, 6, 8, device="meta"))
    with pytest.raises(ValueError, match=r"active_regions names unknown region\(s\) \['ghost'\]"):
        dispatcher(torch.randn(2, 6, 8), active_regions={"ghost"})


def test_zero_batch_runs():
    dispatcher = AttentionDispatcher(CanvasTopology([Connection("r", "r")]), single_region(), 8, 2)
    assert dispatcher(torch.randn(0, 6, 8)).shape == (0, 6, 8)


def test_modules_exist_for_edges_that_never_run():
    """An edge whose every frame is dropped still owns its module, so state_dicts match."""
    layout = CanvasLayout(T=2, spatial_shape=(2,), d_model=8, regions={"a": (0, 2, 0, 1), "b": (0, 1, 1, 2)})
    topology = CanvasTopology([Connection("a", "b", t_src=0, t_dst=5, temporal_fill="drop", fn="rwkv")])
    dispatcher = AttentionDispatcher(topology, layout, 8, 2)
    assert list(dispatcher.fn_modules) == ["rwkv"] and dispatcher.segments == []
    x = torch.randn(1, 4, 8)
    assert torch.equal(dispatcher(x), x)


OPTIONS = {"hyena": {"max_len": 64}, "local_attention": {"window_size": 3}, "sparse_attention": {"top_k": 2}}


def options_dispatcher(fn_kwargs=OPTIONS, seed=0):
    """A 36-position canvas whose four edges run hyena, local, top-k and RWKV attention."""
    layout = CanvasLayout(
        T=2, spatial_shape=(18,), d_model=8, regions={"a": (0, 2, 0, 6), "b": (0, 2, 6, 12), "c": (0, 2, 12, 18)}
    )
    topology = CanvasTopology(
        [
            Connection("a", "b", fn="hyena"),
            Connection("b", "c", fn="local_attention"),
            Connection("c", "a", fn="sparse_attention"),
            Connection("a", "a", fn="rwkv"),
        ]
    )
    torch.manual_seed(seed)
    return AttentionDispatcher(topology, layout, d_model=8, n_heads=2, fn_kwargs=fn_kwargs)


def test_fn_kwargs_build_each_type_with_its_options():
    """Each named type is built with its options (a copy: changing the caller's dict later
    changes nothing); the plan runs them as the edge-by-edge oracle does; options that leave
    the parameters' shapes alone leave the initialisation alone (same seed, same state_dict)
    and change the function."""
    given = {name: dict(options) for name, options in OPTIONS.items()}
    dispatcher = options_dispatcher(given)
    given["hyena"]["max_len"] = 8
    modules = dispatcher.fn_modules
    assert (modules["hyena"].max_len, modules["local_attention"].window_size, modules["sparse_attention"].top_k) == (
        64,
        3,
        2,
    )
    assert dispatcher.fn_kwargs == OPTIONS and modules["hyena"].filter_params[0].shape == (8, 64 // 2 + 1, 2)
    hyena_only = options_dispatcher({"hyena": {"max_len": 64}})
    state, other_state = dispatcher.state_dict(), hyena_only.state_dict()
    assert state.keys() == other_state.keys() and all(torch.equal(state[key], other_state[key]) for key in state)
    x = torch.randn(2, 36, 8, dtype=torch.float64)
    assert_matches_reference(dispatcher.double(), x)
    assert not torch.allclose(dispatcher(x)[:, 6:], hyena_only.double()(x)[:, 6:])


@pytest.mark.parametrize(
    "fn_kwargs, error, message",
    [
        (
            {"hyena": {"max_lenn": 8}},
            TypeError,
            r"fn_kwargs: 'hyena' \(HyenaAttention\) takes no option 'max_lenn'; its options: order=2, max_len=4096",
        ),
        (
            {"local_attention": {"dropout": 0.5}},
            TypeError,
            r"takes no option 'dropout'; its options: window_size=8 \(d_model, n_heads and dropout are set",
        ),
        ({"hyenna": {}}, ValueError, r"fn_kwargs: unknown attention type 'hyenna'; registered types: \[.*'hyena'"),
        (
            {"mamba": {}},
            ValueError,
            r"options for 'mamba', which no connection runs; "
            r"the connections run \['hyena', 'local_attention', 'rwkv', 'sparse_attention'\]",
        ),
        ({"hyena": {"max_len": 0}}, ValueError, "HyenaAttention: max_len must be a positive integer, got 0"),
        (
            {"sparse_attention": {"top_k": 1.5}},
            ValueError,
            "SparseAttention: top_k must be a positive integer, got 1.5",
        ),
        ([("hyena", {})], TypeError, "fn_kwargs must be a dict of attention type name -> dict of options, got list"),
        ({"hyena": 64}, TypeError, r"fn_kwargs\['hyena'\] must be a dict of option name \(string\) -> value, got 64"),
        ({3: {}}, TypeError, "fn_kwargs keys must be attention type names .strings., got 3"),
    ],
)
def test_bad_fn_kwargs_are_refused_at_construction(fn_kwargs, error, message):
    with pytest.raises(error, match=message):
        options_dispatcher(fn_kwargs)


def test_explain_and_repr_show_the_options():
    """explain() gives every type's options, defaults included; repr the ones given."""
    dispatcher = options_dispatcher()
    rows = {line.split()[0]: line.rstrip() for line in dispatcher.explain().splitlines()[2:6]}
    assert rows["hyena"].endswith("  order=2, max_len=64") and rows["local_attention"].endswith("  window_size=3")
    assert rows["sparse_attention"].endswith("  top_k=2") and rows["rwkv"].endswith("  -")
    assert f"fn_kwargs={OPTIONS}" in repr(dispatcher)
    assert "fn_kwargs" not in repr(options_dispatcher(None))


def test_fn_kwargs_survive_copies_pickling_and_moves():
    """deepcopy and pickle keep the options (the attribute, repr, explain, the modules) and
    the function; .to(float64) keeps them and still runs as the oracle does."""
    dispatcher = options_dispatcher()
    x = torch.randn(2, 36, 8)
    expected = dispatcher(x)
    for duplicate in (copy.deepcopy(dispatcher), pickle.loads(pickle.dumps(dispatcher))):
        assert duplicate.fn_kwargs == OPTIONS and duplicate.fn_modules["hyena"].max_len == 64
        assert repr(duplicate) == repr(dispatcher) and duplicate.explain() == dispatcher.explain()
        assert torch.equal(duplicate(x), expected)
    moved = copy.deepcopy(dispatcher).to(torch.float64)
    assert moved.fn_kwargs == OPTIONS and moved.explain() == dispatcher.explain()
    assert_matches_reference(moved, x.double())


def test_hyena_over_16384_positions_through_fn_kwargs():
    """One Hyena edge over a 16384-position canvas: with the default filters (max_len=4096)
    the forward is refused; with fn_kwargs={"hyena": {"max_len": 16384}} forward and backward
    match the edge-by-edge oracle. The canvas is one circular convolution of 16384 steps
    (and the rest is position-wise), so rolling input and cotangent by s positions rolls the
    output by s and leaves every parameter gradient as it was."""
    layout = CanvasLayout(T=16, spatial_shape=(1024,), d_model=4, regions={"line": (0, 16, 0, 1024)})
    topology = CanvasTopology([Connection("line", "line", fn="hyena")])
    with pytest.raises(ValueError, match="16384 queries need an FFT of length 16384, longer than max_len=4096"):
        AttentionDispatcher(topology, layout, d_model=4, n_heads=1)(torch.randn(1, 16384, 4))
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(
        topology, layout, d_model=4, n_heads=1, fn_kwargs={"hyena": {"max_len": 16384}}
    ).double()
    x = torch.randn(1, 16384, 4, dtype=torch.float64)
    assert_matches_reference(dispatcher, x)
    shift, cotangent = 5000, torch.randn_like(x)
    names, parameters = zip(*dispatcher.named_parameters())
    results = []
    for inputs, grad_output in ((x, cotangent), (x.roll(shift, 1), cotangent.roll(shift, 1))):
        output = dispatcher(inputs)
        results.append({"output": output, **dict(zip(names, torch.autograd.grad(output, parameters, grad_output)))})
    results[0]["output"] = results[0]["output"].roll(shift, 1)
    assert_all_close(results[1], results[0], tolerance=1e-10, zero_floor=1e-14)
