"""Peak memory of one forward+backward of an attention type, measured in a fresh process.

Usage: ``python peak_memory.py NAME N M OPTIONS_JSON``; prints JSON with the largest growth
of the process's resident set over its size just before the call (bytes), sampled every
0.2 ms by a thread reading /proc/self/statm, and the call's time. (PyTorch's CPU allocator
keeps no peak statistics; large tensors are mapped and unmapped, so the resident set follows
them.) A fresh process per measurement keeps one size's allocations out of another's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Samples the resident set until stopped; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = resident_bytes()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0002)


def main(name: str, n: int, m: int, options: dict) -> None:
    import torch

    from canvas_engineering import create_attention

    torch.manual_seed(0)
    module = create_attention(name, options.pop("d_model", 256), options.pop("n_heads", 4), **options)
    queries = torch.randn(1, n, module.d_model, requires_grad=True)
    keys = torch.randn(1, m, module.d_model, requires_grad=True)
    baseline = resident_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    output = module(queries, keys, keys)
    if output.requires_grad:
        output.sum().backward()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    print(json.dumps({"peak_bytes": max(sampler.peak, resident_bytes()) - baseline, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
