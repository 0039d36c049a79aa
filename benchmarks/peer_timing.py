"""Times forward+backward of an AttentionDispatcher of canvas-engineering 0.5.0 (the peer).

Usage: ``python peer_timing.py SPEC.pt RESULT.json`` with the peer's unpacked wheel first
on PYTHONPATH. SPEC holds {"declarations", "d_model", "n_heads", "batch", "rounds"} for a
dispatcher, or {"module", "length", "d_model", "n_heads", "batch", "rounds"} (and
optionally "queries", N; default N = length) for one attention module with M = length; the result is {"times_s": [...]} of ``rounds`` timed
calls after one warm-up call.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str, result_path: str) -> None:
    import torch

    import canvas_engineering as package

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from peer_runner import build_declarations

    spec = torch.load(spec_path, weights_only=False)
    torch.manual_seed(0)
    if "module" in spec:
        module = package.create_attention(spec["module"], spec["d_model"], spec["n_heads"])
        queries = torch.randn(spec["batch"], spec.get("queries", spec["length"]), spec["d_model"], requires_grad=True)
        x = torch.randn(spec["batch"], spec["length"], spec["d_model"], requires_grad=True)
        run = lambda: module(queries, x, x)  # noqa: E731
    else:
        topology, layout = build_declarations(package, spec["declarations"])
        dispatcher = package.AttentionDispatcher(topology, layout, spec["d_model"], spec["n_heads"])
        x = torch.randn(spec["batch"], layout.num_positions, spec["d_model"], requires_grad=True)
        run = lambda: dispatcher(x)  # noqa: E731
    times = []
    for round_index in range(spec["rounds"] + 1):
        start = time.perf_counter()
        run().sum().backward()
        elapsed = time.perf_counter() - start
        if round_index:
            times.append(elapsed)
    Path(result_path).write_text(json.dumps({"times_s": times, "torch": torch.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
