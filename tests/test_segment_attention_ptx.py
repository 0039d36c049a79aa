"""The segment attention kernels place keys in a local window with 64-bit arithmetic in
their sm_90 PTX: ``floor(m * N / M)`` multiplies two lengths, which passes 2^31 once
N * M does (a test at that size is too large for the interpreter, so the compiled code is
read instead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

COUNT_DIVISIONS = """
import json, re, sys
import compile_for_hopper as c

counts = {}
kernels = (
    ("fwd", c.attention.segment_attention_fwd_kernel),
    ("bwd_dkdv", c.attention.segment_attention_bwd_dkdv_kernel),
)
for kind, kernel in kernels:
    for window in (0, 64):
        constexprs, warps = c.attention_tiles(kind, 64, "bf16")
        types = c.signature(kernel, "bf16")
        launch = {**constexprs, "WINDOW": window, "SIGMOID": False}
        compiled = c.compile_sm90(kernel, types, launch, c.pointer_hints(kernel, types), warps)
        counts[f"{kind} {window}"] = len(re.findall(r"\\bdiv\\.s64\\b", compiled.asm["ptx"]))
print(json.dumps(counts))
"""


def test_window_placement_divides_in_64_bits():
    """With a window, the forward and dK/dV kernels divide 64-bit products (``div.s64``);
    without one they have no 64-bit division at all."""
    tests = Path(__file__).resolve().parent
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, "-c", COUNT_DIVISIONS], env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    counts = json.loads(completed.stdout.strip().splitlines()[-1])
    assert counts["fwd 0"] == counts["bwd_dkdv 0"] == 0, counts
    assert counts["fwd 64"] > 0 and counts["bwd_dkdv 64"] > 0, counts
