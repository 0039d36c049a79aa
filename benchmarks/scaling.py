"""Helpers for the complexity-scaling benchmarks: peak memory in a fresh process, and the
log-log slope of a measured quantity against the size."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence


def peak_memory(name: str, n: int, m: int, options: Dict) -> Dict[str, float]:
    """``{"peak_bytes", "seconds"}`` of one forward+backward, measured by peak_memory.py.

    The process runs with glibc's mmap threshold fixed at 64 KiB: every larger block is
    mapped on allocation and unmapped on free, so the resident set follows the live tensors
    (with the default, growing threshold, freed blocks stay in the heap and the resident
    set keeps memory the program no longer holds).
    """
    script = Path(__file__).resolve().parent / "peak_memory.py"
    completed = subprocess.run(
        [sys.executable, str(script), name, str(n), str(m), json.dumps(options)],
        check=True, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-12)) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
