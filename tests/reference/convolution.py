"""Naive long convolution without FFTs: the filter's impulse response from an explicit real
inverse DFT, then direct sums (use float64)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def impulse_response(spectrum: torch.Tensor, length: int) -> torch.Tensor:
    """``h (length, D)``: the real inverse DFT of length ``length`` of the Hermitian spectrum
    whose frequencies ``0 .. length/2`` are ``spectrum[k] = (re, im)`` (``(F, D, 2)``):

    ``h[j] = (1/L) sum_{k<=L/2} c_k (re_k cos(2 pi k j / L) - im_k sin(2 pi k j / L))``,
    ``c_k = 1`` at k = 0 and L/2, else 2 (so the imaginary parts there drop out).
    """
    frequencies = torch.arange(length // 2 + 1, dtype=spectrum.dtype)
    weights = torch.full_like(frequencies, 2.0)
    weights[0] = 1.0
    weights[-1] = 1.0
    angle = 2 * math.pi * torch.outer(torch.arange(length, dtype=spectrum.dtype), frequencies) / length
    part = spectrum[: length // 2 + 1]
    return (torch.cos(angle) * weights) @ part[..., 0] / length - (torch.sin(angle) * weights) @ part[..., 1] / length


def gated_convolution_reference(
    mixed: torch.Tensor, gate_logits: torch.Tensor, spectrum: torch.Tensor, query_lengths: Sequence[int]
) -> torch.Tensor:
    """Per segment of N packed rows, with ``x = mixed * sigmoid(gate_logits)``, ``L`` the
    next power of two >= max(N, 2) and h the impulse response of length L:
    ``y[n] = sum_{m<N} x[m] h[(n - m) mod L]`` for n < N.

    mixed, gate_logits ``(B, T, D)``, spectrum ``(F, D, 2)`` -> ``(B, T, D)``.
    """
    x = mixed * torch.sigmoid(gate_logits)
    outputs, start = [], 0
    for n in query_lengths:
        length = 1 << max(1, (n - 1).bit_length())
        h = impulse_response(spectrum, length)
        lag = (torch.arange(n).unsqueeze(1) - torch.arange(n).unsqueeze(0)) % length
        outputs.append(torch.einsum("nmd,bmd->bnd", h[lag], x[:, start : start + n]))
        start += n
    return torch.cat(outputs, dim=1)
