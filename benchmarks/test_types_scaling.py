"""Every registered attention name: time and peak memory as the sequence grows, forward and
forward+backward, and the speed of canvas-engineering 0.5.0 (the peer) on the same call.

Two sweeps per type: N = M growing, and M growing with N fixed at 256; two modes (see
``scaling.MODES``: forward is the training call without its backward, not a no-grad call).
Time by pytest-benchmark (median of the profile's rounds after a warm-up); peak memory of
both modes from one forward+backward (``scaling.peak_memory``: a fresh process on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). At the profile's peer size of each sweep the
peer times the same module and inputs in a subprocess (``peer_timing.time_on_peer``), both
modes from the same calls; where one call takes longer than ``PEER_LIMIT_S`` (default 20 s),
it moves to the next smaller size, and the sizes it gave up on are recorded too.

``PROFILE`` picks the sizes: ``quick`` (default), ``full``, or ``smoke`` (tiny sizes that
check the pipeline only). Run through ``python benchmarks/complexity_profile.py``, which
writes the JSON, RESULTS.md's table and the plots.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from canvas_engineering import BUILTIN_ATTENTION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_timing import time_on_peer  # noqa: E402
from scaling import D_MODEL, MODES, N_HEADS, build_case, call, peak_memory  # noqa: E402

PROFILES = {
    "smoke": {"sizes": [64, 128], "rounds": 1, "peer_sizes": {"N=M": 128, "N=256": 128}, "peer_rounds": 1},
    "quick": {"sizes": [256, 1024, 4096], "rounds": 1, "peer_sizes": {"N=M": 1024, "N=256": 4096}, "peer_rounds": 1},
    "full": {
        "sizes": [512, 1024, 2048, 4096, 8192, 16384],
        "rounds": 3,
        "peer_sizes": {"N=M": 4096, "N=256": 16384},
        "peer_rounds": 2,
    },
}
PROFILE_NAME = os.environ.get("PROFILE", "quick")
if PROFILE_NAME not in PROFILES:
    raise ValueError(f"PROFILE must be one of {sorted(PROFILES)}; got {PROFILE_NAME!r}")
PROFILE = PROFILES[PROFILE_NAME]
SIZES = PROFILE["sizes"]
PEER_LIMIT_S = float(os.environ.get("PEER_LIMIT_S", "20"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEPS = {"N=M": lambda size: (size, size), "N=256": lambda size: (256, size)}
OPTIONS = {"hyena": {"max_len": max(max(SWEEPS[sweep](size)) for sweep in SWEEPS for size in SIZES)}}
PEER_KEYS = {"forward": "forward_times_s", "forward+backward": "times_s"}
peer_runs: dict = {}
memory_runs: dict = {}


def peer_measurement(name: str, sweep: str) -> dict:
    """The peer's times for ``name`` in ``sweep``, at the largest size up to the peer size
    where every call finished within PEER_LIMIT_S: {"n", "m", "times_s": {mode: [...]},
    "too_slow": [[n, m], ...], "limit_s"}; "n", "m" and "times_s" are absent if it finished
    at no size, and "failed" holds the end of its error output if it failed."""
    if (name, sweep) not in peer_runs:
        measured: dict = {"too_slow": [], "limit_s": PEER_LIMIT_S}
        for size in sorted((s for s in SIZES if s <= PROFILE["peer_sizes"][sweep]), reverse=True):
            n, m = SWEEPS[sweep](size)
            print(f"\n    0.5.0 {name} N={n} M={m}:", end="", flush=True)
            spec = {
                "module": name,
                "queries": n,
                "length": m,
                "options": OPTIONS.get(name, {}),
                "d_model": D_MODEL,
                "n_heads": N_HEADS,
                "batch": 1,
                "rounds": PROFILE["peer_rounds"],
                "device": DEVICE,
                "limit_s": PEER_LIMIT_S,
            }
            try:
                result = time_on_peer(spec)
            except RuntimeError as error:
                measured["failed"] = str(error)
                print(f" {error}", end="")
                break
            if "exceeded_s" in result:
                print(f" a call took over {PEER_LIMIT_S:g} s", end="", flush=True)
                measured["too_slow"].append([n, m])
                continue
            measured.update(n=n, m=m, times_s={mode: result[PEER_KEYS[mode]] for mode in MODES})
            print(f" {statistics.median(result['times_s']) * 1e3:.1f} ms forward+backward", end="")
            break
        print(flush=True)
        peer_runs[(name, sweep)] = measured
    return peer_runs[(name, sweep)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sweep", sorted(SWEEPS), ids=lambda sweep: sweep.replace("=", ""))
@pytest.mark.parametrize("name", sorted(BUILTIN_ATTENTION))
def test_type_scaling(benchmark, name, sweep, size, mode):
    n, m = SWEEPS[sweep](size)
    options = OPTIONS.get(name, {})
    module, queries, keys = build_case(name, n, m, options, DEVICE)
    benchmark.pedantic(lambda: call(module, queries, keys, mode), rounds=PROFILE["rounds"], warmup_rounds=1)
    if (name, n, m) not in memory_runs:
        memory_runs[(name, n, m)] = peak_memory(name, n, m, dict(options), DEVICE)
    memory = memory_runs[(name, n, m)]
    benchmark.extra_info.update(
        {
            "type": name,
            "sweep": sweep,
            "n": n,
            "m": m,
            "mode": mode,
            "profile": PROFILE_NAME,
            "device": DEVICE,
            "torch": torch.__version__,
            "peak_bytes": memory["forward_peak_bytes" if mode == "forward" else "peak_bytes"],
        }
    )
    if size == PROFILE["peer_sizes"][sweep]:
        peer = peer_measurement(name, sweep)
        benchmark.extra_info["peer"] = {**peer, "times_s": peer["times_s"][mode]} if "times_s" in peer else peer
