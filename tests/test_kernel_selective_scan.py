"""The Triton selective scan (interpreter on CPU, compiled on CUDA) against a step-by-step
float64 oracle: output and the gradients of x, dt, A, B, C and D, on ragged sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, cu_seqlens, relative_error
from reference.recurrence import selective_scan_reference

pytest.importorskip("triton", reason="needs triton (the 'triton' extra)")

from canvas_engineering.kernels.selective_scan import checkpoint_offsets, selective_scan_bwd, selective_scan_fwd  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
LENGTHS = [5, 0, 1, 19, 8]


def run(lengths, channels, state, dtype, chunk, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    draw = lambda *shape: torch.randn(*shape, generator=generator)
    x, dt = draw(2, total, channels), F.softplus(draw(2, total, channels))
    A = -torch.rand(channels, state, generator=generator) * 3
    B, C, D = draw(2, total, state), draw(2, total, state), draw(channels)
    x, dt, B, C = (t.to(dtype) for t in (x, dt, B, C))
    cu = cu_seqlens(lengths)
    offsets = checkpoint_offsets(cu, chunk)
    device = lambda t: t.to(DEVICE)
    y, checkpoints = selective_scan_fwd(*map(device, (x, dt, A, B, C, D, cu, offsets)), int(offsets[-1]), chunk)
    grad = draw(2, total, channels).to(dtype)
    grads = selective_scan_bwd(
        device(grad), *map(device, (x, dt, A, B, C, D)), checkpoints, device(cu), device(offsets), chunk
    )
    exact = [t.double().requires_grad_(True) for t in (x, dt, A, B, C, D)]
    bounds = cu.tolist()
    expected = torch.cat(
        [
            selective_scan_reference(
                exact[0][:, a:b], exact[1][:, a:b], exact[2], exact[3][:, a:b], exact[4][:, a:b], exact[5]
            )
            for a, b in zip(bounds[:-1], bounds[1:])
        ],
        dim=1,
    )
    expected.backward(grad.double())
    return [relative_error(a.cpu(), b) for a, b in zip((y, *grads), (expected, *(t.grad for t in exact)))]


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_the_oracle(dtype, chunk, monkeypatch):
    """Chunks of 4: groups of 2 chunks (the 19-step sequence's 5 chunks in groups of 2, 2
    and 1), the carries read 2 chunks at a time, the sequence search 2 sequences at a time,
    each channel block its own group. Chunks of 8: three backward workers take the 12
    (chunk, batch row, group) items in turn, the one group walking both channel blocks."""
    from canvas_engineering.kernels import selective_scan

    if chunk == 4:
        monkeypatch.setattr(selective_scan, "CARRY_BLOCK", 2)
        monkeypatch.setattr(selective_scan, "SEARCH_BLOCK", 2)
        monkeypatch.setattr(selective_scan, "GROUP", 2)
    else:
        monkeypatch.setattr(selective_scan, "WORKERS", 3)
    errors = run(LENGTHS, channels=40, state=5, dtype=dtype, chunk=chunk)
    assert max(errors) < (1e-5 if dtype == torch.float32 else 2e-2), errors


@pytest.mark.gpu
def test_state_sixteen_and_default_chunk():
    errors = run([70, 3], channels=16, state=16, dtype=torch.float32, chunk=64)
    assert max(errors) < 1e-5, errors
