"""A small model over a canvas for the training tests (distributed training, checkpoints,
determinism): an input projection, two :class:`AttentionDispatcher` layers with residual
connections, and a linear head.

The canvas is described as plain data (see ``peer_runner.build_declarations``), so that
this package and canvas-engineering 0.5.0 build the same declarations from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from peer_runner import build_declarations

import canvas_engineering

D_MODEL, N_HEADS, D_IN, D_OUT = 16, 2, 5, 3

KERNEL_FAMILIES = (
    "cross_attention",
    "local_attention",
    "sparse_attention",
    "linear_attention",
    "rwkv",
    "mamba",
    "hyena",
    "random_fixed",
    "perceiver",
)
"""One type per computation family: dense softmax, windowed, top-k, linear, the two
scans, the FFT convolution, the seeded pattern and the latent bottleneck."""

EVERY_TYPE = KERNEL_FAMILIES + (
    "cosine_attention",
    "sigmoid_attention",
    "gated",
    "mixture",
    "cogvideox",
    "self_attention",
    "pooling",
    "copy",
    "none",
)
"""Every registered name, local_attention on an edge whose queries are fewer than its keys
(with more queries than keys, some query can have no key in its window, where
canvas-engineering 0.5.0 returns NaN)."""

# (src, dst, t_src, t_dst): every dst holds at least 12 keys over both frames and 6 per
# frame, more than the default top_k, window and n_random (8), so that top-k, windowed
# and random_fixed attention really leave keys out. Types are assigned to these edges in
# order; the first three edges read the largest region.
EDGES = (
    ("left", "field", None, None),
    ("right", "field", None, None),
    ("field", "field", None, None),
    ("field", "left", None, None),
    ("left", "right", 0, 0),
    ("right", "left", None, None),
    ("field", "field", 0, -1),
    ("left", "left", None, None),
    ("right", "right", None, None),
    ("field", "right", 0, 0),
    ("left", "field", 0, 0),
    ("right", "field", 0, -1),
    ("field", "left", 0, 0),
    ("left", "right", None, None),
    ("right", "left", 0, 0),
    ("field", "field", None, None),
    ("left", "left", 0, -1),
    ("right", "right", 0, 0),
)


def canvas_spec(types: Sequence[str]) -> dict[str, Any]:
    """A T=2, (4, 6) canvas (48 positions) of three regions ("field": 24 positions, "left"
    and "right": 12 each) whose i-th connection runs ``types[i]`` (at most 18)."""
    if len(types) > len(EDGES):
        raise ValueError(f"canvas_spec: at most {len(EDGES)} types, got {len(types)}")
    connections: list[dict[str, Any]] = []
    for (src, dst, t_src, t_dst), fn in zip(EDGES, types):
        connections.append({"src": src, "dst": dst, "t_src": t_src, "t_dst": t_dst, "fn": fn})
    return {
        "T": 2,
        "spatial_shape": (4, 6),
        "d_model": D_MODEL,
        "regions": {
            "field": {"bounds": (0, 2, 0, 2, 0, 6)},
            "left": {"bounds": (0, 2, 2, 4, 0, 3)},
            "right": {"bounds": (0, 2, 2, 4, 3, 6)},
        },
        "connections": connections,
    }


NUM_POSITIONS = 2 * 4 * 6


def build_dispatcher(spec: dict[str, Any], package: Any = canvas_engineering) -> nn.Module:
    """``package.AttentionDispatcher`` over the canvas ``spec`` describes (D_MODEL, N_HEADS)."""
    topology, layout = build_declarations(package, spec)
    return package.AttentionDispatcher(topology, layout, D_MODEL, N_HEADS)


class CanvasModel(nn.Module):
    """``(B, 48, D_IN) -> (B, 48, D_OUT)``: input projection, two residual dispatcher
    layers over the kernel-family types (the second with the types in reverse order,
    so each type runs on two different edges), head."""

    def __init__(self, types: Sequence[str] = KERNEL_FAMILIES):
        super().__init__()
        self.embed = nn.Linear(D_IN, D_MODEL)
        self.layers = nn.ModuleList(
            [build_dispatcher(canvas_spec(types)), build_dispatcher(canvas_spec(list(reversed(types))))]
        )
        self.head = nn.Linear(D_MODEL, D_OUT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return self.head(hidden)


def training_batches(steps: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of ``{"inputs": (batch, 48, D_IN), "targets": (batch, 48, D_OUT)}``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "inputs": torch.randn(batch, NUM_POSITIONS, D_IN, generator=generator),
            "targets": torch.randn(batch, NUM_POSITIONS, D_OUT, generator=generator),
        }
        for _ in range(steps)
    ]


def pass_results(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Output of ``module(x)`` and the gradients of x and of every parameter (None for one
    the output does not depend on) for a fixed seeded output cotangent."""
    leaf = x.detach().clone().requires_grad_(True)
    output = module(leaf)
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(5)).to(output)
    names = [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(output, [leaf, *module.parameters()], cotangent, allow_unused=True)
    return {"output": output.detach(), "x": grads[0], **dict(zip(names, grads[1:]))}


def assert_bitwise_equal(actual: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor | None]) -> None:
    """The same keys, Nones, dtypes and values, bit for bit."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value is None or actual[key] is None:
            assert value is None and actual[key] is None, key
            continue
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key
