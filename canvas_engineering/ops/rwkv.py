"""The RWKV WKV recurrence over the key sets of packed segments."""

from __future__ import annotations

import torch

from canvas_engineering.ops.segments import SegmentIndex


def wkv_scan(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The WKV output at every step of each sequence.

    With ``e_s = exp(clamp(k_s, -10, 10))``, step t gives
    ``(sum_{s<t} exp((t-1-s) w) e_s v_s + exp(u) e_t v_t) / (sum_{s<t} exp((t-1-s) w) e_s + exp(u) e_t + eps)``.

    Args:
        k, v: ``(batch, L, H, d)``.
        w: ``(H, d)`` log decay per step (negative); u: ``(H, d)`` bonus of the current step.

    Returns:
        ``(batch, L, H, d)``.
    """
    k = k.clamp(-10.0, 10.0)
    decay = torch.exp(w)
    numerator = torch.zeros_like(v[:, 0])
    denominator = torch.zeros_like(v[:, 0])
    outputs = []
    for t in range(k.shape[1]):
        current = torch.exp(u + k[:, t])
        outputs.append((numerator + current * v[:, t]) / (denominator + current + eps))
        key_weight = torch.exp(k[:, t])
        numerator = numerator * decay + key_weight * v[:, t]
        denominator = denominator * decay + key_weight
    return torch.stack(outputs, dim=1) if outputs else torch.zeros_like(v)


def segment_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
    """WKV over each key set, read by each query row at step ``min(i, M - 1)``.

    Args:
        k, v: ``(B, Tk, H, d)`` packed key rows.
        w, u: ``(H, d)`` decay and bonus.
        index: the segments; each key set is scanned once, whatever reads it.

    Returns:
        ``(B, Tq, H, d)``; zeros for queries whose key set is empty.
    """
    if index.n_keys == 0:
        return v.new_zeros(v.shape[:1] + (index.n_queries,) + v.shape[2:])
    scanned = index.assemble_keys(
        [
            wkv_scan(bucket.keys.gather(k).flatten(0, 1), bucket.keys.gather(v).flatten(0, 1), w, u).unflatten(0, (k.shape[0], -1))
            for bucket in index.keyset_buckets
        ]
    )
    read = index.query_key_start + torch.minimum(index.query_offset, index.query_key_length - 1).clamp(min=0)
    has_keys = (index.query_key_length > 0).view(1, -1, 1, 1).to(v.dtype)
    return scanned[:, read] * has_keys
