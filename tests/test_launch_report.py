"""The launch report (benchmarks/launch_report.py) on one small workload: it records the
launchers' launches, compiles them for sm_90 and writes its rows as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "launch_report.py"
KEYS = {
    "kernel",
    "workload",
    "programs",
    "registers",
    "spill_bytes",
    "smem_bytes",
    "mma",
    "hbm_bytes",
    "flops",
    "est_us",
}


def test_report_on_the_wkv_workload(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent)
    target = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "wkv M4096", "--json", str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Estimates" in completed.stdout
    rows = json.loads(target.read_text())
    assert {row["kernel"] for row in rows} >= {"wkv/wkv_fwd_kernel", "wkv/wkv_bwd_kernel"}
    for row in rows:
        assert KEYS <= row.keys()
        assert row["workload"] == "M4096-B2-H4-d64-bf16"
        assert row["registers"] > 0 and row["programs"] > 0 and row["est_us"] >= row["floor_us"] > 0
        assert row["hbm_bytes"] >= 2 * 2 * 4096 * 4 * 64 * 2
