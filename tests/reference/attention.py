"""Naive attention over packed segments: a loop over segments, dense scores, float64."""

from __future__ import annotations

import torch


def segment_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    scale: float,
    window: int = 0,
    top_k: int = 0,
    sigmoid: bool = False,
) -> torch.Tensor:
    """q ``(B, Tq, H, D)``, k, v ``(B, Tk, H, D)`` with segment offsets -> ``(B, Tq, H, D)``.

    Softmax (or sigmoid) attention of each segment's queries over its keys, keeping key m
    for query i only when ``|i - floor(m N / M)| <= window // 2`` (window > 0) and when its
    logit is ``>=`` the row's k-th largest (top_k > 0); a row keeping nothing is zero.
    """
    out = torch.zeros_like(q)
    cu_q, cu_k = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[:, cu_q[s] : cu_q[s + 1]], k[:, cu_k[s] : cu_k[s + 1]], v[:, cu_k[s] : cu_k[s + 1]]
        n, m = qs.shape[1], ks.shape[1]
        if n == 0 or m == 0:
            continue
        logits = torch.einsum("bnhd,bmhd->bhnm", qs, ks) * scale
        keep = torch.ones(n, m, dtype=torch.bool)
        if window:
            placed = torch.tensor([(j * n) // m for j in range(m)])
            keep &= (torch.arange(n).view(-1, 1) - placed.view(1, -1)).abs() <= window // 2
        keep = keep.expand_as(logits)
        if top_k:
            threshold = logits.topk(min(top_k, m), dim=-1).values[..., -1:]
            keep = keep & (logits >= threshold)
        if sigmoid:
            weights = torch.sigmoid(logits) * keep
        else:
            masked = logits.masked_fill(~keep, float("-inf"))
            weights = torch.softmax(masked, dim=-1).nan_to_num(0.0)
        out[:, cu_q[s] : cu_q[s + 1]] = torch.einsum("bhnm,bmhd->bnhd", weights, vs)
    return out


def linear_attention_reference(
    q, k, v, query_lengths, keyset_of, keyset_lengths, eps: float = 1e-6, relu: bool = False
):
    """Linear attention per segment over its key set: phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + eps).

    q ``(B, Tq, H, D)``, k ``(B, Tk, H, D)``, v ``(B, Tk, H, E)`` packed per key set.
    """
    features = (lambda x: torch.relu(x)) if relu else (lambda x: torch.nn.functional.elu(x) + 1)
    outputs = []
    q_start = 0
    k_starts = [sum(keyset_lengths[:j]) for j in range(len(keyset_lengths))]
    for n, keyset in zip(query_lengths, keyset_of):
        ks = slice(k_starts[keyset], k_starts[keyset] + keyset_lengths[keyset])
        phi_q, phi_k = features(q[:, q_start : q_start + n]), features(k[:, ks])
        state = torch.einsum("bmhd,bmhe->bhde", phi_k, v[:, ks])
        normaliser = phi_k.sum(dim=1)
        numerator = torch.einsum("bnhd,bhde->bnhe", phi_q, state)
        denominator = torch.einsum("bnhd,bhd->bnh", phi_q, normaliser).unsqueeze(-1) + eps
        outputs.append(numerator / denominator)
        q_start += n
    return torch.cat(outputs, dim=1)
