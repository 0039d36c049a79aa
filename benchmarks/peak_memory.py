"""Peak memory of one forward+backward of an attention type, and of its forward part.

Usage: ``python peak_memory.py NAME N M OPTIONS_JSON``; builds the case of
``scaling.build_case`` on the CPU and prints the JSON of ``measure``. On CPU the peak is the
largest growth of the process's resident set over its size just before the call, sampled
every 0.2 ms by a thread reading /proc/self/statm (PyTorch's CPU allocator keeps no peak
statistics; large tensors are mapped and unmapped, so the resident set follows them), and a
fresh process per measurement keeps one size's allocations out of another's. On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch
from scaling import build_case, timed_call

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class ResidentPeak(threading.Thread):
    """Samples the resident set until stopped; ``read()`` is the peak growth so far (bytes)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.baseline = resident_bytes()
        self.peak = self.baseline
        self.running = True
        self.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0002)

    def read(self) -> int:
        return max(self.peak, resident_bytes()) - self.baseline

    def stop(self) -> None:
        self.running = False
        self.join()


class CudaPeak:
    """The CUDA allocator's peak since construction, above what was allocated then (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.baseline = torch.cuda.memory_allocated(device)

    def read(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline

    def stop(self) -> None:
        pass


def measure(module: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    """``{"peak_bytes", "seconds"}`` of one forward+backward of ``module(queries, keys, keys)``
    and ``{"forward_peak_bytes", "forward_seconds"}`` of its forward part (the peak when the
    forward returns), on the inputs' device."""
    tracker = CudaPeak(queries.device) if queries.device.type == "cuda" else ResidentPeak()
    forward_peak = []
    forward_seconds, seconds = timed_call(
        lambda: module(queries, keys, keys), queries.device, lambda: forward_peak.append(tracker.read())
    )
    peak = tracker.read()
    tracker.stop()
    return {
        "peak_bytes": peak,
        "seconds": seconds,
        "forward_peak_bytes": forward_peak[0],
        "forward_seconds": forward_seconds,
    }


if __name__ == "__main__":
    name, n, m, options = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    print(json.dumps(measure(*build_case(name, n, m, options))))
