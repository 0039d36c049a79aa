"""Local and top-k sparse attention on CPU (eager): time and peak memory as N = M grows.

Run: ``python -m pytest benchmarks/test_local_sparse_scaling.py --benchmark-json=PATH``.
Each size is timed by pytest-benchmark (forward+backward, d_model 256, 4 heads, batch 1)
and its peak memory measured in a fresh process; the last benchmark of each series records
the fitted log-log slopes of time and memory in its ``extra_info``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering import create_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import loglog_slope, peak_memory  # noqa: E402

SIZES = [1024, 2048, 4096, 8192, 16384]
SERIES = {"local_w8": ("local_attention", {"window_size": 8}), "local_w64": ("local_attention", {"window_size": 64})}
measured: dict = {}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("series", sorted(SERIES))
def test_local_scaling(benchmark, series, size):
    name, options = SERIES[series]
    torch.manual_seed(0)
    module = create_attention(name, 256, 4, **options)
    x = torch.randn(1, size, 256, requires_grad=True)
    benchmark.pedantic(lambda: module(x, x, x).sum().backward(), rounds=3, warmup_rounds=1)
    memory = peak_memory(name, size, size, dict(options))
    runs = measured.setdefault(series, {})
    runs[size] = (benchmark.stats.stats.median, memory["peak_bytes"])
    benchmark.extra_info.update({"n": size, "m": size, "peak_bytes": memory["peak_bytes"], **options})
    if len(runs) == len(SIZES):
        sizes = sorted(runs)
        benchmark.extra_info["time_slope"] = loglog_slope(sizes, [runs[s][0] for s in sizes])
        benchmark.extra_info["memory_slope"] = loglog_slope(sizes, [runs[s][1] for s in sizes])
        print(
            f"\n{series}: time slope {benchmark.extra_info['time_slope']:.2f}, "
            f"memory slope {benchmark.extra_info['memory_slope']:.2f}"
        )


def test_sparse_at_16k(benchmark):
    """Top-k attention at N = M = 16384: peak memory of forward+backward, in a fresh process."""
    memory = benchmark.pedantic(
        lambda: peak_memory("sparse_attention", 16384, 16384, {"top_k": 8}), rounds=1, iterations=1
    )
    benchmark.extra_info.update({"n": 16384, "m": 16384, "top_k": 8, **memory})
    print(f"\nsparse_attention 16384: peak +{memory['peak_bytes'] / 2**20:.0f} MiB in {memory['seconds']:.1f} s")
