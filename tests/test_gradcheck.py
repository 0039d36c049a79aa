"""torch.autograd.gradcheck in float64 for every type's module (inputs and parameters),
and for a whole dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from canvas_engineering import (
    BUILTIN_ATTENTION,
    AttentionDispatcher,
    CanvasLayout,
    CanvasTopology,
    Connection,
    RegionSpec,
    create_attention,
)
from canvas_engineering.ops.selective_scan import selective_scan

SMALL_OPTIONS = {
    "hyena": {"max_len": 8},
    "mamba": {"state_size": 3},
    "perceiver": {"n_latents": 3},
    "sparse_attention": {"top_k": 2},
    "local_attention": {"window_size": 2},
    "random_fixed": {"n_random": 2},
    "mixture": {"n_experts": 2, "top_k_experts": 1},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_ATTENTION))
@pytest.mark.parametrize("n, m", [(3, 5), (5, 3)])
def test_module_gradcheck(name, n, m):
    torch.manual_seed(0)
    module = create_attention(name, d_model=8, n_heads=2, **SMALL_OPTIONS.get(name, {})).double()
    names = [k for k, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    queries, keys, values = (torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True) for length in (n, m, m))

    def run(q, k, v, *flat_params):
        return functional_call(module, dict(zip(names, flat_params)), (q, k, v))

    if name == "none":
        assert torch.equal(run(queries, keys, values, *params), torch.zeros_like(queries))
        return
    assert torch.autograd.gradcheck(run, (queries, keys, values, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dispatcher_gradcheck():
    torch.manual_seed(0)
    layout = CanvasLayout(
        T=3,
        spatial_shape=(4,),
        d_model=8,
        regions={
            "a": RegionSpec((0, 3, 0, 2), default_attn="rwkv"),
            "b": RegionSpec((0, 2, 2, 4), period=2, default_attn="local_attention"),
        },
    )
    topology = CanvasTopology(
        [
            Connection("a", "a", t_src=0, t_dst=-1, temporal_fill="interpolate"),
            Connection("a", "b", t_src=0, t_dst=0, temporal_fill="hold", weight=0.5),
            Connection("b", "a", fn="gated"),
            Connection("b", "b"),
        ]
    )
    dispatcher = AttentionDispatcher(topology, layout, d_model=8, n_heads=2).double()
    x = torch.randn(2, layout.num_positions, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dispatcher, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear_attention", "hyena"])
def test_second_derivatives_through_hand_written_backwards(name):
    """The eager elu + 1 feature map and Hyena's gated convolution have hand-written
    backward passes; differentiated again, they are exact."""
    torch.manual_seed(0)
    module = create_attention(name, d_model=4, n_heads=2, **SMALL_OPTIONS.get(name, {})).double()
    queries, keys = (torch.randn(1, length, 4, dtype=torch.float64, requires_grad=True) for length in (5, 5))
    assert torch.autograd.gradgradcheck(lambda q, k: module(q, k, k), (queries, keys), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_second_derivatives_of_the_selective_scan():
    """The scan's floored decay exponential has a hand-written backward; differentiated
    again, it is exact. (Mamba's module is not twice differentiable: its readout runs
    PyTorch's CPU flash attention, whose backward has no derivative.)"""
    generator = torch.Generator().manual_seed(0)
    x, dt_raw, B, C = (torch.randn(1, 9, n, generator=generator, dtype=torch.float64) for n in (3, 3, 2, 2))
    dt = torch.nn.functional.softplus(dt_raw)
    A = -torch.arange(1, 3, dtype=torch.float64).repeat(3, 1)
    inputs = [
        t.requires_grad_(True) for t in (x, dt, A, B, C, torch.randn(3, generator=generator, dtype=torch.float64))
    ]
    assert torch.autograd.gradgradcheck(lambda *args: selective_scan(*args, chunk=4), inputs)
