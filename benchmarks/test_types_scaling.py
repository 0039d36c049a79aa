"""Every attention type: forward+backward time and peak memory as the sequence grows.

Two sweeps per type: N = M growing, and M growing with N fixed at 256. Time by
pytest-benchmark (median of ``ROUNDS`` rounds after a warm-up), peak memory in a fresh
process (``scaling.peak_memory``). ``PROFILE=quick`` (default) uses sizes 256..4096 and one
round; ``PROFILE=full`` sizes 512..16384 and three rounds. Run through
``python benchmarks/complexity_profile.py`` (it writes the JSON, RESULTS.md's table and the plots).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering import ATTENTION_TYPES, create_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import peak_memory  # noqa: E402

FULL = os.environ.get("PROFILE", "quick") == "full"
SIZES = [512, 2048, 8192, 16384] if FULL else [256, 1024, 4096]
ROUNDS = 3 if FULL else 1
OPTIONS = {"hyena": {"max_len": max(SIZES)}}
SWEEPS = {"N=M": lambda size: (size, size), "N=256": lambda size: (256, size)}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sweep", sorted(SWEEPS))
@pytest.mark.parametrize("name", sorted(ATTENTION_TYPES))
def test_type_scaling(benchmark, name, sweep, size):
    n, m = SWEEPS[sweep](size)
    options = OPTIONS.get(name, {})
    torch.manual_seed(0)
    module = create_attention(name, 256, 4, **options)
    queries = torch.randn(1, n, 256, requires_grad=True)
    keys = torch.randn(1, m, 256, requires_grad=True)

    def step():
        output = module(queries, keys, keys)
        if output.requires_grad:
            output.sum().backward()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    memory = peak_memory(name, n, m, dict(options))
    benchmark.extra_info.update({"type": name, "sweep": sweep, "n": n, "m": m, "peak_bytes": memory["peak_bytes"]})
