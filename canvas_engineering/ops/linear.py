"""Linear attention over packed segments: per key set the state ``sum phi(k)^T v`` and
normaliser ``sum phi(k)``, then per query ``phi(q) state / (phi(q) . normaliser + eps)``."""

from __future__ import annotations

import torch

from canvas_engineering.ops.segments import SegmentIndex


def segment_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, index: SegmentIndex, eps: float
) -> torch.Tensor:
    """Linear attention with features already applied.

    Args:
        phi_q: ``(B, Tq, H, d)`` packed query features.
        phi_k: ``(B, Tk, H, d)`` packed key features; v: ``(B, Tk, H, e)``.
        index: the segments.
        eps: added to the normaliser.

    Returns:
        ``(B, Tq, H, e)``. O(Tq + Tk) time, O(S_k * H * d * e) state.
    """
    batch, heads, d, e = phi_q.shape[0], phi_q.shape[2], phi_q.shape[3], v.shape[3]
    n_keysets = index.keyset_length.shape[0]
    state = phi_q.new_zeros(batch, n_keysets, heads, d, e)
    normaliser = phi_q.new_zeros(batch, n_keysets, heads, d)
    for bucket in index.keyset_buckets:
        keys, values = bucket.keys.gather(phi_k, zero_padding=True), bucket.keys.gather(v)
        state = state.index_copy(1, bucket.members, torch.einsum("bnlhd,bnlhe->bnhde", keys, values))
        normaliser = normaliser.index_copy(1, bucket.members, keys.sum(dim=2))
    out = phi_q.new_zeros(phi_q.shape[:-1] + (e,))
    for bucket in index.segment_buckets:
        queries = bucket.queries.gather(phi_q)
        keyset = index.segment_keyset[bucket.members]
        numerator = torch.einsum("bnqhd,bnhde->bnqhe", queries, state[:, keyset])
        denominator = torch.einsum("bnqhd,bnhd->bnqh", queries, normaliser[:, keyset]).unsqueeze(-1)
        out = bucket.queries.scatter(out, numerator / (denominator + eps))
    return out
