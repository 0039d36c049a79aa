"""The modules and the dispatcher give the same results through the Triton kernels
(compiled on CUDA, the interpreter on CPU) as through the eager ops (the custom ops pass
torch's checks in test_opcheck.py). Inputs and top-k projections lie on grids that make
every top-k logit exact, so both paths keep the same keys on every machine."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

from conftest import DEVICE, assert_all_close, grid_inputs, kernels, make_top_k_ties_exact  # noqa: E402

from canvas_engineering import (
    AttentionDispatcher,
    CanvasLayout,
    CanvasTopology,
    Connection,
    RegionSpec,
    create_attention,
)  # noqa: E402
from canvas_engineering.ops.backend import eager_ops  # noqa: E402

TOLERANCE = 1e-5 if DEVICE == "cpu" else 3e-3  # CUDA: TF32 matrix products


OPTIONS = {
    "sparse_attention": {"top_k": 3},
    "local_attention": {"window_size": 3},
    "perceiver": {"n_latents": 4},
    "mamba": {"state_size": 4},
}


def results(run, inputs, module):
    """Output and the gradients of the inputs and parameters of ``run(*inputs)``."""
    leaves = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    output = run(*leaves)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads = torch.autograd.grad(output, [*leaves, *module.parameters()], cotangent, allow_unused=True)
    names = [f"input{i}" for i in range(len(leaves))] + [n for n, _ in module.named_parameters()]
    return {"output": output, **dict(zip(names, grads))}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    [
        "cross_attention",
        "cosine_attention",
        "sigmoid_attention",
        "sparse_attention",
        "local_attention",
        "gated",
        "perceiver",
        "mixture",
        "cogvideox",
        "mamba",
        "rwkv",
        "linear_attention",
    ],
)
@pytest.mark.parametrize("n, m", [(11, 19), (19, 11)])
def test_module_kernels_match_eager(name, n, m):
    torch.manual_seed(0)
    module = create_attention(name, d_model=32, n_heads=2, **OPTIONS.get(name, {})).to(DEVICE)
    make_top_k_ties_exact(module)
    inputs = tuple(grid_inputs(torch.randn(2, rows, 32)) for rows in (n, m, m))
    with eager_ops():
        eager = results(module, inputs, module)
    with kernels():
        through_kernels = results(module, inputs, module)
    assert_all_close(through_kernels, eager, tolerance=TOLERANCE, zero_floor=1e-7)


@pytest.mark.gpu
def test_dispatcher_kernels_match_eager():
    layout = CanvasLayout(
        T=3,
        spatial_shape=(3, 6),
        d_model=32,
        regions={
            "a": RegionSpec((0, 3, 0, 2, 0, 6), default_attn="local_attention"),
            "b": RegionSpec((0, 2, 2, 3, 0, 6), period=2, default_attn="sparse_attention"),
        },
    )
    topology = CanvasTopology(
        [
            Connection("a", "a"),
            Connection("a", "b", t_src=0, t_dst=0, temporal_fill="interpolate"),
            Connection("b", "a", fn="cross_attention"),
            Connection("b", "b", t_src=0, t_dst=-1),
        ]
    )
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, d_model=32, n_heads=2).to(DEVICE)
    make_top_k_ties_exact(dispatcher)
    x = (grid_inputs(torch.randn(2, layout.num_positions, 32)),)
    with eager_ops():
        eager = results(dispatcher, x, dispatcher)
    with kernels():
        through_kernels = results(dispatcher, x, dispatcher)
    assert_all_close(through_kernels, eager, tolerance=TOLERANCE, zero_floor=1e-7)
