"""The complexity profile's machinery: its report on a synthetic benchmark JSON whose times and
memory follow known power laws, the peak-memory measurement on known allocations, and the
peer timing script (both modes, its time limit, its errors, the dispatcher form its other
callers use)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import complexity_profile  # noqa: E402
from peer_timing import time_on_peer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import peer_dir  # noqa: E402

from canvas_engineering import BUILTIN_ATTENTION  # noqa: E402

SIZES = [256, 1024, 4096]
TIME_EXPONENT = {"forward": 1.5, "forward+backward": 1.75}
MEMORY_EXPONENT = {"forward": 0.5, "forward+backward": 1.25}
PEER_TIMES = [0.3, 0.1, 0.2]


def ours_seconds(size: int, mode: str) -> float:
    return 1e-3 * (size / 256) ** TIME_EXPONENT[mode]


def synthetic_profile() -> dict:
    """A pytest-benchmark JSON as test_types_scaling writes it, for every registered name:
    time and memory are power laws of the size; the peer ran every type at the middle size
    of N = M, and in the N = 256 sweep gave up at the largest size and ran at the middle one,
    except for ``mamba``, which it ran at no size."""
    benchmarks = []
    for name in BUILTIN_ATTENTION:
        for sweep in ("N=M", "N=256"):
            for size in SIZES:
                for mode in ("forward", "forward+backward"):
                    n, m = (size, size) if sweep == "N=M" else (256, size)
                    info = {
                        "type": name,
                        "sweep": sweep,
                        "n": n,
                        "m": m,
                        "mode": mode,
                        "profile": "quick",
                        "device": "cpu",
                        "torch": "2.0",
                        "peak_bytes": int(2**20 * (size / 256) ** MEMORY_EXPONENT[mode]),
                    }
                    if sweep == "N=M" and size == 1024:
                        info["peer"] = {"n": 1024, "m": 1024, "times_s": PEER_TIMES, "too_slow": [], "limit_s": 20.0}
                    elif sweep == "N=256" and size == 4096 and name == "mamba":
                        info["peer"] = {"too_slow": [[256, 4096], [256, 1024], [256, 256]], "limit_s": 20.0}
                    elif sweep == "N=256" and size == 4096:
                        info["peer"] = {
                            "n": 256,
                            "m": 1024,
                            "times_s": PEER_TIMES,
                            "too_slow": [[256, 4096]],
                            "limit_s": 20.0,
                        }
                    benchmarks.append({"stats": {"median": ours_seconds(size, mode)}, "extra_info": info})
    machine = {"cpu": {"brand_raw": "Test CPU", "count": 2}, "machine": "x86_64", "python_version": "3.11.0"}
    return {"datetime": "2030-01-02T00:00:00", "machine_info": machine, "benchmarks": benchmarks}


def parse_table(lines: list) -> list:
    """The table's rows as dicts keyed by its header."""
    rows = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in rows[2:]]


def test_report_table_has_every_type_both_modes_and_the_peer():
    rows = parse_table(complexity_profile.table(synthetic_profile(), "data.json"))
    assert sorted((row["type"], row["sweep"]) for row in rows) == sorted(
        (name, sweep) for name in BUILTIN_ATTENTION for sweep in ("N=M", "N=256")
    )
    for row in rows:
        for mode, short in (("forward", "fwd"), ("forward+backward", "fwd+bwd")):
            assert float(row[f"time slope {short}"]) == pytest.approx(TIME_EXPONENT[mode], abs=0.005)
            assert float(row[f"memory slope {short}"]) == pytest.approx(MEMORY_EXPONENT[mode], abs=0.005)
            assert float(row[f"{short} ms at largest"]) == pytest.approx(ours_seconds(4096, mode) * 1e3, rel=1e-3)
            if row["type"] == "mamba" and row["sweep"] == "N=256":
                assert row[f"speed vs 0.5.0 {short}"] == "–"
            else:
                expected = statistics.median(PEER_TIMES) / ours_seconds(1024, mode)
                assert float(row[f"speed vs 0.5.0 {short}"].rstrip("x")) == pytest.approx(expected, rel=5e-3)
        assert row["largest"] == "4096"
        assert float(row["fwd+bwd peak MiB at largest"]) == pytest.approx(
            16 ** MEMORY_EXPONENT["forward+backward"], rel=1e-3
        )
    by_key = {(row["type"], row["sweep"]): row for row in rows}
    assert by_key[("cogvideox", "N=M")]["0.5.0 compared at"] == "N=M=1024"
    assert by_key[("cogvideox", "N=256")]["0.5.0 compared at"] == "M=1024; 0.5.0 over 20 s a call at M=4096"
    assert by_key[("mamba", "N=256")]["0.5.0 compared at"] == "0.5.0 over 20 s a call at M=4096, M=1024, M=256"
    assert all(row["claimed"] == BUILTIN_ATTENTION[row["type"]].complexity for row in rows)
    assert by_key[("self_attention", "N=M")]["claimed"] == by_key[("cross_attention", "N=M")]["claimed"] == "O(NM)"


def test_report_replaces_only_the_marked_block_and_draws_both_modes(tmp_path):
    data = tmp_path / "profile.json"
    data.write_text(json.dumps(synthetic_profile()))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"before\n{complexity_profile.BEGIN}\nold table\n{complexity_profile.END}\nafter\n")
    complexity_profile.report(data, results, tmp_path / "plots")
    text = results.read_text()
    assert text.startswith("before\n<!-- profile:begin -->") and text.endswith("<!-- profile:end -->\nafter\n")
    assert "old table" not in text and "Test CPU (2 cores, device cpu)" in text and f"data: `{data}`" in text
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "profile-N256-forward.png",
        "profile-N256.png",
        "profile-NM-forward.png",
        "profile-NM.png",
    ]


MEASURE_KNOWN_ALLOCATIONS = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from peak_memory import measure


class Allocates(torch.nn.Module):
    # Forward allocates one (64 * 2**18,) float32 tensor, exp of a broadcast parameter, and keeps
    # it for the backward, which multiplies the broadcast gradient by it into another of the same
    # size: forward peaks at 64 MiB, forward+backward at twice that.

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, queries, keys, values):
        return self.scale.expand(64 * 2**18).exp().sum()


queries = torch.zeros(1, 1, 1)
print(json.dumps(measure(Allocates(), queries, queries)))
"""


def test_peak_memory_sees_known_allocations():
    """In a fresh process with the allocator setting the profile uses (scaling.peak_memory)."""
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE_KNOWN_ALLOCATIONS, str(BENCHMARKS)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    memory = json.loads(completed.stdout.strip().splitlines()[-1])
    assert 64 <= memory["forward_peak_bytes"] / 2**20 < 64 + 16
    assert 128 <= memory["peak_bytes"] / 2**20 < 128 + 16


@pytest.mark.peer
def test_peer_timing_times_both_modes_and_gives_up_past_its_limit():
    job = {"module": "rwkv", "queries": 32, "length": 64, "d_model": 256, "n_heads": 4, "batch": 1, "rounds": 2}
    result = time_on_peer(job)
    assert Path(result["package"]).is_relative_to(peer_dir())
    assert len(result["times_s"]) == len(result["forward_times_s"]) == 2
    assert time_on_peer({**job, "length": 4096, "limit_s": 0.05}) == {"exceeded_s": 0.05}
    with pytest.raises(RuntimeError, match="Unknown attention type"):
        time_on_peer({**job, "module": "no_such_type"})


@pytest.mark.peer
def test_peer_timing_runs_a_dispatcher():
    from canvases import causal_temporal, to_spec

    topology, layout = causal_temporal(T=2, grid=4, d_model=64)
    result = time_on_peer(
        {"declarations": to_spec(topology, layout), "d_model": 64, "n_heads": 4, "batch": 1, "rounds": 1}
    )
    assert Path(result["package"]).is_relative_to(peer_dir())
    assert len(result["times_s"]) == 1
