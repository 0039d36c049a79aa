"""The topology as masks on the CPU: ``to_attention_mask`` against canvas-engineering 0.5.0,
and ``to_block_mask`` with its peak memory.

Run: ``python -m pytest benchmarks/test_mask_speed.py --benchmark-json=PATH``.
Canvases: ``causal_temporal`` (``canvases.py``: three regions, every edge at the same or the
previous frame) and the ``robot_manipulation`` recipe (edges over all frames), at 512
positions (T=8, 8x8 grid) and 4096 (T=16, 16x16); the block mask on ``causal_temporal`` at
4096 and 16384 positions (T=16, 32x32). Ours is timed by pytest-benchmark. The peer's
``to_attention_mask`` runs the same declarations in a subprocess (its import name is ours
too), ``PEER_ROUNDS`` timed calls (default 3 at 512 positions, 1 at 4096, where one call
takes minutes); its times and the ratio of medians go into ``extra_info``. The block mask's
time and peak memory (resident-set growth) are also measured in a fresh process
(``mask_memory.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering.recipes import RECIPES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from canvases import causal_temporal, to_spec  # noqa: E402
from mask_memory import block_mask_peak  # noqa: E402
from peer import run_peer  # noqa: E402

SIZES = {512: (8, 8), 4096: (16, 16)}
BUILDERS = {"causal_temporal": causal_temporal, "robot_manipulation": RECIPES["robot_manipulation"]}


def peer_rounds(positions: int) -> int:
    return int(os.environ.get("PEER_ROUNDS", "3" if positions <= 512 else "1"))


@pytest.mark.parametrize("positions", sorted(SIZES))
@pytest.mark.parametrize("canvas", sorted(BUILDERS))
def test_attention_mask(benchmark, canvas, positions):
    T, grid = SIZES[positions]
    topology, layout = BUILDERS[canvas](T=T, grid=grid)
    assert layout.num_positions == positions
    case = {"kind": "masks", "timed": True, "declarations": to_spec(topology, layout)}
    peer = [result["attention_mask_s"] for result in run_peer([case] * peer_rounds(positions))]
    benchmark.pedantic(lambda: topology.to_attention_mask(layout), rounds=10, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "positions": positions,
            "peer_times_s": peer,
            "peer_median_s": statistics.median(peer),
            "speedup_vs_peer": statistics.median(peer) / ours,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    print(
        f"\n{canvas} at {positions}: ours {ours * 1e3:.2f} ms, peer {statistics.median(peer) * 1e3:.0f} ms, "
        f"{statistics.median(peer) / ours:.0f}x"
    )


@pytest.mark.parametrize("T, grid", [(16, 16), (16, 32)])
def test_block_mask(benchmark, T, grid):
    topology, layout = causal_temporal(T=T, grid=grid)
    benchmark.pedantic(lambda: topology.to_block_mask(layout, 128), rounds=10, warmup_rounds=1)
    fresh = block_mask_peak(T, grid, 128)
    benchmark.extra_info.update({**fresh, "torch": torch.__version__, "threads": torch.get_num_threads()})
    print(
        f"\nblock mask at {layout.num_positions}: {benchmark.stats.stats.median * 1e3:.1f} ms, "
        f"{fresh['computed_blocks']} of {fresh['all_blocks']} blocks, peak {fresh['peak_bytes'] / 2**20:.1f} MiB"
    )
