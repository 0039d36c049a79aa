"""Shared test fixtures and helpers, the one home of each: the device and the context that
run the Triton kernels, the NaN-poisoned kernel outputs, a custom attention type for the
dispatcher tests, the relative-error checks used by every numerical comparison, and the
grids that make top-k ties exact on every machine. Tests import the helpers with
``from conftest import ...``; pytest finds the fixtures by name.

Without a GPU, the Triton kernels are defined in interpreter mode (the variable must be set
before the kernels are imported); they then run on CPU tensors inside :func:`kernels`
(``canvas_engineering.ops.backend.interpreted_triton()``) only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn as nn
from hypothesis import settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the tests that run the Triton kernels put their tensors: the GPU when there is one,
else the CPU (the kernels through Triton's interpreter)."""

if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test workers share the cores: one intra-op thread each, so that no worker's OpenMP
    # threads spin on a core another worker needs (small ops then take 100 times longer).
    torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")  # the same examples on every CI run; elsewhere each run draws anew


def pytest_configure(config: pytest.Config) -> None:
    """Stops the run up front when the kernels are interpreted by a Triton whose
    interpreter cannot run under the installed numpy (every kernel test would fail)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        import numpy
        import triton

        from canvas_engineering.ops.backend import check_interpreter_versions

        try:
            check_interpreter_versions(triton.__version__, numpy.__version__)
        except RuntimeError as error:
            raise pytest.UsageError(str(error)) from None


def kernels() -> AbstractContextManager[None]:
    """The context that runs the Triton kernels on DEVICE: as compiled on CUDA, through
    Triton's interpreter on CPU (which needs triton installed)."""
    if DEVICE == "cuda":
        return contextlib.nullcontext()
    from canvas_engineering.ops.backend import interpreted_triton

    return interpreted_triton()


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel output buffer (``buffers.new_output``) starts as NaN during the test, so
    an element a kernel fails to write cannot pass for a result."""
    monkeypatch.setenv("CANVAS_POISON_OUTPUTS", "1")


class ScaledMean(nn.Module):
    """A custom attention type with only forward(q, k, v): the dispatcher runs it segment by
    segment. ``(B, N, D), (B, M, D), (B, M, D) -> (B, N, D)``."""

    def __init__(self, d_model, n_heads=4, dropout=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d_model))

    def forward(self, queries, keys, values):
        return (self.scale * values.mean(dim=1, keepdim=True) + queries).tanh()


@pytest.fixture(scope="module")
def scaled_mean_registered() -> Iterator[None]:
    """:class:`ScaledMean` in the attention registry as ``"scaled_mean"`` for the tests of a
    module, removed after them."""
    from canvas_engineering import ATTENTION_REGISTRY

    ATTENTION_REGISTRY["scaled_mean"] = ScaledMean
    yield
    del ATTENTION_REGISTRY["scaled_mean"]


def cu_seqlens(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(len(lengths) + 1,)`` int32: where each of the sequences of ``lengths`` laid end to
    end starts, then where the last ends."""
    return torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32, device=device)


def region(bounds: tuple[int, ...], **fields) -> dict:
    """A region's description as both packages' layouts take it: ``bounds`` and any other fields."""
    return {"bounds": bounds, **fields}


def compared_tensors(result: dict) -> dict:
    """name -> tensor (or None) of everything a peer comparison checks: output and all gradients."""
    return {"output": result["output"], **result["input_grads"], **result["param_grads"]}


def relative_error(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when expected is 0).

    NaN anywhere gives ``inf``; two Nones give 0; one None gives ``inf``.
    """
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.double(), expected.double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


def assert_all_close(
    actual: dict[str, torch.Tensor | None],
    expected: dict[str, torch.Tensor | None],
    tolerance: float,
    zero_floor: float,
) -> None:
    """Every named result close to the expected one:
    ``||actual - expected|| <= tolerance * ||expected|| + zero_floor * whole``, where
    ``whole`` is the norm of all expected results together.

    The second term is the resolution of floating-point arithmetic at the scale of the
    computation: a result that is zero in exact arithmetic (a key bias under softmax, whose
    logits are shift-invariant) or tiny by cancellation (a query read by a single key)
    holds rounding noise of that size on both sides, so only an absolute bound applies.
    """
    assert actual.keys() == expected.keys()
    present = [t.double().flatten() for t in expected.values() if t is not None]
    whole = torch.cat(present).norm().item() if present else 0.0
    for key, reference in expected.items():
        if reference is None or actual[key] is None:
            assert reference is None and actual[key] is None, key
            continue
        assert actual[key].shape == reference.shape and torch.isfinite(actual[key]).all(), key
        difference = (actual[key].double() - reference.double()).norm().item()
        assert difference <= tolerance * reference.double().norm().item() + zero_floor * whole, (key, difference)


def snap_to_grid(tensor: torch.Tensor, step: float, bound: float) -> torch.Tensor:
    """``tensor`` rounded to the nearest multiple of ``step`` (a power of two) and clipped to
    ``[-bound, bound]``: values with a few significant bits, whose products and short sums
    are exact in any floating-point format of this package."""
    return (tensor / step).round().clamp(-bound / step, bound / step) * step


def grid_inputs(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the input grid of :func:`make_top_k_ties_exact`: multiples of 1/2 in [-1, 1]."""
    return snap_to_grid(tensor, 0.5, 1.0)


def make_top_k_ties_exact(model: torch.nn.Module) -> None:
    """Puts the query and key projections (weights and biases) of every top-k module in
    ``model`` on multiples of 1/16 in [-1/2, 1/2], in place.

    Fed rows from :func:`grid_inputs`, a projected value is a multiple of 1/32 below 2^10 / 32
    in magnitude (``d_model <= 32``) and a logit ``q . k`` a sum of at most 16 products below
    2^19 / 1024 (``head_dim <= 16``): every logit is exact in float32, in TF32 and in float64,
    whatever order a BLAS, inductor or a kernel sums in. Two keys then tie exactly when they
    tie in exact arithmetic, on every machine, and every path keeps the same keys (ties with
    the k-th largest logit are kept). Without this, identical keys can get logits that differ
    in the last bit (a BLAS may round columns differently by their position), and paths
    computed differently keep different keys.
    """
    from canvas_engineering.attention.sparse import SparseAttention

    for module in model.modules():
        if isinstance(module, SparseAttention):
            if module.d_model > 32 or module.head_dim > 16:
                raise ValueError(
                    f"exact logits need d_model <= 32 and head_dim <= 16, got {module.d_model} and {module.head_dim}"
                )
            with torch.no_grad():
                for projection in (module.q_proj, module.k_proj):
                    for parameter in projection.parameters():
                        parameter.copy_(snap_to_grid(parameter, 1 / 16, 0.5))
