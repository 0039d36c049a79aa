"""Grafting, looped blocks, the action head and the canvas module on their own: the import
paths of 0.5.0, the clear errors where 0.5.0 builds something unusable, and properties that
need no peer (freeze counts, loop counts, the generic graft path). Parity with 0.5.0 is in
test_backbone_parity.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

import canvas_engineering
from canvas_engineering import (
    ActionHead,
    CanvasLayout,
    LoopedBlockWrapper,
    LoopedCogVideoXBlock,
    RegionSpec,
    SpatiotemporalCanvas,
    freeze_full,
    freeze_half,
    graft_looped_blocks,
)

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(
    not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -e '.[cogvideox]')"
)


class EncoderStack(nn.Module):
    """Three nn.TransformerEncoderLayer blocks of width 16 under ``blocks``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def tiny_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    from canvas_engineering.cogvideox_demo import TINY_COGVIDEOX

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**TINY_COGVIDEOX)


def test_import_paths_of_0_5_0():
    from canvas_engineering.action_heads import ActionHead as head
    from canvas_engineering.canvas import PeriodEmbedding, SinusoidalPositionalEncodingND
    from canvas_engineering.canvas import SpatiotemporalCanvas as canvas_module
    from canvas_engineering.cogvideox import LoopedCogVideoXBlock as cog
    from canvas_engineering.cogvideox import detect_inner_dim
    from canvas_engineering.graft import freeze_full as full
    from canvas_engineering.graft import freeze_half as half
    from canvas_engineering.graft import graft_looped_blocks as graft
    from canvas_engineering.looped_block import LoopedBlockWrapper as wrapper

    assert (head, canvas_module, cog, full, half, graft, wrapper) == (
        ActionHead,
        SpatiotemporalCanvas,
        LoopedCogVideoXBlock,
        freeze_full,
        freeze_half,
        graft_looped_blocks,
        LoopedBlockWrapper,
    )
    assert canvas_engineering.detect_inner_dim is detect_inner_dim
    assert canvas_engineering.PeriodEmbedding is PeriodEmbedding
    assert canvas_engineering.SinusoidalPositionalEncodingND is SinusoidalPositionalEncodingND
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        from canvas_engineering.canvas import Nope  # noqa: F401


def test_graft_errors_leave_the_model_unchanged():
    model = EncoderStack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"non-empty nn.ModuleList of blocks at EncoderStack.transformer_blocks, found no such attribute; "
        r"non-empty ModuleLists of this model: \['blocks'\]",
    ):
        graft_looped_blocks(model)
    with pytest.raises(ValueError, match=r"EncoderStack.embed, found a Linear"):
        graft_looped_blocks(model, block_attr="embed")
    model.empty = nn.ModuleList()
    with pytest.raises(ValueError, match="found an empty ModuleList"):
        graft_looped_blocks(model, block_attr="empty")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_loops must be an integer >= 1, got {bad!r}"):
            graft_looped_blocks(model, max_loops=bad, block_attr="blocks", inner_dim=16)
    with pytest.raises(ValueError, match=r"freeze must be one of \['full', 'half', 'none'\], got 'all'"):
        graft_looped_blocks(model, block_attr="blocks", inner_dim=16, freeze="all")
    assert all(isinstance(block, nn.TransformerEncoderLayer) for block in model.blocks)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_generic_graft_runs_the_blocks_in_loops():
    """0.5.0 cannot graft a generic stack (it passes inner_dim= to LoopedBlockWrapper); here
    the wrapper gets it as embed_dim, and the grafted model equals the blocks looped by hand."""
    torch.manual_seed(0)
    model = EncoderStack()
    x = torch.randn(2, 5, 16)
    looped, head = graft_looped_blocks(model, max_loops=2, block_attr="blocks", inner_dim=16, latent_channels=16)
    assert [type(b) for b in looped] == [LoopedBlockWrapper] * 3 and list(model.blocks) == looped
    assert [b.embed_dim for b in looped] == [16] * 3 and isinstance(head, ActionHead)
    with torch.no_grad():
        for block in looped:
            block.set_loops(2)
            block.loop_emb.normal_()
            block.loop_gate.normal_()
    expected = model.embed(x)
    for block in looped:
        for step in range(2):
            gate = torch.sigmoid(block.loop_gate[step])
            expected = gate * block.original(expected + block.loop_emb[step]) + (1 - gate) * expected
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_generic_width_guess_that_does_not_fit_is_a_clear_error():
    """The first weight of nn.TransformerEncoderLayer is the packed in-projection (3 * width
    rows), 0.5.0's guess; the wrapper says so at the first forward."""
    model = EncoderStack()
    looped, _ = graft_looped_blocks(model, block_attr="blocks")
    assert looped[0].embed_dim == 48
    with pytest.raises(
        ValueError,
        match=r"LoopedBlockWrapper \(block 0\): hidden_states must end in the loop embedding width 48, "
        r"got \(2, 5, 16\).*inner_dim",
    ):
        model(torch.randn(2, 5, 16))


def test_blocks_that_return_nothing_usable():
    class Returns(nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, *args, **kwargs):
            return self.value

    x = torch.randn(2, 3, 4)
    for value, got in ((None, "NoneType"), (torch.zeros(2, 3), r"\(2, 3\)"), ((), r"tuple")):
        wrapper = LoopedBlockWrapper(Returns(value), embed_dim=4)
        with pytest.raises(
            ValueError,
            match=r"wrapped Returns must return a tensor \(or a tuple starting with one\) of shapes \[\(2, 3, 4\)\], "
            rf"got .*{got}",
        ):
            wrapper(x)
    for value in (torch.zeros(2, 3, 4), (torch.zeros(2, 3, 4),), [torch.zeros(2, 3, 4), torch.zeros(2, 5, 4), 1]):
        wrapper = LoopedCogVideoXBlock(Returns(value), block_idx=3, max_loops=2, inner_dim=4)
        with pytest.raises(
            ValueError,
            match=r"\(block 3\): the wrapped Returns must return \(hidden_states, encoder_hidden_states\) "
            r"of shapes \[\(2, 3, 4\), \(2, 5, 4\)\]",
        ):
            wrapper(x, torch.randn(2, 5, 4), torch.randn(2, 8))
    with pytest.raises(
        ValueError, match=r"encoder_hidden_states must end in the loop embedding width 4, got \(2, 5, 3\)"
    ):
        LoopedCogVideoXBlock(Returns(None), 0, 2, 4)(x, torch.randn(2, 5, 3), None)


def test_loop_counts():
    block = nn.Linear(4, 4)
    for bad in (0, -2, 2.0, None):
        with pytest.raises(ValueError, match=f"max_loops must be an integer >= 1, got {bad!r}"):
            LoopedBlockWrapper(block, max_loops=bad, embed_dim=4)
    wrapper = LoopedBlockWrapper(block, max_loops=3, embed_dim=4)
    assert wrapper.current_loops == 1 and wrapper.trainable_params() == 3 * 4 + 3
    wrapper.set_loops(7)
    assert wrapper.current_loops == 3
    wrapper.set_loops(0)
    x = torch.randn(2, 4)
    assert torch.equal(wrapper(x), x)
    with pytest.raises(ValueError, match=r"set_loops: n must be an integer >= 0, got -1"):
        wrapper.set_loops(-1)
    assert LoopedCogVideoXBlock(block, 0, 5, 4).trainable_params() == 2 * 5 * 4 + 5


def test_freeze_counts():
    model = EncoderStack()
    graft_looped_blocks(model, block_attr="blocks", inner_dim=16, freeze="none")
    total = sum(p.numel() for p in model.parameters())
    frozen = freeze_full(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{name}" for i in range(3) for name in ("loop_emb", "loop_gate")}
    assert frozen == total - sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert freeze_half(model) == 0 and all(p.requires_grad for p in model.parameters())


def test_action_head_shapes_and_errors():
    torch.manual_seed(0)
    head = ActionHead(latent_channels=6, action_dim=3)
    assert head.net[0].out_features == 8  # max(6 // 2, 8)
    latents = torch.randn(2, 3, 6, 4, 5)
    pooled = latents.mean(dim=(1, 3, 4))
    assert torch.allclose(head(latents), head(pooled), atol=1e-6)
    tokens = torch.randn(2, 7, 6)
    assert head(tokens).shape == (2, 3) and torch.allclose(head(tokens), head(tokens.mean(1)), atol=1e-6)
    for bad in (torch.randn(2, 3, 5, 4, 4), torch.randn(2, 5), torch.randn(6)):
        with pytest.raises(ValueError, match="ActionHead: expected"):
            head(bad)


def test_canvas_module_errors():
    layout = CanvasLayout(
        T=2, spatial_shape=(2, 2), d_model=4, regions={"a.b": RegionSpec((0, 2, 0, 1, 0, 2)), "c": (0, 1, 1, 2, 0, 2)}
    )
    canvas_module = SpatiotemporalCanvas(layout)
    assert set(dict(canvas_module.named_parameters())) == {
        "empty_token",
        "period_embedding.embedding.weight",
        "modality_embeddings.a__b",
        "modality_embeddings.c",
    }
    for keyword in ("semantic_conditioner", "program"):
        with pytest.raises(NotImplementedError, match=f"{keyword} is not supported by this package"):
            SpatiotemporalCanvas(layout, **{keyword: object()})
    with pytest.raises(ValueError, match=r"regions 'a.b' and 'a__b' both become the parameter name 'a__b'"):
        SpatiotemporalCanvas(
            CanvasLayout(T=1, spatial_shape=(2,), d_model=4, regions={"a.b": (0, 1, 0, 1), "a__b": (0, 1, 1, 2)})
        )
    canvas = canvas_module.create_empty(3)
    assert canvas.shape == (3, 8, 4)
    with pytest.raises(ValueError, match=r"unknown region 'd'; layout regions: \['a.b', 'c'\]"):
        canvas_module.extract(canvas, "d")
    with pytest.raises(ValueError, match=r"expected a canvas of shape \(B, 8, 4\), got \(3, 7, 4\)"):
        canvas_module.extract(canvas[:, :7], "c")
    with pytest.raises(
        ValueError,
        match=r"expected embeddings of shape \(3 or 1, n, 4\) for region 'c' \(2 positions\), got \(2, 2, 4\)",
    ):
        canvas_module.place(canvas, torch.randn(2, 2, 4), "c")
    placed = canvas_module.place(canvas, torch.randn(1, 2, 4), "c")
    assert torch.equal(placed[0, 4:6], placed[2, 4:6])
    with pytest.raises(TypeError, match="layout must be a CanvasLayout, got dict"):
        SpatiotemporalCanvas({"T": 1})
    assert canvas_module.pos_enc(1, (2, 1)).shape == (1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"grid \(3, 2, 2\) exceeds the encoded grid \(2, 2, 2\)"):
        canvas_module.pos_enc(3, (2, 2))
    with pytest.raises(ValueError, match=r"expected 2 spatial sizes, got \(2,\)"):
        canvas_module.pos_enc(1, (2,))


@needs_diffusers
def test_cogvideox_width_detection():
    model = tiny_cogvideox()
    assert canvas_engineering.detect_inner_dim(model) == 32
    looped, _ = graft_looped_blocks(model, max_loops=2, latent_channels=4)
    assert all(isinstance(b, LoopedCogVideoXBlock) and b.inner_dim == 32 for b in looped)
    with pytest.raises(ValueError, match="has no attribute 'transformer_blocks'"):
        canvas_engineering.detect_inner_dim(EncoderStack())


class Counting(nn.Module):
    """A linear block (or a pair of them, for two streams) that counts its calls."""

    def __init__(self, streams: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(streams))
        self.calls = 0

    def forward(self, *inputs, **kwargs):
        self.calls += 1
        outputs = tuple(layer(x) for layer, x in zip(self.layers, inputs))
        return outputs if len(outputs) > 1 else outputs[0]


@pytest.mark.parametrize("cogvideox", [False, True])
def test_gradient_checkpointing_recomputes_each_loop(cogvideox):
    """With more than one loop and gradients on, each iteration runs again in the backward
    pass (as in 0.5.0); not with one loop, under no_grad, or with checkpointing off."""
    torch.manual_seed(0)
    block = Counting(2 if cogvideox else 1)
    wrapper = LoopedCogVideoXBlock(block, 0, 3, 4) if cogvideox else LoopedBlockWrapper(block, max_loops=3, embed_dim=4)
    streams = [torch.randn(2, 5, 4, requires_grad=True) for _ in range(len(block.layers))]
    extra = (torch.zeros(2, 8),) if cogvideox else ()

    def calls(loops, grad=True, checkpointing=True):
        wrapper.set_loops(loops)
        wrapper.use_gradient_checkpointing = checkpointing
        block.calls = 0
        with torch.set_grad_enabled(grad):
            output = wrapper(*streams, *extra)
            if grad:
                sum(o.sum() for o in (output if cogvideox else (output,))).backward()
        return block.calls

    assert [calls(3), calls(2), calls(1), calls(3, grad=False), calls(3, checkpointing=False)] == [6, 4, 1, 3, 3]
