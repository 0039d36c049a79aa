"""The S6 selective scan over the key sets of packed segments."""

from __future__ import annotations

import torch

from canvas_engineering.ops.segments import SegmentIndex


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, h_0 = 0.

    Args:
        x, dt: ``(batch, L, channels)``.
        A: ``(channels, state)``, negative.
        B, C: ``(batch, L, state)``.
        D: ``(channels,)``.

    Returns:
        y: ``(batch, L, channels)``.
    """
    state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        step = dt[:, t].unsqueeze(-1)
        state = torch.exp(step * A) * state + step * B[:, t].unsqueeze(1) * x[:, t].unsqueeze(-1)
        outputs.append((state * C[:, t].unsqueeze(1)).sum(dim=-1) + D * x[:, t])
    return torch.stack(outputs, dim=1) if outputs else torch.zeros_like(x)


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
