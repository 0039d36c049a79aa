"""Dispatcher forward+backward on the benchmark canvases, ours against the peer (CPU).

Run: ``python -m pytest benchmarks/test_dispatch_speed.py --benchmark-json=PATH``.
Ours is timed by pytest-benchmark; the peer, canvas-engineering 0.5.0, runs the same
declarations in a subprocess (its import name is ours too) and times ``PEER_ROUNDS`` calls
after a warm-up with ``time.perf_counter``; its times and the ratio of medians go into the
benchmark's ``extra_info``.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering import AttentionDispatcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from canvases import BATCH, CANVASES, D_MODEL, N_HEADS, to_spec  # noqa: E402
from peer_timing import time_on_peer  # noqa: E402

PEER_ROUNDS = int(os.environ.get("PEER_ROUNDS", "3"))


def peer_times(declarations) -> list:
    """The peer's forward+backward times in seconds for these declarations."""
    return run_peer_timing(
        {"declarations": declarations, "d_model": D_MODEL, "n_heads": N_HEADS, "batch": BATCH, "rounds": PEER_ROUNDS}
    )


def run_peer_timing(job: dict) -> list:
    """Times ``job`` (see peer_timing.py) on the peer in a subprocess; returns the seconds."""
    return time_on_peer(job)["times_s"]


@pytest.mark.parametrize("canvas", sorted(CANVASES))
def test_dispatcher_forward_backward(benchmark, canvas):
    topology, layout = CANVASES[canvas]()
    torch.manual_seed(0)
    dispatcher = AttentionDispatcher(topology, layout, D_MODEL, N_HEADS)
    x = torch.randn(BATCH, layout.num_positions, D_MODEL, requires_grad=True)

    def step():
        dispatcher(x).sum().backward()

    peer = peer_times(to_spec(topology, layout))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "positions": layout.num_positions,
            "segments": len(dispatcher.segments),
            "groups": len(dispatcher.plan().groups),
            "peer_times_s": peer,
            "peer_median_s": statistics.median(peer),
            "speedup_vs_peer": statistics.median(peer) / ours,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    print(
        f"\n{canvas}: ours {ours * 1e3:.1f} ms, peer {statistics.median(peer) * 1e3:.1f} ms, "
        f"{statistics.median(peer) / ours:.1f}x"
    )
