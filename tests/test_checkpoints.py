"""Checkpoints of an AttentionDispatcher with every type: a state_dict saved with torch.save
restores the same function exactly (random_fixed's pattern included), a state_dict saved by
canvas-engineering 0.5.0 loads strictly and gives 0.5.0's outputs, and state_dicts convert
between float32 and float64 on load as ``module.to(dtype)`` converts modules.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import assert_all_close
from peer import PEER_ATTENTION_NAMES, peer_dir
from training_model import (
    D_MODEL,
    EVERY_TYPE,
    N_HEADS,
    NUM_POSITIONS,
    assert_bitwise_equal,
    build_dispatcher,
    canvas_spec,
    pass_results,
)

from canvas_engineering import BUILTIN_ATTENTION

FLOAT32_TOLERANCE = 1e-5
"""Relative error of a float32 computation against float64 (or against float32 rounded
another way): unit roundoff is 6e-8 and each result passes through a few tens of
dependent operations (projections, softmax, scans over up to 24 steps). The suite's float32
parity tolerance; the errors measured here stay below 6% of the bound. Gradients that are
zero in exact arithmetic (key biases under softmax) hold rounding noise only, bounded by
1e-7 of the norm of all results together (``zero_floor``)."""


def perturbed(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with seeded noise of std 0.05 added to every parameter, as after training
    (no gate at zero, no degenerate gradient)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return module


def every_type_dispatcher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_dispatcher(canvas_spec(EVERY_TYPE))


def canvas_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, NUM_POSITIONS, D_MODEL, generator=torch.Generator().manual_seed(3)).to(dtype)


def test_every_type_is_checkpointed():
    """The checkpoint tests' dispatcher holds a module of every type 0.5.0 has (each of
    them built-in here), so that 0.5.0's checkpoints of it load."""
    assert sorted(EVERY_TYPE) == sorted(PEER_ATTENTION_NAMES) and set(EVERY_TYPE) <= set(BUILTIN_ATTENTION)
    assert set(every_type_dispatcher(0).fn_modules) == set(EVERY_TYPE)


def test_state_dict_round_trip_restores_the_function_exactly(tmp_path):
    """Saved with torch.save and loaded (weights_only, strict) into a dispatcher built from
    the same declarations under another seed, both freshly built and after it has run (its
    plan prepared, random_fixed's pattern drawn from its own seed): the state_dict, output
    and every gradient are bit-identical to the saved dispatcher's."""
    saved = perturbed(every_type_dispatcher(seed=0), seed=10)
    torch.save(saved.state_dict(), tmp_path / "dispatcher.pt")
    x = canvas_input()
    expected = pass_results(saved, x)
    saved_state = saved.state_dict()
    assert {"pattern_seed", "A_log"} <= {key.rsplit(".", 1)[1] for key in saved_state}

    used = every_type_dispatcher(seed=1)
    before = pass_results(used, x)
    used_module, saved_module = used.fn_modules["random_fixed"], saved.fn_modules["random_fixed"]
    assert not torch.equal(used_module.pattern_seed, saved_module.pattern_seed)
    assert not torch.equal(used_module.pattern(24, 24, x.device), saved_module.pattern(24, 24, x.device))
    assert not torch.equal(before["output"], expected["output"])
    for restored in (every_type_dispatcher(seed=2), used):
        restored.load_state_dict(torch.load(tmp_path / "dispatcher.pt", weights_only=True), strict=True)
        assert_bitwise_equal(restored.state_dict(), saved_state)
        assert_bitwise_equal(pass_results(restored, x), expected)


def test_an_in_place_write_of_the_pattern_seed_changes_the_pattern():
    """Writing another module's seed into ``pattern_seed`` in place (as a broadcast of
    buffers between ranks does) makes the module compute what that module computes."""
    source, target = every_type_dispatcher(seed=0), every_type_dispatcher(seed=1)
    target.load_state_dict(source.state_dict())
    source_module, target_module = source.fn_modules["random_fixed"], target.fn_modules["random_fixed"]
    x = canvas_input()
    target(x)
    with torch.no_grad():
        target_module.pattern_seed.copy_(torch.tensor(12345))
    assert not torch.equal(target(x), source(x))
    with torch.no_grad():
        target_module.pattern_seed.copy_(source_module.pattern_seed)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    "saved_dtype, loaded_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64)],
    ids=["64-into-32", "32-into-64"],
)
def test_a_state_dict_converts_dtype_on_load(saved_dtype, loaded_dtype):
    """A state_dict of one dtype loaded into a module of the other holds the saved values
    converted (as ``module.to(dtype)`` converts them), computes bit for bit what the saved
    module converted with ``.to(loaded_dtype)`` computes, and matches the saved module's
    results within float32 rounding; integer buffers (``pattern_seed``) keep their dtype."""
    saved = perturbed(every_type_dispatcher(seed=0).to(saved_dtype), seed=10)
    loaded = every_type_dispatcher(seed=1).to(loaded_dtype)
    loaded.load_state_dict(saved.state_dict(), strict=True)
    converted = copy.deepcopy(saved).to(loaded_dtype)
    assert_bitwise_equal(loaded.state_dict(), converted.state_dict())
    assert loaded.fn_modules["random_fixed"].pattern_seed.dtype == torch.int64
    x = canvas_input(torch.float64)
    ours = pass_results(loaded, x.to(loaded_dtype))
    assert_bitwise_equal(ours, pass_results(converted, x.to(loaded_dtype)))
    assert_all_close(ours, pass_results(saved, x.to(saved_dtype)), tolerance=FLOAT32_TOLERANCE, zero_floor=1e-7)


def test_to_dtype_round_trip_keeps_the_function():
    """float32 -> float64 -> float32 is exact: the same state_dict and bit-identical
    results; in float64 the results match float32's within float32 rounding."""
    dispatcher = perturbed(every_type_dispatcher(seed=0), seed=10)
    x = canvas_input()
    state, expected = copy.deepcopy(dispatcher.state_dict()), pass_results(dispatcher, x)
    in_float64 = pass_results(dispatcher.to(torch.float64), x.double())
    assert_all_close(expected, in_float64, tolerance=FLOAT32_TOLERANCE, zero_floor=1e-7)
    dispatcher.to(torch.float32)
    assert_bitwise_equal(dispatcher.state_dict(), state)
    assert_bitwise_equal(pass_results(dispatcher, x), expected)


PEER_SAVE = """
import sys
from pathlib import Path

import torch

import canvas_engineering as package
from peer_runner import build_declarations, prepare_state

root = Path(package.__file__).resolve().parent.parent
if not (root / "canvas_engineering-0.5.0.dist-info").is_dir():
    raise SystemExit(f"imported canvas_engineering from {root}, not the unpacked 0.5.0 wheel")
folder = Path(sys.argv[1])
for name, case in torch.load(folder / "job.pt").items():
    torch.manual_seed(case["seed"])
    topology, layout = build_declarations(package, case["declarations"])
    model = package.AttentionDispatcher(topology, layout, case["d_model"], case["n_heads"])
    prepare_state(model, case)
    torch.save(model.state_dict(), folder / f"{name}-state.pt")
    with torch.no_grad():
        torch.save(model(case["x"].to(case["dtype"])), folder / f"{name}-output.pt")
"""
"""Run by the peer: per case, build its dispatcher, add seeded noise, convert to the
case's dtype, torch.save the state_dict and the output on the case's input."""

PEER_TYPES = tuple(name for name in EVERY_TYPE if name != "random_fixed")
"""random_fixed's pattern differs from 0.5.0's by design (its state_dict loads, its
outputs are not compared)."""


@pytest.fixture(scope="module")
def peer_checkpoints(tmp_path_factory) -> Path:
    """A folder with the peer's ``{case}-state.pt`` and ``{case}-output.pt``; cases
    ``float32``/``float64`` (every type but random_fixed) and ``with_random_fixed``."""
    folder = tmp_path_factory.mktemp("peer")
    x = canvas_input(torch.float64)
    case = {"d_model": D_MODEL, "n_heads": N_HEADS, "seed": 7, "x": x, "declarations": canvas_spec(PEER_TYPES)}
    torch.save(
        {
            "float32": {**case, "dtype": torch.float32},
            "float64": {**case, "dtype": torch.float64},
            "with_random_fixed": {**case, "dtype": torch.float32, "declarations": canvas_spec(EVERY_TYPE)},
        },
        folder / "job.pt",
    )
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(peer_dir()), str(tests)])}
    completed = subprocess.run(  # run in `folder`: `python -c` puts the working directory first on sys.path
        [sys.executable, "-c", PEER_SAVE, str(folder)], env=env, cwd=folder, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


@pytest.mark.peer
@pytest.mark.parametrize("saved", ["float32", "float64"])
@pytest.mark.parametrize("loaded_dtype", [torch.float32, torch.float64], ids=["into-float32", "into-float64"])
def test_a_peer_checkpoint_loads_strictly_and_gives_the_peers_outputs(peer_checkpoints, saved, loaded_dtype):
    """The peer's torch.save'd state_dict loads (weights_only, strict) into our dispatcher
    built under another seed, in either dtype; the output matches the peer's within 1e-12
    (float64 on both sides: the same arithmetic in another order; every connection weight
    is 1, so the peer's float32 sums of weights are exact) or float32 rounding."""
    torch.manual_seed(8)
    ours = build_dispatcher(canvas_spec(PEER_TYPES)).to(loaded_dtype)
    state = torch.load(peer_checkpoints / f"{saved}-state.pt", weights_only=True)
    ours.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value.to(loaded_dtype)), key
    peer_output = torch.load(peer_checkpoints / f"{saved}-output.pt", weights_only=True)
    with torch.no_grad():
        output = ours(canvas_input(torch.float64).to(loaded_dtype))
    both_float64 = saved == "float64" and loaded_dtype == torch.float64
    assert_all_close(
        {"output": output},
        {"output": peer_output},
        tolerance=1e-12 if both_float64 else FLOAT32_TOLERANCE,
        zero_floor=0.0,
    )


@pytest.mark.peer
def test_a_peer_checkpoint_with_random_fixed_loads_and_keeps_our_seed(peer_checkpoints):
    """The peer saves no pattern seed: the state_dict loads strictly, every saved value
    lands, and random_fixed keeps the seed it was built with."""
    torch.manual_seed(8)
    ours = build_dispatcher(canvas_spec(EVERY_TYPE))
    own_seed = ours.fn_modules["random_fixed"].pattern_seed.clone()
    state = torch.load(peer_checkpoints / "with_random_fixed-state.pt", weights_only=True)
    ours.load_state_dict(state, strict=True)
    assert set(ours.state_dict()) - set(state) == {"fn_modules.random_fixed.pattern_seed"}
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert torch.equal(ours.fn_modules["random_fixed"].pattern_seed, own_seed)
