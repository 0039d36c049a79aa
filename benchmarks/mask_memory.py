"""Time and peak memory of building a topology's FlexAttention block mask, in a fresh process.

Usage: ``python mask_memory.py T GRID BLOCK_SIZE`` prints the JSON of :func:`measure` for the
``causal_temporal`` canvas of ``canvases.py`` at ``T`` frames on a ``GRID x GRID`` grid
(``T * GRID**2`` positions); :func:`block_mask_peak` runs it in a subprocess. The peak is
the growth of the process's resident set (``peak_memory.ResidentPeak``) during the second
build (the first loads what torch loads lazily).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(T: int, grid: int, block_size: int) -> dict[str, float]:
    """``{"positions", "block_size", "all_blocks", "computed_blocks", "peak_bytes", "seconds"}``
    of one ``to_block_mask`` call on the causal_temporal canvas (computed blocks: partial
    and full)."""
    from canvases import causal_temporal
    from peak_memory import ResidentPeak

    topology, layout = causal_temporal(T=T, grid=grid)
    topology.to_block_mask(layout, block_size)
    tracker = ResidentPeak()
    start = time.perf_counter()
    block_mask = topology.to_block_mask(layout, block_size)
    seconds = time.perf_counter() - start
    peak = tracker.read()
    tracker.stop()
    blocks = block_mask.kv_indices.shape[-1]
    computed = int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())
    return {
        "positions": layout.num_positions,
        "block_size": block_size,
        "all_blocks": blocks**2,
        "computed_blocks": computed,
        "peak_bytes": peak,
        "seconds": seconds,
    }


def block_mask_peak(T: int, grid: int, block_size: int) -> dict[str, float]:
    """:func:`measure` in a fresh Python process."""
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(T), str(grid), str(block_size)],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(json.dumps(measure(*map(int, sys.argv[1:4]))))
