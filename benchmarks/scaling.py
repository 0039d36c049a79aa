"""Helpers for the complexity-scaling benchmarks: the measured call in each mode, peak memory
(in a fresh process on CPU, from the allocator's statistics on CUDA), and the log-log slope
of a measured quantity against the size.

The two modes: ``"forward"`` is the call a training step makes (inputs and parameters
require gradients, so autograd records the graph and keeps what the backward needs), without
its backward; ``"forward+backward"`` adds ``output.sum().backward()``. Forward is not timed
under ``torch.no_grad()``: that would measure inference, which keeps nothing for a backward.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MODES = ("forward", "forward+backward")
D_MODEL, N_HEADS = 256, 4


def build_case(
    name: str,
    n: int,
    m: int,
    options: dict,
    device: str = "cpu",
    d_model: int = D_MODEL,
    n_heads: int = N_HEADS,
    batch: int = 1,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(module, queries (batch, n, d_model), keys (batch, m, d_model)) on ``device``, seeded with 0.

    The module comes from ``canvas_engineering.create_attention`` as found on ``sys.path``:
    this package's, or the peer's in peer_timing.py's process, so that both build the same
    case. Keys also serve as values; both inputs require gradients.
    """
    from canvas_engineering import create_attention

    torch.manual_seed(0)
    module = create_attention(name, d_model, n_heads, **options).to(device)
    queries = torch.randn(batch, n, d_model, device=device, requires_grad=True)
    keys = torch.randn(batch, m, d_model, device=device, requires_grad=True)
    return module, queries, keys


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(module: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor, mode: str) -> None:
    """One call of ``module(queries, keys, keys)`` in ``mode`` (see the module docstring),
    finished on the device when it returns. A type whose output needs no gradient (``none``)
    has no backward to run."""
    output = module(queries, keys, keys)
    if mode == "forward+backward" and output.requires_grad:
        output.sum().backward()
    synchronize(queries.device)


def timed_call(
    run: Callable[[], torch.Tensor], device: torch.device, on_forward: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one call of ``run()`` and its backward.

    ``run`` returns the output; the forward's time is read when it returns (after a device
    synchronisation), so it is the time of a forward-mode call; ``on_forward`` runs then
    (its time counts in the forward+backward total only), and the backward follows.
    """
    start = time.perf_counter()
    output = run()
    synchronize(device)
    forward = time.perf_counter() - start
    on_forward()
    if output.requires_grad:
        output.sum().backward()
    synchronize(device)
    return forward, time.perf_counter() - start


def peak_memory(name: str, n: int, m: int, options: dict, device: str = "cpu") -> dict[str, float]:
    """Peak memory and time of one forward+backward call and of its forward part:
    ``{"peak_bytes", "seconds", "forward_peak_bytes", "forward_seconds"}``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call, above what was allocated before
    it, measured in this process. CPU: the growth of the resident set of a fresh process
    running peak_memory.py, with glibc's mmap threshold fixed at 64 KiB: every larger block
    is mapped on allocation and unmapped on free, so the resident set follows the live
    tensors (with the default, growing threshold, freed blocks stay in the heap and the
    resident set keeps memory the program no longer holds).
    """
    if torch.device(device).type == "cuda":
        from peak_memory import measure

        return measure(*build_case(name, n, m, options, device))
    script = Path(__file__).resolve().parent / "peak_memory.py"
    completed = subprocess.run(
        [sys.executable, str(script), name, str(n), str(m), json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-12)) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
