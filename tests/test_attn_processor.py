"""CanvasAttnProcessor on a tiny diffusers CogVideoX (random weights), against diffusers'
own CogVideoXAttnProcessor2_0 as the oracle: with a dense topology the same outputs and
gradients as the plain backbone; with a sparse one, the same as diffusers' processor given
the joint additive mask (text rows and columns open, the topology's additive mask over the
video tokens) as its attention mask. Float32, 1e-5 relative."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import assert_all_close

from canvas_engineering import CanvasLayout, CanvasTopology, Connection, RegionSpec, graft_looped_blocks
from canvas_engineering.attn_processor import CanvasAttnProcessor, token_grid
from canvas_engineering.cogvideox_demo import TINY_COGVIDEOX, rotary_tables

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (pip install -e '.[cogvideox]')"
)

TOLERANCE, ZERO_FLOOR = 1e-5, 1e-7
FRAMES, HEIGHT, WIDTH, TEXT = 3, 8, 8, 6
GRID = (3, 4, 4)  # token grid of (3, 4, 8, 8) latents with 2 x 2 patches


def layout(d_model=32):
    """Scene (rows 0-2), arm (row 3, cols 0-1), act (row 3, col 2); row 3 col 3 is in no region."""
    return CanvasLayout(
        T=GRID[0],
        H=GRID[1],
        W=GRID[2],
        d_model=d_model,
        regions={
            "scene": RegionSpec((0, 3, 0, 3, 0, 4)),
            "arm": RegionSpec((0, 3, 3, 4, 0, 2)),
            "act": RegionSpec((0, 3, 3, 4, 2, 3)),
        },
    )


SPARSE = CanvasTopology(
    connections=[
        Connection(src="scene", dst="scene"),
        Connection(src="act", dst="scene"),
        Connection(src="arm", dst="arm", t_src=0, t_dst=0),
        Connection(src="act", dst="arm", t_src=0, t_dst=-1),
        Connection(src="act", dst="act"),
    ]
)
DENSE_LAYOUT = CanvasLayout(T=GRID[0], H=GRID[1], W=GRID[2], d_model=32, regions={"all": (0, 3, 0, 4, 0, 4)})
DENSE = CanvasTopology.dense(["all"])


def tiny_model(loops=0):
    """The tiny CogVideoX under seed 0, with non-trivial loop parameters when grafted."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**TINY_COGVIDEOX)
    if loops:
        blocks, _ = graft_looped_blocks(model, max_loops=loops, latent_channels=4, freeze="none")
        with torch.no_grad():
            for block in blocks:
                block.set_loops(loops)
                for parameter in (block.loop_emb, block.loop_emb_enc, block.loop_gate):
                    parameter.normal_(std=0.1)
    return model


def inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, FRAMES, 4, HEIGHT, WIDTH, generator=generator),
        "encoder_hidden_states": torch.randn(2, TEXT, 12, generator=generator),
        "grad_output": torch.randn(2, FRAMES, 4, HEIGHT, WIDTH, generator=generator),
    }


def run(model, data, **call):
    """Output and every gradient (inputs and parameters) of one forward and backward."""
    leaves = {key: data[key].clone().requires_grad_(True) for key in ("hidden_states", "encoder_hidden_states")}
    (output,) = model(
        leaves["hidden_states"],
        leaves["encoder_hidden_states"],
        torch.tensor([5, 600]),
        image_rotary_emb=rotary_tables(TINY_COGVIDEOX, FRAMES, HEIGHT, WIDTH),
        return_dict=False,
        **call,
    )
    output.backward(data["grad_output"])
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"output": output.detach(), **{k: v.grad for k, v in leaves.items()}, **grads}


def joint_additive_mask(topology, canvas):
    """The oracle's (B, L + P, L + P) mask: 0 wherever a text token is involved, the
    topology's additive mask over the video tokens."""
    video = topology.to_additive_mask(canvas)
    joint = torch.zeros(TEXT + video.shape[0], TEXT + video.shape[0])
    joint[TEXT:, TEXT:] = video
    return joint.expand(2, -1, -1)


@needs_diffusers
def test_token_grid_is_the_transformers_flatten_order():
    model = tiny_model()
    assert token_grid(model.config, FRAMES, HEIGHT, WIDTH) == GRID
    latents = torch.zeros(1, FRAMES, 4, HEIGHT, WIDTH)
    latents[0, 2, :, 4:6, 2:4] = 1.0  # frame 2, patch row 2, patch col 1
    embedded = model.patch_embed(torch.zeros(1, TEXT, 12), latents)[0, TEXT:]
    base = model.patch_embed(torch.zeros(1, TEXT, 12), torch.zeros_like(latents))[0, TEXT:]
    changed = (embedded - base).abs().sum(-1).nonzero().flatten().tolist()
    assert changed == [layout().flat_index(2, 2, 1)]


@needs_diffusers
@pytest.mark.parametrize("loops", [0, 2])
def test_dense_topology_equals_diffusers_processor(loops):
    """The plain backbone (and one grafted with 2 loops) with a topology where every video
    token reads every other: diffusers' outputs and gradients."""
    data = inputs()
    expected = run(tiny_model(loops), data)
    model = tiny_model(loops)
    model.set_attn_processor(CanvasAttnProcessor(DENSE, DENSE_LAYOUT))
    assert_all_close(run(model, data), expected, TOLERANCE, ZERO_FLOOR)


@needs_diffusers
def test_sparse_topology_equals_sdpa_with_the_joint_additive_mask():
    canvas = layout()
    assert (SPARSE.to_additive_mask(canvas) == 0).float().mean() < 0.7
    data = inputs()
    expected = run(tiny_model(2), data, attention_kwargs={"attention_mask": joint_additive_mask(SPARSE, canvas)})
    model = tiny_model(2)
    model.set_attn_processor(CanvasAttnProcessor(SPARSE, canvas))
    actual = run(model, data)
    assert_all_close(actual, expected, TOLERANCE, ZERO_FLOOR)
    unmasked = run(tiny_model(2), data)
    assert (actual["output"] - unmasked["output"]).norm() > 1e-3 * unmasked["output"].norm()


@needs_diffusers
@pytest.mark.parametrize("block_size", [16, 20])
def test_flex_backend_equals_sdpa_backend(block_size):
    """The FlexAttention path, compiled as on CUDA (forward only: PyTorch has no FlexAttention
    backward on CPU), with block sizes that align with the video tokens (16) and that cut a
    block between video and text (20); compiled FlexAttention skips the blocks its tables
    leave out."""
    canvas = layout()
    generator = torch.Generator().manual_seed(2)
    hidden, text = torch.randn(2, 48, 32, generator=generator), torch.randn(2, TEXT, 32, generator=generator)
    rotary = rotary_tables(TINY_COGVIDEOX, FRAMES, HEIGHT, WIDTH)
    attention = tiny_model().transformer_blocks[0].attn1
    with torch.no_grad():
        results = []
        for backend in ("sdpa", "flex"):
            attention.set_processor(CanvasAttnProcessor(SPARSE, canvas, block_size=block_size, backend=backend))
            results.append(attention(hidden_states=hidden, encoder_hidden_states=text, image_rotary_emb=rotary))
    assert_all_close(dict(enumerate(results[1])), dict(enumerate(results[0])), TOLERANCE, ZERO_FLOOR)


@pytest.mark.parametrize("block_size", [16, 20, 128])
def test_joint_block_mask_lists_exactly_the_blocks_that_attend(block_size):
    """The CUDA path's BlockMask over [video, text]: its mask_mod is the joint mask, every
    block holding an attended pair is listed once, as full exactly when it is a whole block
    whose pairs all attend (checked block by block; the flex test runs these tables)."""
    canvas = layout()
    video = canvas.num_positions
    total = video + TEXT
    expected = torch.ones(total, total, dtype=torch.bool)
    expected[:video, :video] = SPARSE.to_additive_mask(canvas) == 0
    block_mask = CanvasAttnProcessor(SPARSE, canvas, block_size=block_size).joint_block_mask(TEXT, torch.device("cpu"))
    rows, cols = torch.meshgrid(torch.arange(total), torch.arange(total), indexing="ij")
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(block_mask.mask_mod(zero, zero, rows, cols), expected)
    blocks = -(-total // block_size)
    listed = {"partial": set(), "full": set()}
    for kind, counts, indices in (
        ("partial", block_mask.kv_num_blocks, block_mask.kv_indices),
        ("full", block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        for row in range(blocks):
            listed[kind] |= {(row, int(col)) for col in indices[0, 0, row, : int(counts[0, 0, row])]}
    assert not listed["partial"] & listed["full"]
    for row in range(blocks):
        for col in range(blocks):
            pairs = expected[row * block_size : (row + 1) * block_size, col * block_size : (col + 1) * block_size]
            whole = pairs.shape == (block_size, block_size)
            assert ((row, col) in listed["partial"] | listed["full"]) == bool(pairs.any()), (row, col)
            assert ((row, col) in listed["full"]) == (whole and bool(pairs.all())), (row, col)


@needs_diffusers
def test_errors():
    canvas = layout()
    attention = tiny_model().transformer_blocks[0].attn1
    attention.set_processor(CanvasAttnProcessor(SPARSE, canvas))
    with pytest.raises(
        ValueError,
        match=r"expected hidden_states of shape \(B, 48, inner_dim\) for the layout's 3 x 4 x 4 token grid, "
        r"got \(2, 47, 32\)",
    ):
        attention(hidden_states=torch.randn(2, 47, 32), encoder_hidden_states=torch.randn(2, TEXT, 32))
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        attention(
            hidden_states=torch.randn(2, 48, 32),
            encoder_hidden_states=torch.randn(2, TEXT, 32),
            attention_mask=torch.zeros(2, 54, 54),
        )
    with pytest.raises(
        ValueError, match=r"expected a layout over \(frames, patch rows, patch cols\), got spatial_shape \(16,\)"
    ):
        CanvasAttnProcessor(CanvasTopology(connections=[]), CanvasLayout(T=3, spatial_shape=(16,), d_model=8))
    with pytest.raises(ValueError, match=r"names region\(s\) \['ghost'\] that the layout lacks"):
        CanvasAttnProcessor(CanvasTopology(connections=[Connection(src="scene", dst="ghost")]), canvas)
    with pytest.raises(ValueError, match=r"backend must be one of \['flex', 'sdpa'\] or None, got 'xformers'"):
        CanvasAttnProcessor(SPARSE, canvas, backend="xformers")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        CanvasAttnProcessor(SPARSE, canvas, block_size=0)
    with pytest.raises(TypeError, match="topology must be a CanvasTopology, got list"):
        CanvasAttnProcessor([], canvas)
