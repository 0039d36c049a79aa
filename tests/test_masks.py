"""The topology as masks for full-attention backbones.

- ``to_attention_mask`` and ``to_additive_mask`` equal canvas-engineering 0.5.0's exactly
  (run in a subprocess), on hypothesis-drawn canvases (regions, periods, weights, frame
  offsets, all three fills) and on the four recipes; so do ``summary()`` and ``repr``.
- ``to_block_mask`` holds exactly the mask's pattern: its skipped blocks hold no read pair,
  its full blocks only read pairs, and its ``mask_mod`` is the pattern; FlexAttention with it
  (and with ``to_score_mod``) equals ``scaled_dot_product_attention`` with the additive mask
  (and the log of the weights), forward and gradients.
- A 16384-position canvas's block mask is built in a fraction of the memory of one
  ``(P, P)`` bool tensor.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_all_close, relative_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peer import REPO_ROOT, run_peer
from peer_runner import build_declarations
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_operator
from torch.nn.attention.flex_attention import _apply_kernel_options, flex_attention

import canvas_engineering
from canvas_engineering import AttentionDispatcher, CanvasLayout, CanvasTopology, Connection, TemporalFill
from canvas_engineering.connectivity import MaskSpec
from canvas_engineering.recipes import RECIPES

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FILLS = [fill.value for fill in TemporalFill]
TOLERANCE = 1e-5
# float32 rounding at the scale of all results: a query that reads one key has a zero gradient in exact arithmetic
ZERO_FLOOR = 1e-7


@st.composite
def declarations(draw):
    """A plain canvas description (see peer_runner.build_declarations) with up to four
    regions of random boxes and periods, and up to six connections with random weights,
    offsets, fills and interpolation orders."""
    T = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    regions = {}
    for index in range(draw(st.integers(1, 4))):
        bounds = []
        for extent in (T,) + shape:
            lo = draw(st.integers(0, extent - 1))
            bounds += [lo, draw(st.integers(lo + 1, extent))]
        regions[f"r{index}"] = {"bounds": tuple(bounds), "period": draw(st.integers(1, 3))}
    offsets = st.one_of(st.none(), st.integers(-2, 2))
    connections = [
        {
            "src": draw(st.sampled_from(sorted(regions))),
            "dst": draw(st.sampled_from(sorted(regions))),
            "weight": draw(st.sampled_from([1.0, 0.5, 0.3, 2.0, 0.0, 1e-3])),
            "t_src": draw(offsets),
            "t_dst": draw(offsets),
            "temporal_fill": draw(st.sampled_from(FILLS)),
            "interpolation_order": draw(st.sampled_from([1, 2, 3, 30])),
            "operator": draw(st.sampled_from(["attend", "attend", "observe", "predict"])),
        }
        for _ in range(draw(st.integers(1, 6)))
    ]
    return {"T": T, "spatial_shape": shape, "d_model": 8, "regions": regions, "connections": connections}


def recipe_declarations(name):
    """A recipe at T=3 on a 4x4 grid as a plain description."""
    topology, layout = RECIPES[name](T=3, grid=4, d_model=8)
    regions = {
        n: {"bounds": layout.region_spec(n).bounds, "default_attn": layout.region_spec(n).default_attn}
        for n in layout.regions
    }
    connections = [{"src": c.src, "dst": c.dst, "weight": c.weight, "fn": c.fn} for c in topology.connections]
    return {"T": 3, "spatial_shape": (4, 4), "d_model": 8, "regions": regions, "connections": connections}


def temporal_recipe_declarations(name):
    """The recipe with its first region (by name) updating every other frame, and a
    previous-frame copy of each edge (weight 0.7), the fills taken in turn."""
    plain = recipe_declarations(name)
    slow = sorted(plain["regions"])[0]
    plain["regions"][slow]["period"] = 2
    plain["connections"] += [
        {"src": c["src"], "dst": c["dst"], "weight": 0.7, "t_src": 0, "t_dst": -1, "temporal_fill": fill}
        for c, fill in zip(plain["connections"], FILLS * 3)
    ]
    return plain


RECIPE_CASES = {name: recipe_declarations(name) for name in RECIPES}
RECIPE_CASES.update({f"{name}_temporal": temporal_recipe_declarations(name) for name in RECIPES})
RECIPE_CASES[
    "far_interpolation"
] = {  # order-45 weights of dst frames 2 or more frames away sum below 1e-12 (nothing read)
    "T": 8,
    "spatial_shape": (2,),
    "d_model": 8,
    "regions": {"a": {"bounds": (0, 8, 0, 1)}, "b": {"bounds": (0, 2, 1, 2), "period": 5}},
    "connections": [
        {"src": "a", "dst": "b", "t_src": 0, "t_dst": 0, "temporal_fill": "interpolate", "interpolation_order": order}
        for order in (2, 45)
    ],
}
MISSING_REGION = {
    "T": 2,
    "spatial_shape": (3,),
    "d_model": 8,
    "regions": {"a": {"bounds": (0, 2, 0, 2)}, "b": {"bounds": (0, 2, 1, 3), "period": 2}},
    "connections": [
        {"src": "a", "dst": "b"},
        {"src": "a", "dst": "ghost"},
        {"src": "ghost", "dst": "b", "t_dst": 0},
        {"src": "b", "dst": "a", "t_src": 0, "t_dst": -1},
    ],
}


def ours(plain):
    """(topology, layout) of a plain description, built with this package."""
    return build_declarations(canvas_engineering, plain)


def peer_masks(canvases):
    """0.5.0's masks and texts for every plain canvas, in one subprocess."""
    return run_peer([{"kind": "masks", "declarations": plain} for plain in canvases])


def assert_masks_match_peer(plain, peer):
    topology, layout = ours(plain)
    attention, additive = topology.to_attention_mask(layout), topology.to_additive_mask(layout)
    assert attention.dtype == peer["attention_mask"].dtype and torch.equal(attention, peer["attention_mask"])
    assert additive.dtype == peer["additive_mask"].dtype and torch.equal(additive, peer["additive_mask"])
    assert topology.summary() == peer["summary"]
    assert repr(topology) == peer["repr"]


@pytest.fixture(scope="module")
def recipe_peer():
    """0.5.0's results for the recipes and for MISSING_REGION (key None), in one call."""
    return dict(zip([*RECIPE_CASES, None], peer_masks([*RECIPE_CASES.values(), MISSING_REGION])))


@pytest.mark.peer
@pytest.mark.parametrize("name", sorted(RECIPE_CASES))
def test_recipe_masks_match_peer(name, recipe_peer):
    assert_masks_match_peer(RECIPE_CASES[name], recipe_peer[name])


@pytest.mark.peer
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(declarations(), min_size=16, max_size=16))
def test_random_masks_match_peer(canvases):
    for plain, peer in zip(canvases, peer_masks(canvases)):
        assert_masks_match_peer(plain, peer)


def block_table(counts, indices):
    """The (n, n) bool table of a BlockMask's (counts, indices) pair, read as its docs define it."""
    counts, indices = counts[0, 0], indices[0, 0]
    n = indices.shape[-1]
    chosen = torch.arange(n)[None, :] < counts[:, None]
    table = torch.zeros(n, n, dtype=torch.bool)
    table[torch.arange(n)[:, None].expand(n, n)[chosen], indices[chosen].long()] = True
    return table


def block_mask_pattern(block_mask, size):
    """The (P, P) pattern a kernel honouring ``block_mask`` attends: every pair of a full
    block, the ``mask_mod`` pairs of a partial block, nothing elsewhere."""
    block = block_mask.BLOCK_SIZE[0]
    partial = block_table(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = block_table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any()
    rows = torch.arange(size) // block
    positions = torch.arange(size)
    evaluated = block_mask.mask_mod(None, None, positions[:, None], positions[None, :])
    return full[rows][:, rows] | (partial[rows][:, rows] & evaluated)


FLEX_CANVASES = list(RECIPE_CASES.values())[:4] + [temporal_recipe_declarations("robot_manipulation")]


@pytest.mark.parametrize("block", [4, 3, 16, 7])
@pytest.mark.parametrize("index", range(len(FLEX_CANVASES)))
def test_block_mask_is_the_mask_pattern(index, block):
    """Block sizes 4 and 16 divide the recipes' 16-position frames and region rows; 3 and 7
    do not, and 7 does not divide the canvas either (a short last block)."""
    topology, layout = ours(FLEX_CANVASES[index])
    size = layout.num_positions
    attended = topology.to_attention_mask(layout) > 0
    assert torch.equal(block_mask_pattern(topology.to_block_mask(layout, block), size), attended)
    with_self = topology.to_block_mask(layout, block, self_attend_unread=True)
    assert torch.equal(block_mask_pattern(with_self, size), topology.to_additive_mask(layout) == 0)
    padded = -(-size // block) * block
    dense = torch.zeros(padded, padded, dtype=torch.bool)
    dense[:size, :size] = attended
    touched = dense.view(padded // block, block, padded // block, block).any(3).any(1)
    blocks = touched.shape[0]
    assert f"block density {touched.sum().item() / blocks**2:.4f}" in topology.explain_mask(layout, block)


def attention_and_gradients(run, q, k, v, grad):
    """``run(q, k, v)``'s output and the gradients of q, k and v for the cotangent ``grad``."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    output = run(*leaves)
    output.backward(grad)
    return {"output": output.detach(), **{name: t.grad for name, t in zip("qkv", leaves)}}


def flex_operator(block_mask, score_mod=None):
    """``(q, k, v) -> output`` through FlexAttention's operator, the higher-order op that
    ``flex_attention`` runs: differentiable on the CPU, where torch 2.13's ``flex_attention``
    front end refuses inputs that require gradients."""

    def run(q, k, v):
        options = _apply_kernel_options(q, k, v, False, None, None)
        return flex_attention_operator(
            q, k, v, score_mod or noop_score, block_mask.as_tuple(), q.shape[-1] ** -0.5, options
        )[0]

    return run


def noop_score(score, b, h, q_idx, kv_idx):
    return score


def assert_flex_equals_sdpa(topology, layout, block, q, k, v, grad):
    """FlexAttention with the block mask (self-attending unread positions) equals SDPA with
    the additive mask, and with the score_mod SDPA with the log of the weights added: the
    public function's forward, and the operator's forward and gradients."""
    block_mask = topology.to_block_mask(layout, block, self_attend_unread=True)
    additive = topology.to_additive_mask(layout)
    weights = topology.to_attention_mask(layout)
    weighted = torch.where(weights > 0, weights.log(), additive)
    for score_mod, attn_mask in ((None, additive), (topology.to_score_mod(layout), weighted)):
        sdpa = attention_and_gradients(partial(F.scaled_dot_product_attention, attn_mask=attn_mask), q, k, v, grad)
        flex = attention_and_gradients(flex_operator(block_mask, score_mod), q, k, v, grad)
        assert_all_close(flex, sdpa, TOLERANCE, ZERO_FLOOR)
        forward = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        assert relative_error(forward, sdpa["output"]) <= TOLERANCE


@pytest.mark.parametrize("index, block", [(0, 5), (4, 4)])
def test_flex_attention_equals_sdpa(index, block):
    """Block size 4 divides the regions' rows (16-position frames); 5 does not, and leaves a
    short last block. Without self_attend_unread, the positions that read nothing get zeros
    from FlexAttention and the others SDPA's output."""
    topology, layout = ours(FLEX_CANVASES[index])
    generator = torch.Generator().manual_seed(index)
    q, k, v, grad = (torch.randn(2, 2, layout.num_positions, 8, generator=generator) for _ in range(4))
    assert_flex_equals_sdpa(topology, layout, block, q, k, v, grad)
    unread = (topology.to_attention_mask(layout) == 0).all(1)
    plain = flex_attention(q, k, v, block_mask=topology.to_block_mask(layout, block))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=topology.to_additive_mask(layout))
    assert relative_error(plain[:, :, ~unread], sdpa[:, :, ~unread]) <= TOLERANCE
    assert torch.equal(plain[:, :, unread], torch.zeros_like(plain[:, :, unread]))


@given(declarations())
@settings(max_examples=4, deadline=None)
def test_flex_attention_equals_sdpa_on_random_canvases(plain):
    topology, layout = ours(plain)
    generator = torch.Generator().manual_seed(layout.num_positions)
    q, k, v, grad = (torch.randn(1, 2, layout.num_positions, 4, generator=generator) for _ in range(4))
    assert_flex_equals_sdpa(topology, layout, 3, q, k, v, grad)


def test_compiled_flex_attention_equals_sdpa():
    """Compiled (inductor's CPU kernel), FlexAttention reads the block tables: it skips the
    empty blocks and runs no mask_mod on the full ones. Block size 24 leaves a short last
    block of the 256 positions and cuts the 16-position rows of the regions."""
    topology, layout = RECIPES["robot_manipulation"](T=4, grid=8, d_model=8)
    block_mask = topology.to_block_mask(layout, 24, self_attend_unread=True)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    assert (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).sum() < block_mask.kv_indices.shape[-1] ** 2
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.num_positions, 16, generator=generator) for _ in range(3))
    weights = topology.to_attention_mask(layout)
    weighted = torch.where(weights > 0, weights.log(), topology.to_additive_mask(layout))
    # Static shapes, as CanvasAttnProcessor compiles it: after an earlier compile of flex_attention with
    # other shapes, dynamo recompiles with dynamic ones, and inductor's CPU template then emits C++ that
    # does not compile in torch 2.13 ('cur_qSplitSize8' was not declared; docs/notes.md).
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    compiled = compiled_flex(q, k, v, score_mod=topology.to_score_mod(layout), block_mask=block_mask)
    assert relative_error(compiled, F.scaled_dot_product_attention(q, k, v, attn_mask=weighted)) <= TOLERANCE


@pytest.mark.peer
def test_missing_region_raises_as_the_dispatcher_does(recipe_peer):
    """An edge naming a region the layout lacks raises the dispatcher's error; with
    strict=False it is left out with a warning, which gives 0.5.0's masks (it skips them)."""
    topology, layout = ours(MISSING_REGION)
    with pytest.raises(ValueError) as dispatcher_error:
        AttentionDispatcher(topology, layout, 8, 2)
    builders = (
        topology.to_attention_mask,
        topology.to_additive_mask,
        topology.to_block_mask,
        topology.to_score_mod,
        topology.explain_mask,
    )
    for build in builders:
        with pytest.raises(ValueError) as error:
            build(layout)
        assert str(error.value) == str(dispatcher_error.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(topology.to_attention_mask(layout, strict=False), recipe_peer[None]["attention_mask"])
        assert torch.equal(topology.to_additive_mask(layout, strict=False), recipe_peer[None]["additive_mask"])
    assert len(caught) == 4 and all("the edge is skipped (strict=False)" in str(w.message) for w in caught)


def test_the_mask_reads_no_attention_type():
    layout = CanvasLayout(T=1, spatial_shape=(2,), d_model=8, regions={"a": (0, 1, 0, 1), "b": (0, 1, 1, 2)})
    named = CanvasTopology([Connection("a", "b", fn="not_registered"), Connection("b", "b", fn="none")])
    plain = CanvasTopology([Connection("a", "b"), Connection("b", "b")])
    assert torch.equal(named.to_attention_mask(layout), plain.to_attention_mask(layout))


@pytest.mark.parametrize("block_size", [0, -4, 2.5, "8", True])
def test_bad_block_size(block_size):
    topology, layout = ours(FLEX_CANVASES[0])
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        topology.to_block_mask(layout, block_size)


def test_connection_masks():
    assert Connection("a", "b").mask is None
    assert Connection("a", "b", mask=MaskSpec()).mask == MaskSpec(kind="full")
    for kind in ("tile", "sparse"):
        with pytest.raises(ValueError, match="is not applied by this package; expected None or MaskSpec"):
            Connection("a", "b", mask=MaskSpec(kind=kind, tile_h=2, tile_w=2))
    with pytest.raises(TypeError, match="mask must be None or a MaskSpec, got str 'full'"):
        Connection("a", "b", mask="full")


def test_large_block_mask_is_never_dense():
    """Building the block mask of a 16384-position canvas grows the process's resident set
    by far less than one (P, P) bool tensor (256 MiB) would."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from mask_memory import block_mask_peak

    measured = block_mask_peak(T=16, grid=32, block_size=128)
    assert measured["positions"] == 16384
    assert measured["peak_bytes"] < measured["positions"] ** 2 // 16, measured
