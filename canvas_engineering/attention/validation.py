"""Argument checks shared by the attention modules, with messages that name the bad value."""

from __future__ import annotations

import torch

from canvas_engineering.canvas import as_integer, as_real


def check_positive(owner: str, **values: int) -> None:
    """Raise ValueError unless every named value is a positive integer (NumPy integers too)."""
    for label, value in values.items():
        integer = as_integer(value)
        if integer is None or integer < 1:
            raise ValueError(f"{owner}: {label} must be a positive integer, got {value!r}")


def check_dropout(owner: str, dropout: float) -> float:
    """``dropout`` as a float; ValueError unless it is a real number in ``[0, 1]``."""
    probability = as_real(dropout)
    if probability is None or not (0.0 <= probability <= 1.0):
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1], got {dropout!r}")
    return probability


def check_heads(owner: str, d_model: int, n_heads: int) -> None:
    """Raise ValueError unless ``d_model`` and ``n_heads`` are positive and ``n_heads`` divides ``d_model``."""
    check_positive(owner, d_model=d_model, n_heads=n_heads)
    if d_model % n_heads:
        raise ValueError(
            f"{owner}: d_model={d_model} is not divisible by n_heads={n_heads}; "
            f"choose n_heads among the divisors of d_model"
        )


def check_qkv(owner: str, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, d_model: int) -> None:
    """Raise ValueError unless queries are ``(B, N, d_model)`` and keys, values ``(B, M, d_model)``."""
    for label, tensor in (("queries", queries), ("keys", keys), ("values", values)):
        if tensor.dim() != 3 or tensor.shape[-1] != d_model or tensor.shape[0] != queries.shape[0]:
            raise ValueError(
                f"{owner}: expected {label} of shape (B={queries.shape[0]}, length, "
                f"d_model={d_model}), got {tuple(tensor.shape)}"
            )
    if keys.shape[1] != values.shape[1]:
        raise ValueError(
            f"{owner}: keys and values must have the same length, got keys {tuple(keys.shape)} "
            f"and values {tuple(values.shape)}"
        )
