"""The S6 selective scan over the key sets of packed segments."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from canvas_engineering.ops.segments import SegmentIndex


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    chunk: int = 0,
) -> torch.Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, h_0 = 0.

    Two levels, so that no loop runs over all L steps: the sequence is cut into chunks of
    ``chunk`` steps (default ``max(16, ceil(sqrt(L)))``); (1) every chunk is scanned from a
    zero state, all chunks at once, in a loop over the positions of a chunk; (2) the state
    entering each chunk follows from a loop over chunks; (3) each step adds what the state
    entering its chunk contributes, decayed by ``exp(A * sum of dt since the chunk start)``.
    Every exponent is ``dt * A <= 0`` or a sum of such, so nothing overflows at any length.

    Args:
        x, dt: ``(batch, L, channels)``.
        A: ``(channels, state)``, negative.
        B, C: ``(batch, L, state)``.
        D: ``(channels,)``.
        chunk: steps per chunk (0: the default).

    Returns:
        y: ``(batch, L, channels)``.
    """
    batch, length, channels = x.shape
    if length == 0:
        return torch.zeros_like(x)
    size = chunk or max(16, math.ceil(math.sqrt(length)))
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    chunked = lambda t: F.pad(t, (0, 0, 0, pad)).unflatten(1, (n_chunks, size))  # noqa: E731
    x_c, dt_c, B_c, C_c = chunked(x), chunked(dt), chunked(B), chunked(C)
    state = x.new_zeros(batch, n_chunks, channels, A.shape[1])
    outputs = []
    for t in range(size):
        step = dt_c[:, :, t].unsqueeze(-1)
        state = torch.exp(step * A) * state + (step * x_c[:, :, t].unsqueeze(-1)) * B_c[:, :, t].unsqueeze(-2)
        outputs.append(torch.einsum("bcdn,bcn->bcd", state, C_c[:, :, t]))
    chunk_decay = torch.exp(dt_c.sum(dim=2).unsqueeze(-1) * A)
    entering = [torch.zeros_like(state[:, 0])]
    for j in range(n_chunks - 1):
        entering.append(chunk_decay[:, j] * entering[-1] + state[:, j])
    entering = torch.stack(entering, dim=1)
    elapsed = torch.zeros_like(dt_c[:, :, 0])
    for t in range(size):
        elapsed = elapsed + dt_c[:, :, t]
        outputs[t] = outputs[t] + torch.einsum("bcdn,bcn->bcd", torch.exp(elapsed.unsqueeze(-1) * A) * entering, C_c[:, :, t])
    y = torch.stack(outputs, dim=2) + D * x_c
    return y.flatten(1, 2)[:, :length]


def segment_selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    index: SegmentIndex,
) -> torch.Tensor:
    """:func:`selective_scan` over each key set of ``index``, once per key set.

    Args:
        x, dt: ``(Bt, Tk, channels)`` packed key rows; B, C: ``(Bt, Tk, state)``.
        A, D: as in :func:`selective_scan`.

    Returns:
        ``(Bt, Tk, channels)``.
    """
    batches = []
    for bucket in index.keyset_buckets:
        fold = lambda t: bucket.keys.gather(t).flatten(0, 1)  # noqa: E731
        batches.append(selective_scan(fold(x), fold(dt), A, fold(B), fold(C), D).unflatten(0, (x.shape[0], -1)))
    return index.assemble_keys(batches)
