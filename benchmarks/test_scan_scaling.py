"""RWKV and Mamba on CPU (eager): forward+backward time as M grows, and against the peer.

Run: ``python -m pytest benchmarks/test_scan_scaling.py --benchmark-json=PATH``.
One module each, d_model 256, 4 heads, batch 1, M in {1024, 4096, 16384}, with N = M and
with N fixed at 256 queries; timed by pytest-benchmark; the last size of each series
records the fitted log-log slope. At M = 4096 the peer (canvas-engineering 0.5.0) times the
same module and shapes in a subprocess, and the ratio of medians goes into ``extra_info``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering import create_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import loglog_slope  # noqa: E402
from test_dispatch_speed import run_peer_timing  # noqa: E402

SIZES = [1024, 4096, 16384]
PEER_SIZE = 4096
measured: dict = {}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("queries", ["N=M", "N=256"])
@pytest.mark.parametrize("name", ["rwkv", "mamba"])
def test_scan_scaling(benchmark, name, queries, size):
    torch.manual_seed(0)
    module = create_attention(name, 256, 4)
    n = size if queries == "N=M" else 256
    q = torch.randn(1, n, 256, requires_grad=True)
    kv = torch.randn(1, size, 256, requires_grad=True)
    benchmark.pedantic(lambda: module(q, kv, kv).sum().backward(), rounds=5, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update({"n": n, "m": size})
    if size == PEER_SIZE:
        job = {"module": name, "queries": n, "length": size, "d_model": 256, "n_heads": 4, "batch": 1, "rounds": 2}
        peer = run_peer_timing(job)
        benchmark.extra_info.update({"peer_times_s": peer, "speedup_vs_peer": statistics.median(peer) / ours})
        print(
            f"\n{name} {queries} M={size}: ours {ours:.3f} s, peer {statistics.median(peer):.3f} s, "
            f"{statistics.median(peer) / ours:.1f}x"
        )
    runs = measured.setdefault((name, queries), {})
    runs[size] = ours
    if len(runs) == len(SIZES):
        benchmark.extra_info["time_slope"] = loglog_slope(SIZES, [runs[s] for s in SIZES])
        print(f"\n{name} {queries}: time slope {benchmark.extra_info['time_slope']:.2f}")


@pytest.mark.parametrize("size", SIZES)
def test_selective_scan_op_scaling(benchmark, size):
    """The scan alone (Mamba's module adds an O(N * M) softmax readout): d_model 256, state 16."""
    from canvas_engineering.ops.selective_scan import selective_scan

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, size, 256, generator=generator, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(1, size, 256, generator=generator))
    A = -torch.arange(1, 17, dtype=torch.float32).repeat(256, 1)
    B, C = torch.randn(1, size, 16, generator=generator), torch.randn(1, size, 16, generator=generator)
    D = torch.ones(256)
    benchmark.pedantic(lambda: selective_scan(x, dt, A, B, C, D).sum().backward(), rounds=5, warmup_rounds=1)
    runs = measured.setdefault("selective_scan", {})
    runs[size] = benchmark.stats.stats.median
    benchmark.extra_info.update({"n": size})
    if len(runs) == len(SIZES):
        benchmark.extra_info["time_slope"] = loglog_slope(SIZES, [runs[s] for s in SIZES])
        print(f"\nselective_scan: time slope {benchmark.extra_info['time_slope']:.2f}")
