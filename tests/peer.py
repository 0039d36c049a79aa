"""Access to canvas-engineering 0.5.0 (the peer) for parity tests.

Its import name is also ``canvas_engineering``, so it runs in a subprocess, with its
unpacked wheel first on PYTHONPATH, and tensors travel through files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

PEER_VERSION = "0.5.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
PEER_ATTENTION_NAMES = (
    "cross_attention",
    "self_attention",
    "linear_attention",
    "cosine_attention",
    "sigmoid_attention",
    "gated",
    "perceiver",
    "pooling",
    "copy",
    "sparse_attention",
    "local_attention",
    "random_fixed",
    "mixture",
    "mamba",
    "rwkv",
    "hyena",
    "cogvideox",
    "none",
)
"""The 18 names the peer registers: the specification's 17 types and the alias
``self_attention``. Parity is checked for these; a type added since has no peer counterpart."""


def peer_dir() -> Path:
    """The folder holding the unpacked peer wheel, downloading it with pip if needed.

    ``CANVAS_PEER_DIR`` overrides the default ``<repo>/.peer/canvas-engineering-0.5.0``.
    """
    target = Path(os.environ.get("CANVAS_PEER_DIR", REPO_ROOT / ".peer" / f"canvas-engineering-{PEER_VERSION}"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers started together download it once
        if (target / "canvas_engineering" / "attention.py").is_file():
            return target
        with tempfile.TemporaryDirectory() as download:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--quiet",
                    "-d",
                    download,
                    f"canvas-engineering=={PEER_VERSION}",
                ],
                check=True,
            )
            (wheel,) = Path(download).glob("canvas_engineering-*.whl")
            unpacked = Path(download) / "unpacked"
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(unpacked)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(unpacked), str(target))
    return target


def run_peer(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``cases`` (see peer_runner.run_case) on the peer; returns its results in order."""
    with tempfile.TemporaryDirectory() as work:
        job, result = Path(work) / "job.pt", Path(work) / "result.pt"
        torch.save(cases, job)
        env = {**os.environ, "PYTHONPATH": str(peer_dir())}
        completed = subprocess.run(
            [sys.executable, str(RUNNER), str(job), str(result)], env=env, capture_output=True, text=True
        )
        if completed.returncode:
            raise RuntimeError(f"the peer run failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
        return torch.load(result, weights_only=False)
