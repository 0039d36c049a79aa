"""Linear attention over packed segments, forward and backward, with the feature map fused.

Layout: queries ``q (B, Tq, H, D)`` packed segment after segment; keys ``k (B, Tk, H, D)``
and values ``v (B, Tk, H, E)`` packed per key set (key set ``j`` owns rows
``cu_seqlens_k[j] .. cu_seqlens_k[j+1]``); ``segment_keyset[s]`` is the key set segment s
reads; all contiguous. With ``phi`` = elu + 1 (``RELU``: relu), per key set and head

    S = sum_m phi(k_m)^T v_m  (D x E),   z = sum_m phi(k_m)  (D),

and per query ``out = phi(q) S / (phi(q) . z + eps)``. Phase one reduces S and z over each key
set's blocks; phase two applies them to each query block: O(Tq + Tk) time, O(S_k * D * E)
state. The backward pass runs the same two phases in reverse: per query block, dq and that
block's share of dS and dz (summed over blocks by the launcher); then per key block, dk and dv.
Query blocks are listed in block tables (``block_segment``, ``block_start``), key blocks are
walked inside each key set's program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output


@triton.jit
def _features(x, RELU: tl.constexpr):
    if RELU:
        return tl.maximum(x, 0.0)
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _feature_slope(x, RELU: tl.constexpr):
    if RELU:
        return tl.where(x > 0, 1.0, 0.0)
    return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _state_offsets(slot, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Offsets of the ``(BLOCK_D, BLOCK_E)`` state and the ``(BLOCK_D,)`` normaliser in
    ``slot`` of their buffers."""
    offs_d = tl.arange(0, BLOCK_D)
    return slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, :], slot * BLOCK_D + offs_d


@triton.jit
def _keyset_program(cu_seqlens_k, n_heads, n_keysets):
    """What a key-set program (grid: key set, batch x head) works on: (b, h, first packed
    key row, length, total packed key rows, its state slot)."""
    keyset = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    begin = tl.load(cu_seqlens_k + keyset).to(tl.int64)
    length = tl.load(cu_seqlens_k + keyset + 1).to(tl.int64) - begin
    total = tl.load(cu_seqlens_k + n_keysets).to(tl.int64)
    return b, h, begin, length, total, (b * n_heads + h) * n_keysets + keyset


@triton.jit
def _query_block(block_segment, block_start, segment_keyset, cu_seqlens_q, n_heads, n_keysets, n_segments, BLOCK: tl.constexpr):
    """What a query-block program (grid: block, batch x head) works on: its rows within the
    segment, their mask, the packed (row, head) index of each, the state slot of the key set
    the segment reads."""
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    segment = tl.load(block_segment + tl.program_id(0))
    keyset = tl.load(segment_keyset + segment).to(tl.int64)
    begin = tl.load(cu_seqlens_q + segment).to(tl.int64)
    length = tl.load(cu_seqlens_q + segment + 1) - begin
    total = tl.load(cu_seqlens_q + n_segments).to(tl.int64)
    rows = tl.load(block_start + tl.program_id(0)) + tl.arange(0, BLOCK)
    return rows, rows < length, (b * total + begin + rows) * n_heads + h, (b * n_heads + h) * n_keysets + keyset


@triton.jit
def linear_state_kernel(
    K, V, STATE, NORMALISER, cu_seqlens_k, n_heads, n_keysets,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    b, h, begin, length, total, slot = _keyset_program(cu_seqlens_k, n_heads, n_keysets)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    d_mask = offs_d < HEAD_DIM
    e_mask = offs_e < VALUE_DIM
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    normaliser = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        r_mask = rows < length
        base = ((b * total + begin + rows) * n_heads + h)
        k = tl.load(K + base[:, None] * HEAD_DIM + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + base[:, None] * VALUE_DIM + offs_e[None, :], mask=r_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        phi_k = tl.where(r_mask[:, None] & d_mask[None, :], _features(k, RELU), 0.0)
        state = tl.dot(tl.trans(phi_k), v, state)
        normaliser += tl.sum(phi_k, axis=0)
    matrix_at, vector_at = _state_offsets(slot, BLOCK_D, BLOCK_E)
    tl.store(STATE + matrix_at, state)
    tl.store(NORMALISER + vector_at, normaliser)


@triton.jit
def linear_apply_kernel(
    Q, STATE, NORMALISER, O, cu_seqlens_q, segment_keyset, block_segment, block_start,
    n_heads, n_keysets, n_segments, eps,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    rows, r_mask, base, slot = _query_block(block_segment, block_start, segment_keyset, cu_seqlens_q, n_heads, n_keysets, n_segments, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = tl.load(Q + base[:, None] * HEAD_DIM + offs_d[None, :], mask=r_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    phi_q = tl.where((offs_d < HEAD_DIM)[None, :], _features(q, RELU), 0.0)
    matrix_at, vector_at = _state_offsets(slot, BLOCK_D, BLOCK_E)
    state = tl.load(STATE + matrix_at)
    normaliser = tl.load(NORMALISER + vector_at)
    numerator = tl.dot(phi_q, state, tl.zeros([BLOCK, BLOCK_E], dtype=tl.float32))
    denominator = tl.sum(phi_q * normaliser[None, :], axis=1) + eps
    tl.store(O + base[:, None] * VALUE_DIM + offs_e[None, :], (numerator / denominator[:, None]).to(O.dtype.element_ty),
             mask=r_mask[:, None] & (offs_e < VALUE_DIM)[None, :])


@triton.jit
def linear_query_bwd_kernel(
    Q, STATE, NORMALISER, O, DO, DQ, DSTATE_PARTIAL, DNORMALISER_PARTIAL,
    cu_seqlens_q, segment_keyset, block_segment, block_start,
    n_heads, n_keysets, n_segments, eps,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    """dq for a query block, and the block's share of dS and dz: with d = phi(q).z + eps,
    dn = dO / d and dd = -(dO . O) / d, dphi(q) = dn S^T + dd z, dS += phi(q)^T dn, dz += dd phi(q)."""
    rows, r_mask, base, slot = _query_block(block_segment, block_start, segment_keyset, cu_seqlens_q, n_heads, n_keysets, n_segments, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    d_mask = offs_d < HEAD_DIM
    e_mask = offs_e < VALUE_DIM
    q = tl.load(Q + base[:, None] * HEAD_DIM + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    out = tl.load(O + base[:, None] * VALUE_DIM + offs_e[None, :], mask=r_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    grad = tl.load(DO + base[:, None] * VALUE_DIM + offs_e[None, :], mask=r_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    phi_q = tl.where(r_mask[:, None] & d_mask[None, :], _features(q, RELU), 0.0)
    matrix_at, vector_at = _state_offsets(slot, BLOCK_D, BLOCK_E)
    state = tl.load(STATE + matrix_at)
    normaliser = tl.load(NORMALISER + vector_at)
    denominator = tl.sum(phi_q * normaliser[None, :], axis=1) + eps
    d_numerator = grad / denominator[:, None]
    d_denominator = -tl.sum(grad * out, axis=1) / denominator
    d_phi = tl.dot(d_numerator, tl.trans(state), tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)) + d_denominator[:, None] * normaliser[None, :]
    dq = d_phi * _feature_slope(q, RELU)
    tl.store(DQ + base[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    d_state = tl.dot(tl.trans(phi_q), d_numerator, tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32))
    d_normaliser = tl.sum(phi_q * d_denominator[:, None], axis=0)
    partial_at, partial_vector_at = _state_offsets(tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0), BLOCK_D, BLOCK_E)
    tl.store(DSTATE_PARTIAL + partial_at, d_state)
    tl.store(DNORMALISER_PARTIAL + partial_vector_at, d_normaliser)


@triton.jit
def linear_key_bwd_kernel(
    K, V, DSTATE, DNORMALISER, DK, DV, cu_seqlens_k, n_heads, n_keysets,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    """dk and dv of a key set: dphi(k) = v dS^T + dz, dv = phi(k) dS."""
    b, h, begin, length, total, slot = _keyset_program(cu_seqlens_k, n_heads, n_keysets)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    d_mask = offs_d < HEAD_DIM
    e_mask = offs_e < VALUE_DIM
    matrix_at, vector_at = _state_offsets(slot, BLOCK_D, BLOCK_E)
    d_state = tl.load(DSTATE + matrix_at)
    d_normaliser = tl.load(DNORMALISER + vector_at)
    for start in range(0, length, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        r_mask = rows < length
        base = ((b * total + begin + rows) * n_heads + h)
        k = tl.load(K + base[:, None] * HEAD_DIM + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + base[:, None] * VALUE_DIM + offs_e[None, :], mask=r_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        phi_k = tl.where(d_mask[None, :], _features(k, RELU), 0.0)
        d_phi = tl.dot(v, tl.trans(d_state), tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)) + d_normaliser[None, :]
        dk = d_phi * _feature_slope(k, RELU)
        dv = tl.dot(phi_k, d_state, tl.zeros([BLOCK, BLOCK_E], dtype=tl.float32))
        tl.store(DK + base[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
        tl.store(DV + base[:, None] * VALUE_DIM + offs_e[None, :], dv.to(DV.dtype.element_ty), mask=r_mask[:, None] & e_mask[None, :])


BLOCK_ROWS = 16


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, segment_keyset: torch.Tensor,
    block_segment: torch.Tensor, block_start: torch.Tensor, eps: float, relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention of packed segments: (out ``(B, Tq, H, E)``, state, normaliser).

    The block tables list query blocks of ``BLOCK_ROWS`` rows. State ``(B, H, S_k, Dp, Ep)``
    and normaliser ``(B, H, S_k, Dp)`` are float32, padded to the kernels' block sizes.
    """
    batch, _, heads, head_dim = q.shape
    value_dim = v.shape[3]
    n_keysets = cu_seqlens_k.shape[0] - 1
    block_d, block_e = _pad(head_dim), _pad(value_dim)
    state = torch.zeros(batch, heads, n_keysets, block_d, block_e, dtype=torch.float32, device=q.device)
    normaliser = torch.zeros(batch, heads, n_keysets, block_d, dtype=torch.float32, device=q.device)
    out = new_output(v, q.shape[:3] + (value_dim,), v.dtype)
    common = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_D=block_d, BLOCK_E=block_e, BLOCK=BLOCK_ROWS, RELU=relu)
    if n_keysets:
        linear_state_kernel[(n_keysets, batch * heads)](k, v, state, normaliser, cu_seqlens_k, heads, n_keysets, **common)
    if block_segment.shape[0]:
        linear_apply_kernel[(block_segment.shape[0], batch * heads)](
            q, state, normaliser, out, cu_seqlens_q, segment_keyset, block_segment, block_start,
            heads, n_keysets, cu_seqlens_q.shape[0] - 1, eps, **common,
        )
    return out, state, normaliser


def linear_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    state: torch.Tensor, normaliser: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, segment_keyset: torch.Tensor,
    block_segment: torch.Tensor, block_start: torch.Tensor, eps: float, relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`linear_attention_fwd`."""
    batch, _, heads, head_dim = q.shape
    value_dim = v.shape[3]
    n_keysets = cu_seqlens_k.shape[0] - 1
    n_blocks = block_segment.shape[0]
    block_d, block_e = _pad(head_dim), _pad(value_dim)
    common = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_D=block_d, BLOCK_E=block_e, BLOCK=BLOCK_ROWS, RELU=relu)
    grad_out = grad_out.contiguous()
    dq, dk, dv = new_output(q, q.shape, q.dtype), new_output(k, k.shape, k.dtype), new_output(v, v.shape, v.dtype)
    d_state_partial = torch.zeros(batch * heads, n_blocks, block_d, block_e, dtype=torch.float32, device=q.device)
    d_normaliser_partial = torch.zeros(batch * heads, n_blocks, block_d, dtype=torch.float32, device=q.device)
    if n_blocks:
        linear_query_bwd_kernel[(n_blocks, batch * heads)](
            q, state, normaliser, out, grad_out, dq, d_state_partial, d_normaliser_partial,
            cu_seqlens_q, segment_keyset, block_segment, block_start,
            heads, n_keysets, cu_seqlens_q.shape[0] - 1, eps, **common,
        )
    keyset_of_block = segment_keyset.long()[block_segment.long()]
    d_state = torch.zeros(batch * heads, n_keysets, block_d, block_e, dtype=torch.float32, device=q.device)
    d_state = d_state.index_add(1, keyset_of_block, d_state_partial).contiguous()
    d_normaliser = torch.zeros(batch * heads, n_keysets, block_d, dtype=torch.float32, device=q.device)
    d_normaliser = d_normaliser.index_add(1, keyset_of_block, d_normaliser_partial).contiguous()
    if n_keysets:
        linear_key_bwd_kernel[(n_keysets, batch * heads)](
            k, v, d_state, d_normaliser, dk, dv, cu_seqlens_k, heads, n_keysets, **common,
        )
    return dq, dk, dv
