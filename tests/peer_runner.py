"""Runs cases on canvas-engineering 0.5.0 (the peer) in its own process.

Usage: ``python peer_runner.py JOB.pt RESULT.pt`` with the peer's unpacked wheel first on
PYTHONPATH. JOB holds a list of cases (plain data and tensors); RESULT gets, per case, the
peer's state_dict at construction and the one it ran with, the output, and the gradients
of the inputs and parameters for the given output cotangent.

The declaration builder here is also imported by the tests, so that both packages build
their objects from the same plain description.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict


def build_declarations(package: Any, spec: Dict[str, Any]):
    """(CanvasTopology, CanvasLayout) from a plain description, with ``package``'s classes.

    ``spec``: {"T", "spatial_shape", "d_model", "regions": {name: RegionSpec kwargs},
    "connections": [Connection kwargs, temporal_fill as its string value]}.
    """
    regions = {name: package.RegionSpec(**fields) for name, fields in spec["regions"].items()}
    layout = package.CanvasLayout(
        T=spec["T"], spatial_shape=tuple(spec["spatial_shape"]), d_model=spec["d_model"], regions=regions
    )
    connections = [
        package.Connection(**{**c, "temporal_fill": package.TemporalFill(c.get("temporal_fill", "hold"))})
        for c in spec["connections"]
    ]
    return package.CanvasTopology(connections=connections), layout


def prepare_state(model: Any, case: Dict[str, Any]):
    """(state at construction, state the case runs with).

    The case runs with ``case["state_dict"]`` when given (loaded strictly); otherwise with
    the constructed parameters plus seeded noise of std 0.05, so that no gradient is
    degenerate the way some are at initialisation (a zero gate, a zero bonus). The model
    then runs in ``case["dtype"]`` (float32 by default).
    """
    import torch

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = case.get("dtype", torch.float32)
    if "state_dict" in case:
        model.to(dtype).load_state_dict(case["state_dict"])
    else:
        generator = torch.Generator().manual_seed(case["seed"])
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.to(dtype)
    return initial, {k: v.clone() for k, v in model.state_dict().items()}


def fresh_leaf(tensor: Any, case: Dict[str, Any]) -> Any:
    """A new leaf copy of ``tensor`` in the case's dtype, requiring grad."""
    import torch

    return tensor.detach().to(case.get("dtype", torch.float32), copy=True).requires_grad_(True)


def run_case(package: Any, case: Dict[str, Any]) -> Dict[str, Any]:
    """Build the case's module or dispatcher under its seed, run forward and backward."""
    import torch

    torch.manual_seed(case["seed"])
    if case["kind"] == "module":
        model = package.create_attention(case["name"], case["d_model"], case["n_heads"], **case.get("kwargs", {}))
        inputs = {key: fresh_leaf(case[key], case) for key in ("queries", "keys", "values")}
        initial_state, state = prepare_state(model, case)
        output = model(inputs["queries"], inputs["keys"], inputs["values"])
    else:
        topology, layout = build_declarations(package, case["declarations"])
        model = package.AttentionDispatcher(
            topology, layout, case["d_model"], case["n_heads"], skip_temporal=case.get("skip_temporal", False)
        )
        initial_state, state = prepare_state(model, case)
        inputs = {"x": fresh_leaf(case["x"], case)}
        output = model(inputs["x"], active_regions=case.get("active_regions"))
    if output.requires_grad:
        output.backward(case["grad_output"].to(output.dtype))
    return {
        "initial_state": initial_state,
        "state": state,
        "output": output.detach(),
        "input_grads": {k: v.grad for k, v in inputs.items()},
        "param_grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
    }


def main(job_path: str, result_path: str) -> None:
    import torch

    import canvas_engineering as package

    peer_root = Path(package.__file__).resolve().parent.parent
    if not (peer_root / "canvas_engineering-0.5.0.dist-info").is_dir():
        raise SystemExit(f"peer_runner: imported canvas_engineering from {peer_root}, not the unpacked 0.5.0 wheel")
    cases = torch.load(job_path, weights_only=False)
    torch.save([run_case(package, case) for case in cases], result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
