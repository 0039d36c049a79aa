"""The RWKV WKV recurrence over the key sets of packed segments."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from canvas_engineering.ops.segments import SegmentIndex


def wkv_scan(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, eps: float = 1e-6, chunk: int = 64
) -> torch.Tensor:
    """The WKV output at every step of each sequence.

    With ``e_s = exp(clamp(k_s, -10, 10))``, step t gives
    ``(sum_{s<t} exp((t-1-s) w) e_s v_s + exp(u) e_t v_t) / (sum_{s<t} exp((t-1-s) w) e_s + exp(u) e_t + eps)``.

    Computed in chunks of ``chunk`` steps, all chunks at once: within a chunk the sums are
    a product with the lower-triangular decay matrix ``exp((t-1-s) w)`` per channel; the sums
    carried into each chunk come from a short loop over chunks. Every exponent of w is
    ``<= 0``, so nothing grows beyond the sums themselves. O(L * chunk) work per channel.

    Args:
        k, v: ``(batch, L, H, d)``.
        w: ``(H, d)`` log decay per step (negative); u: ``(H, d)`` bonus of the current step.

    Returns:
        ``(batch, L, H, d)``.
    """
    batch, length = k.shape[:2]
    if length == 0:
        return torch.zeros_like(v)
    size = min(chunk, length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    k = F.pad(k.clamp(-10.0, 10.0), (0, 0, 0, 0, 0, pad)).unflatten(1, (n_chunks, size))
    v = F.pad(v, (0, 0, 0, 0, 0, pad)).unflatten(1, (n_chunks, size))
    steps = torch.arange(size, device=k.device, dtype=w.dtype)
    lag = steps.view(-1, 1) - 1 - steps.view(1, -1)
    within = torch.exp(lag.clamp(min=0).view(size, size, 1, 1) * w) * (lag >= 0).view(size, size, 1, 1).to(w.dtype)
    key_weight = torch.exp(k)
    weighted = key_weight * v
    to_end = torch.exp((size - 1 - steps).view(-1, 1, 1) * w)
    chunk_numerator = torch.einsum("shd,bcshd->bchd", to_end, weighted)
    chunk_denominator = torch.einsum("shd,bcshd->bchd", to_end, key_weight)
    carry = torch.exp(size * w)
    numerators, denominators = [torch.zeros_like(v[:, 0, 0])], [torch.zeros_like(v[:, 0, 0])]
    for c in range(n_chunks - 1):
        numerators.append(carry * numerators[-1] + chunk_numerator[:, c])
        denominators.append(carry * denominators[-1] + chunk_denominator[:, c])
    from_start = torch.exp(steps.view(-1, 1, 1) * w)
    past_numerator = from_start * torch.stack(numerators, 1).unsqueeze(2) + torch.einsum("tshd,bcshd->bcthd", within, weighted)
    past_denominator = from_start * torch.stack(denominators, 1).unsqueeze(2) + torch.einsum("tshd,bcshd->bcthd", within, key_weight)
    current = torch.exp(u + k)
    out = (past_numerator + current * v) / (past_denominator + current + eps)
    return out.flatten(1, 2)[:, :length]


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
    return torch.index_select(scanned, 1, read) * has_keys
