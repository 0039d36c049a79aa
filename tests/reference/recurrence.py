"""Naive recurrences: step-by-step loops in the dtype given (use float64)."""

from __future__ import annotations

import torch


def wkv_reference(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens, eps: float = 1e-6
) -> torch.Tensor:
    """The WKV output at every step of every packed sequence, one step at a time.

    k, v ``(B, T, H, D)``, w, u ``(H, D)`` -> ``(B, T, H, D)``.
    """
    bounds = [int(x) for x in cu_seqlens]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        numerator = torch.zeros_like(v[:, 0])
        denominator = torch.zeros_like(v[:, 0])
        for t in range(start, end):
            key = k[:, t].clamp(-10.0, 10.0)
            current = torch.exp(u + key)
            outputs.append((numerator + current * v[:, t]) / (denominator + current + eps))
            numerator = torch.exp(w) * numerator + torch.exp(key) * v[:, t]
            denominator = torch.exp(w) * denominator + torch.exp(key)
    return torch.stack(outputs, dim=1) if outputs else torch.zeros_like(v)


def selective_scan_reference(x, dt, A, B, C, D) -> torch.Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, one step at a time.

    x, dt ``(b, L, d)``, A ``(d, n)``, B, C ``(b, L, n)``, D ``(d,)`` -> ``(b, L, d)``.
    """
    state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        step = dt[:, t].unsqueeze(-1)
        state = torch.exp(step * A) * state + step * B[:, t].unsqueeze(1) * x[:, t].unsqueeze(-1)
        outputs.append((state * C[:, t].unsqueeze(1)).sum(-1) + D * x[:, t])
    return torch.stack(outputs, dim=1) if outputs else torch.zeros_like(x)
