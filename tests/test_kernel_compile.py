"""Every Triton kernel compiles for Hopper (sm_90), in its main configurations, on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")


def test_kernels_compile_for_sm90():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    script = Path(__file__).resolve().parent / "compile_for_hopper.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    completed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert completed.stdout.count("ok ") == 72 and "FAIL" not in completed.stdout, completed.stdout
    half = [
        line
        for line in completed.stdout.splitlines()
        if line.startswith(("ok   linear_", "ok   fftconv_")) and " bf16 " in line
    ]
    assert half and all(line.endswith("-bf16") for line in half), half
