"""Linear attention and Hyena on CPU (eager): forward+backward time as N = M grows, and
against the peer at 4096.

Run: ``python -m pytest benchmarks/test_linear_hyena_scaling.py --benchmark-json=PATH``.
One module each, d_model 256, 4 heads, batch 1; linear at N = M from 1024 to 65536, Hyena
(max_len 16384) from 1024 to 16384; the last size of each series records the fitted
log-log slope; at 4096 the peer times the same case (``scaling.build_case``: the same
options, and Hyena's max_len sets the size of the filter parameters and so of their
gradients; queries and keys/values drawn apart) in a subprocess.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import build_case, loglog_slope  # noqa: E402
from test_dispatch_speed import run_peer_timing  # noqa: E402

SERIES = {
    "linear_attention": ([1024, 4096, 16384, 65536], {}),
    "hyena": ([1024, 4096, 16384], {"max_len": 16384}),
}
PEER_SIZE = 4096
measured: dict = {}


@pytest.mark.parametrize(
    "name, size", [(name, size) for name, (sizes, _) in SERIES.items() for size in sizes], ids=lambda v: str(v)
)
def test_scaling(benchmark, name, size):
    sizes, options = SERIES[name]
    module, queries, keys = build_case(name, size, size, options)
    benchmark.pedantic(lambda: module(queries, keys, keys).sum().backward(), rounds=5, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update({"n": size, "m": size, **options})
    if size == PEER_SIZE:
        peer = run_peer_timing(
            {"module": name, "length": size, "d_model": 256, "n_heads": 4, "batch": 1, "rounds": 3, "options": options}
        )
        benchmark.extra_info.update({"peer_times_s": peer, "speedup_vs_peer": statistics.median(peer) / ours})
        print(
            f"\n{name} {size}: ours {ours * 1e3:.1f} ms, peer {statistics.median(peer) * 1e3:.1f} ms, "
            f"{statistics.median(peer) / ours:.2f}x"
        )
    runs = measured.setdefault(name, {})
    runs[size] = ours
    if len(runs) == len(sizes):
        benchmark.extra_info["time_slope"] = loglog_slope(sizes, [runs[s] for s in sizes])
        print(f"\n{name}: time slope {benchmark.extra_info['time_slope']:.2f}")
