"""Times calls of canvas-engineering 0.5.0 (the peer): an AttentionDispatcher or one module.

Usage: ``python peer_timing.py SPEC.pt RESULT.json`` with the peer's unpacked wheel first
on PYTHONPATH, or ``time_on_peer(spec)`` from another process, which runs that in a
subprocess (the peer's import name is ours too). SPEC holds {"declarations", "d_model",
"n_heads", "batch", "rounds"} for a dispatcher, or {"module", "length", "d_model",
"n_heads", "batch", "rounds"} (and optionally "queries", N, default N = length, and
"options", keyword arguments of ``create_attention``) for one attention module with
M = length. Optional for both: "device" (default "cpu") and "limit_s", the longest one
call may take.

The result is {"times_s": [...], "forward_times_s": [...]} of ``rounds`` timed calls after
one warm-up call, with "torch" (its version) and "package" (the ``__init__.py`` that ran).
Each call is a forward+backward whose forward part is timed on its own
(``scaling.timed_call``), so ``forward_times_s`` are forward-mode calls: the call a training
step makes, without its backward. When a call runs past "limit_s", the process stops there
and the result is {"exceeded_s": limit_s} instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def time_on_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs this script on the peer in a subprocess for ``spec``; returns its result.

    Raises RuntimeError with the end of the peer's error output when the run fails.
    """
    import torch

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from peer import peer_dir

    with tempfile.TemporaryDirectory() as work:
        spec_path, result_path = Path(work) / "spec.pt", Path(work) / "result.json"
        torch.save(spec, spec_path)
        completed = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(result_path)],
            env={**os.environ, "PYTHONPATH": str(peer_dir())},
            capture_output=True,
            text=True,
        )
        if completed.returncode:
            raise RuntimeError(f"the peer run failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
        return json.loads(result_path.read_text())


def give_up_after(limit_s: float, result_path: str) -> threading.Timer:
    """A started timer that writes {"exceeded_s": limit_s} and ends the process at once."""

    def give_up() -> None:
        Path(result_path).write_text(json.dumps({"exceeded_s": limit_s}))
        os._exit(0)

    timer = threading.Timer(limit_s, give_up)
    timer.daemon = True
    timer.start()
    return timer


def main(spec_path: str, result_path: str) -> None:
    import torch

    import canvas_engineering as package

    sys.path.insert(0, str(TESTS))
    from peer_runner import build_declarations
    from scaling import build_case, timed_call

    spec = torch.load(spec_path, weights_only=False)
    device = torch.device(spec.get("device", "cpu"))
    if "module" in spec:
        module, queries, keys = build_case(
            spec["module"],
            spec.get("queries", spec["length"]),
            spec["length"],
            spec.get("options", {}),
            device,
            spec["d_model"],
            spec["n_heads"],
            spec["batch"],
        )
        run = lambda: module(queries, keys, keys)
    else:
        torch.manual_seed(0)
        topology, layout = build_declarations(package, spec["declarations"])
        dispatcher = package.AttentionDispatcher(topology, layout, spec["d_model"], spec["n_heads"]).to(device)
        x = torch.randn(spec["batch"], layout.num_positions, spec["d_model"], device=device, requires_grad=True)
        run = lambda: dispatcher(x)
    forward_times, times = [], []
    for round_index in range(spec["rounds"] + 1):
        timer = give_up_after(spec["limit_s"], result_path) if "limit_s" in spec else None
        forward, total = timed_call(run, device)
        if timer is not None:
            timer.cancel()
        if round_index:
            forward_times.append(forward)
            times.append(total)
    Path(result_path).write_text(
        json.dumps(
            {
                "times_s": times,
                "forward_times_s": forward_times,
                "torch": torch.__version__,
                "package": package.__file__,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
