"""The GPU check script's dry run: it runs end to end on a CPU and writes its report."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_dry_run_writes_a_complete_report(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["dry_run"] and report["ceilings"]["copy_GBps"] > 0
    variants = {r["variant"] for r in report["results"]}
    hyena = {v for v in variants if v.startswith("hyena_L")}
    assert variants - hyena == {"softmax_one_segment", "softmax_many_frames", "local_w64", "top_k8", "sigmoid", "rwkv_scan", "mamba_scan", "linear"}
    assert len(hyena) == 2
    for result in report["results"]:
        assert all(math.isfinite(result[key]) and result[key] > 0 for key in ("kernel_fwd_ms", "kernel_fwd_bwd_ms", "eager_fwd_ms", "anchor_fwd_ms"))
    assert "passed" in (tmp_path / "tests.log").read_text()
    assert "torch" in (tmp_path / "versions.txt").read_text()
