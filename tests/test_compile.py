"""torch.compile(fullgraph=True) with inductor, on CPU: the forward and backward of a small
model whose types cover every kernel family match eager within float32 rounding, and the
first forward of a dispatcher with every other type compiles (the plan and everything the
modules derive from it are built at construction). Building another model afterwards does
not recompile a compiled one."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn as nn
from conftest import assert_all_close, grid_inputs, make_top_k_ties_exact, relative_error

from canvas_engineering import BUILTIN_ATTENTION, AttentionDispatcher, CanvasLayout, CanvasTopology, Connection

D_MODEL, VOCABULARY, N_OUT, N_REGIONS = 16, 11, 3, 4
FLOAT32_TOLERANCE = 1e-5
"""A few hundred float32 roundings (2^-24 each), summed in a different order when compiled."""

LAYER_TYPES = (
    ("cross_attention", "local_attention", "sparse_attention", "linear_attention"),
    ("rwkv", "mamba", "hyena"),
)
"""Every kernel family between the two layers: dense softmax, windowed and top-k segment
attention, linear attention, the WKV and selective scans (Mamba's readout is segment
attention), and the FFT convolution."""

LAYER_OPTIONS = {"local_attention": {"window_size": 4}, "sparse_attention": {"top_k": 4}, "hyena": {"max_len": 32}}
"""The layers' ``fn_kwargs``: the model compiles modules built with options, not only defaults."""


@pytest.fixture(autouse=True)
def two_threads():
    """Compiled and run with two intra-op threads, where inductor's CPU code runs in
    parallel (the configuration of pytorch/pytorch#191837, which the ops avoid), also when
    a test worker runs with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_first_forward_compiles_with_every_other_type():
    names = sorted(set(BUILTIN_ATTENTION) - {name for types in LAYER_TYPES for name in types})
    layout = CanvasLayout(
        T=2,
        spatial_shape=(len(names), 4),
        d_model=16,
        regions={f"r{i}": (0, 2, i, i + 1, 0, 4) for i in range(len(names))},
    )
    timing = ({}, {"t_src": 0, "t_dst": -1, "temporal_fill": "interpolate"})
    connections = [
        Connection(f"r{i}", f"r{(i + 1) % len(names)}", fn=name, **timing[i % 2]) for i, name in enumerate(names)
    ]
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(CanvasTopology(connections), layout, d_model=16, n_heads=2)
    x = torch.randn(2, layout.num_positions, 16)
    with torch.no_grad():
        compiled = torch.compile(dispatcher, fullgraph=True)(x)
        assert relative_error(compiled, dispatcher(x)) < FLOAT32_TOLERANCE


def ring_dispatcher(types: Sequence[str]) -> AttentionDispatcher:
    """Over a T=2 canvas of N_REGIONS (2, 4) regions, region i reads region i+1 with type i
    (built with its LAYER_OPTIONS):
    both frames at once (one segment of 16 rows, which top-k and the window thin out) for
    even i, the previous frame for odd i (a segment of 8 rows per frame)."""
    layout = CanvasLayout(
        T=2,
        spatial_shape=(2 * N_REGIONS, 4),
        d_model=D_MODEL,
        regions={f"r{i}": (0, 2, 2 * i, 2 * i + 2, 0, 4) for i in range(N_REGIONS)},
    )
    timing = ({}, {"t_src": 0, "t_dst": -1})
    connections = [
        Connection(f"r{i}", f"r{(i + 1) % N_REGIONS}", fn=name, **timing[i % 2]) for i, name in enumerate(types)
    ]
    options = {name: LAYER_OPTIONS[name] for name in types if name in LAYER_OPTIONS}
    return AttentionDispatcher(CanvasTopology(connections), layout, d_model=D_MODEL, n_heads=2, fn_kwargs=options)


class TokenModel(nn.Module):
    """``(B, positions)`` token ids to ``(B, positions, N_OUT)``: embedding, two residual
    dispatcher layers, linear head."""

    def __init__(self, layer_types: Sequence[Sequence[str]]):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, D_MODEL)
        self.layers = nn.ModuleList([ring_dispatcher(types) for types in layer_types])
        self.head = nn.Linear(D_MODEL, N_OUT)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return self.head(hidden)


def output_and_gradients(model: nn.Module, run, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """``run(tokens)`` and the gradient of every parameter of ``model`` for a seeded cotangent."""
    output = run(tokens)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    names, parameters = zip(*model.named_parameters())
    gradients = torch.autograd.grad(output, parameters, cotangent, allow_unused=True)
    return {"output": output.detach(), **dict(zip(names, gradients))}


def test_model_forward_and_backward_compile_and_match_eager():
    """Tokens repeat (11 ids), so top-k rows tie; the embedding and the top-k projections lie
    on grids that make those ties exact, so eager and compiled keep the same keys."""
    torch.manual_seed(0)
    model = TokenModel(LAYER_TYPES)
    with torch.no_grad():
        model.embedding.weight.copy_(grid_inputs(model.embedding.weight))
    make_top_k_ties_exact(model)
    tokens = torch.randint(0, VOCABULARY, (2, model.layers[0].layout.num_positions))
    eager = output_and_gradients(model, model, tokens)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = output_and_gradients(model, compiled_model, tokens)
    assert all(gradient is not None for gradient in eager.values())
    assert_all_close(compiled, eager, tolerance=FLOAT32_TOLERANCE, zero_floor=1e-7)
    other_model = TokenModel(LAYER_TYPES)
    other_model(tokens)  # its indexes enter the ops' caches, and stay while it lives
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_model(tokens)
