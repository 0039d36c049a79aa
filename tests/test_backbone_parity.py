"""Grafting, looped blocks, the action head and the canvas module against
canvas-engineering 0.5.0 (the peer), run in one subprocess.

Each case builds the same model on both sides under the same seed (see peer_runner's
run_graft, run_looped_stack and run_canvas): the initial state_dicts must be equal (the
positional-encoding buffer, computed by our own code, within float32 rounding), the
peer's perturbed state_dict must load strictly into ours, and then the outputs and every
gradient (inputs and parameters) must agree within 1e-5 relative in float32. The
CogVideoX cases run diffusers' CogVideoXTransformer3DModel from a tiny config (random
weights); without diffusers they skip.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import assert_all_close, compared_tensors, region, relative_error
from peer import run_peer
from peer_runner import build_declarations, run_case

import canvas_engineering
from canvas_engineering.cogvideox_demo import TINY_COGVIDEOX, rotary_tables

pytestmark = pytest.mark.peer

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(
    not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -e '.[cogvideox]')"
)
TOLERANCE, ZERO_FLOOR = 1e-5, 1e-7
FRAMES, HEIGHT, WIDTH, TEXT = 3, 8, 8, 6


def graft_cases():
    """CogVideoX grafted with 1, 2 and 3 loops and each freeze mode, with and without rotary
    embeddings; B = 2 latents (2, 3, 4, 8, 8) and 6 text tokens."""
    generator = torch.Generator().manual_seed(7)
    variants = [
        {"loops": 1, "graft": {"max_loops": 3, "latent_channels": 4}},
        {"loops": 2, "graft": {"max_loops": 3, "latent_channels": 4}},
        {"loops": 3, "graft": {"max_loops": 3, "latent_channels": 4, "action_dim": 5}},
        {"loops": 2, "graft": {"max_loops": 2, "freeze": "half", "latent_channels": 4}},
        {"loops": 3, "graft": {"max_loops": 4, "freeze": "none", "latent_channels": 4}},
        {"loops": 2, "graft": {"max_loops": 2, "latent_channels": 4}, "rotary": False},
    ]
    cases = []
    for index, variant in enumerate(variants):
        rotary = variant.pop("rotary", True)
        config = {**TINY_COGVIDEOX, "use_rotary_positional_embeddings": rotary}
        cases.append(
            {
                "kind": "graft",
                "seed": 100 + index,
                "config": config,
                "hidden_states": torch.randn(2, FRAMES, 4, HEIGHT, WIDTH, generator=generator),
                "encoder_hidden_states": torch.randn(2, TEXT, 12, generator=generator),
                "timestep": torch.tensor([3, 700]),
                "image_rotary_emb": rotary_tables(config, FRAMES, HEIGHT, WIDTH) if rotary else None,
                "grad_output": torch.randn(2, FRAMES, 4, HEIGHT, WIDTH, generator=generator),
                **variant,
            }
        )
    return cases


def stack_cases():
    """Two nn.TransformerEncoderLayer blocks (d_model 16, 2 heads) through LoopedBlockWrapper,
    1 to 3 loops, with and without gradient checkpointing, with a causal src_mask."""
    generator = torch.Generator().manual_seed(8)
    cases = []
    for loops, checkpointing, gate in [(1, True, 0.0), (2, True, 0.5), (3, False, -1.0), (3, True, 0.0)]:
        cases.append(
            {
                "kind": "looped_stack",
                "seed": 200 + len(cases),
                "d_model": 16,
                "n_heads": 2,
                "layers": 2,
                "loops": loops,
                "wrapper": {
                    "max_loops": 3,
                    "embed_dim": 16,
                    "gate_init_bias": gate,
                    "use_gradient_checkpointing": checkpointing,
                },
                "x": torch.randn(2, 5, 16, generator=generator),
                "grad_output": torch.randn(2, 5, 16, generator=generator),
            }
        )
    return cases


def canvas_cases():
    """SpatiotemporalCanvas on a 2-D and a 3-D canvas with overlapping regions, periods in
    several buckets, a region name that needs sanitising, and placed data shorter than,
    equal to and longer than its region."""
    generator = torch.Generator().manual_seed(9)
    declarations = [
        {
            "T": 3,
            "spatial_shape": (4, 4),
            "d_model": 10,
            "regions": {
                "visual": region((0, 3, 0, 3, 0, 4)),
                "arm.left[0]": region((0, 3, 3, 4, 0, 2), period=4),
                "action": region((1, 3, 2, 4, 1, 4), period=16),
            },
            "connections": [],
        },
        {
            "T": 2,
            "spatial_shape": (2, 3, 2),
            "d_model": 9,
            "regions": {"a": region((0, 2, 0, 2, 0, 3, 0, 1), period=576), "b": region((1, 2, 0, 1, 0, 1, 0, 2))},
            "connections": [],
        },
    ]
    cases = []
    for spec in declarations:
        _, layout = build_declarations(canvas_engineering, spec)
        extra_rows = dict(zip(layout.regions, (0, -1, 2)))  # placed rows: region size plus this many
        cases.append(
            {
                "kind": "canvas",
                "seed": 300 + len(cases),
                "declarations": spec,
                "batch_size": 2,
                "embeddings": {
                    name: torch.randn(
                        2, layout.region_numel(name) + extra_rows[name], layout.d_model, generator=generator
                    )
                    for name in layout.regions
                },
                "grad_output": torch.randn(2, layout.num_positions, layout.d_model, generator=generator),
            }
        )
    return cases


GRAFT_CASES = graft_cases() if HAS_DIFFUSERS else []
STACK_CASES = stack_cases()
CANVAS_CASES = canvas_cases()
CASES = GRAFT_CASES + STACK_CASES + CANVAS_CASES


@pytest.fixture(scope="module")
def peer_results():
    """The peer's results for every case, from one subprocess."""
    return run_peer(CASES)


def assert_matches(ours, peer, approximate_state=()):
    """Same initial state (exactly, except the keys in ``approximate_state``), same outputs
    and gradients within 1e-5 relative."""
    assert {k: v.shape for k, v in ours["initial_state"].items()} == {
        k: v.shape for k, v in peer["initial_state"].items()
    }
    for key, value in peer["initial_state"].items():
        if key in approximate_state:
            assert relative_error(ours["initial_state"][key], value) < 1e-6, key
        else:
            assert torch.equal(ours["initial_state"][key], value), f"initial {key} differs under the same seed"
    assert_all_close(compared_tensors(ours), compared_tensors(peer), TOLERANCE, ZERO_FLOOR)


def graft_id(case):
    freeze = case["graft"].get("freeze", "full")
    return f"loops{case['loops']}-of{case['graft']['max_loops']}-{freeze}" + (
        "" if case["image_rotary_emb"] is not None else "-sincos"
    )


@needs_diffusers
@pytest.mark.parametrize("index", range(len(GRAFT_CASES)), ids=[graft_id(c) for c in GRAFT_CASES])
def test_grafted_cogvideox_matches_peer(index, peer_results):
    """The same trainable set, loop parameter counts, action head, outputs and gradients;
    also with the wrappers' checkpointing off and with diffusers' own gradient
    checkpointing (which 0.5.0's wrapper cannot take: it passes attention_kwargs positionally)."""
    case, peer = GRAFT_CASES[index], peer_results[index]
    variants = [{}, {"transformer_checkpointing": True}]
    if case["loops"] > 1:
        variants.append({"wrapper_checkpointing": False})
    for variant in variants:
        ours = run_case(canvas_engineering, {**case, **variant, "state_dict": peer["state"]})
        assert_matches(ours, peer)
        assert ours["extras"]["trainable"] == peer["extras"]["trainable"]
        assert ours["extras"]["loop_params"] == peer["extras"]["loop_params"]
        assert ours["extras"]["head_state"].keys() == peer["extras"]["head_state"].keys()
        for key, value in peer["extras"]["head_state"].items():
            assert torch.equal(ours["extras"]["head_state"][key], value), key
        assert relative_error(ours["extras"]["head_output"], peer["extras"]["head_output"]) < TOLERANCE


@pytest.mark.parametrize(
    "index",
    range(len(STACK_CASES)),
    ids=[f"loops{c['loops']}-ckpt{c['wrapper']['use_gradient_checkpointing']}" for c in STACK_CASES],
)
def test_looped_encoder_stack_matches_peer(index, peer_results):
    offset = len(GRAFT_CASES)
    case, peer = STACK_CASES[index], peer_results[offset + index]
    assert_matches(run_case(canvas_engineering, {**case, "state_dict": peer["state"]}), peer)


@pytest.mark.parametrize("index", range(len(CANVAS_CASES)), ids=["2d", "3d"])
def test_spatiotemporal_canvas_matches_peer(index, peer_results):
    """Same state_dict names and initial parameters; create_empty, place and extract give the
    peer's tensors, and the same gradients."""
    offset = len(GRAFT_CASES) + len(STACK_CASES)
    case, peer = CANVAS_CASES[index], peer_results[offset + index]
    ours = run_case(canvas_engineering, {**case, "state_dict": peer["state"]})
    assert_matches(ours, peer, approximate_state={"pos_enc.pe"})
    assert ours["extras"].keys() == peer["extras"].keys()
    for key, value in peer["extras"].items():
        assert relative_error(ours["extras"][key], value) < TOLERANCE, key
