"""Naive recurrences: step-by-step loops in the dtype given (use float64)."""

from __future__ import annotations

import torch


def wkv_reference(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens, eps: float = 1e-6) -> torch.Tensor:
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
