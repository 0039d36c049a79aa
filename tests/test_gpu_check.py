"""The GPU check script's dry run: it runs end to end on a CPU, keeps going past a failing
step and writes its report as it goes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.sh"
FAILING_TEST = """
def test_deliberately_failing():
    assert 1 + 1 == 3
"""


def test_dry_run_with_a_failing_test_runs_every_step(tmp_path):
    """One test fails on purpose: the script says so in its exit code, and every other
    step still ran and left its results in the output folder."""
    failing = tmp_path / "extra" / "test_deliberately_failing.py"
    failing.parent.mkdir()
    failing.write_text(FAILING_TEST)
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, GPU_CHECK_EXTRA_TESTS=str(failing))
    completed = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 1, completed.stdout[-4000:] + completed.stderr[-2000:]

    steps = {
        name: (int(code), int(seconds))
        for name, code, seconds in (line.split() for line in (out / "steps.txt").read_text().splitlines())
    }
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    assert list(steps) == ["versions", "tests", "benchmarks", "topology"]
    assert steps["tests"][0] != 0 and steps["versions"][0] == steps["benchmarks"][0] == 0, steps
    assert steps["topology"][0] == (0 if has_diffusers else 1), steps
    for name in steps:
        assert f"== {name}: exit {steps[name][0]} after {steps[name][1]} s" in completed.stdout

    tests_log = (out / "tests.log").read_text()
    assert "test_deliberately_failing FAILED" in tests_log and "1 failed, 2 passed" in tests_log, tests_log[-2000:]
    assert 'failures="1"' in (out / "tests.xml").read_text()
    assert "torch" in (out / "versions.txt").read_text()

    report = json.loads((out / "kernels.json").read_text())
    assert report["dry_run"] and report["ceilings"]["copy_GBps"] > 0
    variants = {r["variant"] for r in report["results"]}
    hyena = {v for v in variants if v.startswith("hyena_L")}
    assert variants - hyena == {
        "softmax_one_segment",
        "softmax_many_frames",
        "local_w64",
        "top_k8",
        "sigmoid",
        "rwkv_scan",
        "mamba_scan",
        "linear",
    }
    assert len(hyena) == 2
    timings = (
        "kernel_fwd_first_call_ms",
        "kernel_fwd_ms",
        "kernel_fwd_bwd_first_call_ms",
        "kernel_fwd_bwd_ms",
        "eager_fwd_ms",
        "anchor_fwd_ms",
    )
    for result in report["results"]:
        assert "error" not in result, result
        assert all(math.isfinite(result[key]) and result[key] > 0 for key in timings), result

    *masks, processor = json.loads((out / "topology.json").read_text())["results"]
    assert [r["variant"] for r in masks] == ["flex_block_mask_P32", "sdpa_additive_mask_P32", "sdpa_no_mask_P32"]
    assert all("error" not in r and r["fwd_ms"] > 0 for r in masks), masks
    assert masks[0]["max_abs_diff_vs_sdpa_mask"] < 1e-5 and 0 < masks[0]["block_density"] <= 1
    if has_diffusers:
        assert processor["max_abs_diff_flex_vs_sdpa"] < 1e-5 and processor["sdpa_fwd_bwd_ms"] > 0, processor
    else:
        assert "diffusers" in processor["error"], processor


def test_benchmarks_keep_going_and_write_as_they_go(tmp_path):
    """A variant that raises is recorded with its error, the next one still runs, and the
    JSON on disk already holds every earlier variant when the next one starts."""
    spec = importlib.util.spec_from_file_location("gpu_kernels", BENCHMARKS / "gpu_kernels.py")
    gpu_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_kernels)
    path = tmp_path / "kernels.json"

    def recorded():
        return [r["variant"] for r in json.loads(path.read_text())["results"]]

    def broken():
        raise RuntimeError("deliberate")

    variants = [
        ("first", lambda: {"variant": "first"}),
        ("broken", broken),
        ("last", lambda: {"variant": "last", "seen": recorded()}),
    ]
    report = {"results": []}
    assert not gpu_kernels.run_cases(variants, report, path)
    on_disk = json.loads(path.read_text())["results"]
    assert [r["variant"] for r in on_disk] == ["first", "broken", "last"]
    assert on_disk[1]["error"] == "RuntimeError: deliberate"
    assert on_disk[2]["seen"] == ["first", "broken"]
    assert all(r["elapsed_s"] >= 0 for r in on_disk)
    assert gpu_kernels.run_cases(variants[:1], {"results": []}, path)
