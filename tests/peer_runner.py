"""Runs cases on canvas-engineering 0.5.0 (the peer) in its own process.

Usage: ``python peer_runner.py JOB.pt RESULT.pt`` with the peer's unpacked wheel first on
PYTHONPATH. JOB holds a list of cases (plain data and tensors); RESULT gets, per case, the
peer's state_dict at construction and the one it ran with, the output, and the gradients
of the inputs and parameters for the given output cotangent, plus what the backbone kinds
(graft, looped_stack, canvas) report besides (``extras``); for a case of kind "masks",
the topology's masks and texts instead (see mask_case).

The declaration builder here is also imported by the tests, so that both packages build
their objects from the same plain description.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def build_declarations(package: Any, spec: dict[str, Any]):
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


def prepare_state(model: Any, case: dict[str, Any]):
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


def fresh_leaf(tensor: Any, case: dict[str, Any]) -> Any:
    """A new leaf copy of ``tensor`` in the case's dtype, requiring grad."""
    import torch

    return tensor.detach().to(case.get("dtype", torch.float32), copy=True).requires_grad_(True)


def mask_case(package: Any, case: dict[str, Any]) -> dict[str, Any]:
    """The topology of ``case["declarations"]`` as masks: ``to_attention_mask`` and
    ``to_additive_mask`` (on the CPU), ``summary()`` and ``repr``; with ``case["timed"]``,
    only ``{"attention_mask_s": seconds}`` of one ``to_attention_mask`` call."""
    topology, layout = build_declarations(package, case["declarations"])
    if case.get("timed"):
        start = time.perf_counter()
        topology.to_attention_mask(layout)
        return {"attention_mask_s": time.perf_counter() - start}
    return {
        "attention_mask": topology.to_attention_mask(layout),
        "additive_mask": topology.to_additive_mask(layout),
        "summary": topology.summary(),
        "repr": repr(topology),
    }


def run_case(package: Any, case: dict[str, Any]) -> dict[str, Any]:
    """Build the case's module or dispatcher under its seed, run forward and backward
    (a case of kind "masks" goes to :func:`mask_case`)."""
    import torch

    if case["kind"] == "masks":
        return mask_case(package, case)
    torch.manual_seed(case["seed"])
    if case["kind"] == "module":
        model = package.create_attention(case["name"], case["d_model"], case["n_heads"], **case.get("kwargs", {}))
        inputs = {key: fresh_leaf(case[key], case) for key in ("queries", "keys", "values")}
        initial_state, state = prepare_state(model, case)
        output = model(inputs["queries"], inputs["keys"], inputs["values"])
    elif case["kind"] in BACKBONE_KINDS:
        model, initial_state, state, inputs, output, extras = BACKBONE_KINDS[case["kind"]](package, case)
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
        "extras": extras if case["kind"] in BACKBONE_KINDS else {},
    }


def run_graft(package: Any, case: dict[str, Any]):
    """Kind "graft": diffusers' CogVideoXTransformer3DModel(**case["config"]), grafted with
    ``package.graft_looped_blocks(model, **case["graft"])``, each block set to
    ``case["loops"]`` loops, run on ``hidden_states`` (B, F, C, H, W), ``encoder_hidden_states``
    (B, L, text_embed_dim), ``timestep`` (B,) and ``image_rotary_emb`` (or None).

    Optional keys: ``wrapper_checkpointing`` (sets the wrappers' ``use_gradient_checkpointing``)
    and ``transformer_checkpointing`` (diffusers' ``enable_gradient_checkpointing()``).
    Extras: the trainable parameter names after grafting, the loop parameter count of each
    wrapper, and the ActionHead's state and its output on the transformer's output.
    """
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**case["config"])
    blocks, head = package.graft_looped_blocks(model, **case["graft"])
    trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    initial_state, state = prepare_state(model, case)
    for block in blocks:
        block.set_loops(case["loops"])
        if "wrapper_checkpointing" in case:
            block.use_gradient_checkpointing = case["wrapper_checkpointing"]
    if case.get("transformer_checkpointing"):
        model.enable_gradient_checkpointing()
    inputs = {key: fresh_leaf(case[key], case) for key in ("hidden_states", "encoder_hidden_states")}
    (output,) = model(
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        case["timestep"],
        image_rotary_emb=case["image_rotary_emb"],
        return_dict=False,
    )
    extras = {
        "trainable": trainable,
        "loop_params": [block.trainable_params() for block in blocks],
        "head_state": head.state_dict(),
        "head_output": head(output.detach()).detach(),
    }
    return model, initial_state, state, inputs, output, extras


def run_looped_stack(package: Any, case: dict[str, Any]):
    """Kind "looped_stack": ``case["layers"]`` nn.TransformerEncoderLayer(d_model, n_heads,
    dim_feedforward=2 * d_model, dropout=0, batch_first=True), each wrapped in
    ``package.LoopedBlockWrapper(layer, block_idx=i, **case["wrapper"])`` and set to
    ``case["loops"]`` loops, run in sequence on ``x`` (B, N, d_model) with a causal ``src_mask``."""
    import torch

    layers = torch.nn.ModuleList(
        torch.nn.TransformerEncoderLayer(
            case["d_model"], case["n_heads"], 2 * case["d_model"], dropout=0.0, batch_first=True
        )
        for _ in range(case["layers"])
    )
    for index in range(len(layers)):
        layers[index] = package.LoopedBlockWrapper(layers[index], block_idx=index, **case["wrapper"])
        layers[index].set_loops(case["loops"])
    initial_state, state = prepare_state(layers, case)
    inputs = {"x": fresh_leaf(case["x"], case)}
    mask = torch.nn.Transformer.generate_square_subsequent_mask(case["x"].shape[1])
    output = inputs["x"]
    for layer in layers:
        output = layer(output, src_mask=mask)
    return layers, initial_state, state, inputs, output, {}


def run_canvas(package: Any, case: dict[str, Any]):
    """Kind "canvas": ``package.SpatiotemporalCanvas(layout)`` for ``case["declarations"]``;
    ``create_empty(B)``, then ``place`` of each ``case["embeddings"][region]`` in order.
    The output is the final canvas; extras hold the empty canvas and ``extract`` of every
    region of the final one."""
    _, layout = build_declarations(package, case["declarations"])
    model = package.SpatiotemporalCanvas(layout)
    initial_state, state = prepare_state(model, case)
    inputs = {name: fresh_leaf(tensor, case) for name, tensor in case["embeddings"].items()}
    empty = model.create_empty(case["batch_size"])
    output = empty
    for name, embeddings in inputs.items():
        output = model.place(output, embeddings, name)
    extras = {
        "empty": empty.detach(),
        **{f"extract {name}": model.extract(output, name).detach() for name in layout.regions},
    }
    return model, initial_state, state, inputs, output, extras


BACKBONE_KINDS = {"graft": run_graft, "looped_stack": run_looped_stack, "canvas": run_canvas}


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
