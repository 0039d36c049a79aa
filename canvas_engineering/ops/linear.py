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
    states, normalisers = [], []
    for bucket in index.keyset_buckets:
        keys, values = bucket.keys.gather(phi_k, zero_padding=True), bucket.keys.gather(v)
        states.append(torch.einsum("bnlhd,bnlhe->bnhde", keys, values))
        normalisers.append(keys.sum(dim=2))
    order = torch.cat([bucket.members for bucket in index.keyset_buckets]).argsort()
    state, normaliser = torch.cat(states, dim=1)[:, order], torch.cat(normalisers, dim=1)[:, order]
    batches = []
    for bucket in index.segment_buckets:
        queries = bucket.queries.gather(phi_q)
        keyset = index.segment_keyset[bucket.members]
        numerator = torch.einsum("bnqhd,bnhde->bnqhe", queries, state[:, keyset])
        denominator = torch.einsum("bnqhd,bnhd->bnqh", queries, normaliser[:, keyset]).unsqueeze(-1)
        batches.append(numerator / (denominator + eps))
    return index.assemble_queries(batches)
