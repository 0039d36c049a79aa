"""Linear attention over packed segments, forward and backward, with the feature map fused.

Layout: queries ``q (B, Tq, H, D)`` packed segment after segment; keys ``k (B, Tk, H, D)``
and values ``v (B, Tk, H, E)`` packed per key set (key set ``j`` owns rows
``cu_seqlens_k[j] .. cu_seqlens_k[j+1]``); ``segment_keyset[s]`` is the key set segment s
reads; all contiguous. With ``phi`` = elu + 1 (``RELU``: relu), per key set and head

    S = sum_m phi(k_m)^T v_m  (D x E),   z = sum_m phi(k_m)  (D),

and per query ``out = phi(q) S / (phi(q) . z + eps)``. O(Tq + Tk) time, O(S_k * D * E) state.

Phase one splits every key set into ``n_parts`` parts of whole ``BLOCK``-row blocks (a part
per program, so that short key sets and few heads still fill the GPU); each program sums its
part's blocks and the launcher adds the parts in a fixed order. Phase two applies S and z to
each query block (listed in the block tables ``block_segment``, ``block_start``). The
backward pass splits every query segment the same way: each program writes dq of its part
and the part's share of dS and dz (``n_parts`` shares per segment, summed by the launcher and
gathered per key set); then each part of a key set gives its dk and dv. Scratch:
O(B * H * (S_q + S_k) * n_parts * D * E) floats, n_parts about 264 / (B * H * segments).
``tl.dot`` operands are of type ``DOT`` (:mod:`.operands`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output
from .operands import dot_dtype, dot_width


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
    return slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[
        None, :
    ], slot * BLOCK_D + offs_d


@triton.jit
def _batch_head(n_heads):
    """(b, h) of this program (grid axis 1: batch x head)."""
    batch_head = tl.program_id(1)
    return (batch_head // n_heads).to(tl.int64), (batch_head % n_heads).to(tl.int64)


@triton.jit
def _part(cu_seqlens, n_sets, n_parts, BLOCK: tl.constexpr):
    """What a part program (grid axis 0: set x part) works on: (its set, the set's first
    packed row, the first and end row of its part within the set, total packed rows). Parts
    are whole blocks; the trailing parts of a short set are empty."""
    index = tl.program_id(0) // n_parts
    part = tl.program_id(0) % n_parts
    begin = tl.load(cu_seqlens + index)
    length = tl.load(cu_seqlens + index + 1) - begin
    rows = tl.cdiv(tl.cdiv(length, n_parts), BLOCK) * BLOCK
    start = part * rows
    return index, begin.to(tl.int64), start, tl.minimum(start + rows, length), tl.load(cu_seqlens + n_sets).to(tl.int64)


@triton.jit
def _rows(X, b, h, begin, total, rows, r_mask, n_heads, WIDTH: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows ``rows`` (within a set starting at packed row ``begin``) of head h in batch b of
    a ``(B, T, H, WIDTH)`` tensor, ``(len(rows), BLOCK_W)`` in float32, zeros outside; and
    their offsets and mask."""
    offs = tl.arange(0, BLOCK_W)
    at = ((b * total + begin + rows) * n_heads + h)[:, None] * WIDTH + offs[None, :]
    mask = r_mask[:, None] & (offs < WIDTH)[None, :]
    return tl.load(X + at, mask=mask, other=0.0).to(tl.float32), at, mask


@triton.jit
def _query_block(block_segment, block_start, segment_keyset, cu_seqlens_q, n_segments, BLOCK: tl.constexpr):
    """What a query-block program (grid: block, batch x head) works on: its rows within the
    segment, their mask, the segment's first packed row, total packed rows, the key set the
    segment reads."""
    segment = tl.load(block_segment + tl.program_id(0))
    begin = tl.load(cu_seqlens_q + segment).to(tl.int64)
    length = tl.load(cu_seqlens_q + segment + 1) - begin
    rows = tl.load(block_start + tl.program_id(0)) + tl.arange(0, BLOCK)
    return (
        rows,
        rows < length,
        begin,
        tl.load(cu_seqlens_q + n_segments).to(tl.int64),
        tl.load(segment_keyset + segment).to(tl.int64),
    )


@triton.jit
def linear_state_kernel(
    K,
    V,
    STATE_PARTIAL,
    NORMALISER_PARTIAL,
    cu_seqlens_k,
    n_heads,
    n_keysets,
    n_parts,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr,
    RELU: tl.constexpr,
    DOT: tl.constexpr,
):
    """One part's share of S and z."""
    b, h = _batch_head(n_heads)
    keyset, begin, start, end, total = _part(cu_seqlens_k, n_keysets, n_parts, BLOCK)
    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    normaliser = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        r_mask = rows < end
        k, _, k_mask = _rows(K, b, h, begin, total, rows, r_mask, n_heads, HEAD_DIM, BLOCK_D)
        v, _, _ = _rows(V, b, h, begin, total, rows, r_mask, n_heads, VALUE_DIM, BLOCK_E)
        phi_k = tl.where(k_mask, _features(k, RELU), 0.0)
        state = tl.dot(tl.trans(phi_k.to(DOT)), v.to(DOT), state)
        normaliser += tl.sum(phi_k, axis=0)
    matrix_at, vector_at = _state_offsets(
        tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0), BLOCK_D, BLOCK_E
    )
    tl.store(STATE_PARTIAL + matrix_at, state)
    tl.store(NORMALISER_PARTIAL + vector_at, normaliser)


@triton.jit
def linear_apply_kernel(
    Q,
    STATE,
    NORMALISER,
    O,
    cu_seqlens_q,
    segment_keyset,
    block_segment,
    block_start,
    n_heads,
    n_keysets,
    n_segments,
    eps,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr,
    RELU: tl.constexpr,
    DOT: tl.constexpr,
):
    b, h = _batch_head(n_heads)
    rows, r_mask, begin, total, keyset = _query_block(
        block_segment, block_start, segment_keyset, cu_seqlens_q, n_segments, BLOCK
    )
    q, _, q_mask = _rows(Q, b, h, begin, total, rows, r_mask, n_heads, HEAD_DIM, BLOCK_D)
    phi_q = tl.where(q_mask, _features(q, RELU), 0.0)
    matrix_at, vector_at = _state_offsets((b * n_heads + h) * n_keysets + keyset, BLOCK_D, BLOCK_E)
    state = tl.load(STATE + matrix_at)
    normaliser = tl.load(NORMALISER + vector_at)
    numerator = tl.dot(phi_q.to(DOT), state.to(DOT), tl.zeros([BLOCK, BLOCK_E], dtype=tl.float32))
    denominator = tl.sum(phi_q * normaliser[None, :], axis=1) + eps
    _, out_at, out_mask = _rows(O, b, h, begin, total, rows, r_mask, n_heads, VALUE_DIM, BLOCK_E)
    tl.store(O + out_at, (numerator / denominator[:, None]).to(O.dtype.element_ty), mask=out_mask)


@triton.jit
def linear_query_bwd_kernel(
    Q,
    STATE,
    NORMALISER,
    O,
    DO,
    DQ,
    DSTATE_PARTIAL,
    DNORMALISER_PARTIAL,
    cu_seqlens_q,
    segment_keyset,
    n_heads,
    n_keysets,
    n_segments,
    n_parts,
    eps,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr,
    RELU: tl.constexpr,
    DOT: tl.constexpr,
):
    """dq for one part of a query segment, and the part's share of dS and dz: with
    d = phi(q).z + eps, dn = dO / d and dd = -(dO . O) / d, dphi(q) = dn S^T + dd z,
    dS += phi(q)^T dn, dz += dd phi(q)."""
    b, h = _batch_head(n_heads)
    segment, begin, start, end, total = _part(cu_seqlens_q, n_segments, n_parts, BLOCK)
    keyset = tl.load(segment_keyset + segment).to(tl.int64)
    matrix_at, vector_at = _state_offsets((b * n_heads + h) * n_keysets + keyset, BLOCK_D, BLOCK_E)
    state = tl.load(STATE + matrix_at)
    state_operand = tl.trans(state).to(DOT)
    normaliser = tl.load(NORMALISER + vector_at)
    d_state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    d_normaliser = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        r_mask = rows < end
        q, q_at, q_mask = _rows(Q, b, h, begin, total, rows, r_mask, n_heads, HEAD_DIM, BLOCK_D)
        out, _, _ = _rows(O, b, h, begin, total, rows, r_mask, n_heads, VALUE_DIM, BLOCK_E)
        grad, _, _ = _rows(DO, b, h, begin, total, rows, r_mask, n_heads, VALUE_DIM, BLOCK_E)
        phi_q = tl.where(q_mask, _features(q, RELU), 0.0)
        denominator = tl.sum(phi_q * normaliser[None, :], axis=1) + eps
        d_numerator = grad / denominator[:, None]
        d_denominator = -tl.sum(grad * out, axis=1) / denominator
        d_numerator_operand = d_numerator.to(DOT)
        d_phi = tl.dot(d_numerator_operand, state_operand, tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32))
        dq = (d_phi + d_denominator[:, None] * normaliser[None, :]) * _feature_slope(q, RELU)
        tl.store(DQ + q_at, dq.to(DQ.dtype.element_ty), mask=q_mask)
        d_state = tl.dot(tl.trans(phi_q.to(DOT)), d_numerator_operand, d_state)
        d_normaliser += tl.sum(phi_q * d_denominator[:, None], axis=0)
    partial_at, partial_vector_at = _state_offsets(
        tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0), BLOCK_D, BLOCK_E
    )
    tl.store(DSTATE_PARTIAL + partial_at, d_state)
    tl.store(DNORMALISER_PARTIAL + partial_vector_at, d_normaliser)


@triton.jit
def linear_key_bwd_kernel(
    K,
    V,
    DSTATE,
    DNORMALISER,
    DK,
    DV,
    cu_seqlens_k,
    n_heads,
    n_keysets,
    n_parts,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK: tl.constexpr,
    RELU: tl.constexpr,
    DOT: tl.constexpr,
):
    """dk and dv of one part of a key set: dphi(k) = v dS^T + dz, dv = phi(k) dS."""
    b, h = _batch_head(n_heads)
    keyset, begin, start, end, total = _part(cu_seqlens_k, n_keysets, n_parts, BLOCK)
    matrix_at, vector_at = _state_offsets((b * n_heads + h) * n_keysets + keyset, BLOCK_D, BLOCK_E)
    d_state = tl.load(DSTATE + matrix_at)
    d_state_operand = d_state.to(DOT)
    d_state_transposed = tl.trans(d_state).to(DOT)
    d_normaliser = tl.load(DNORMALISER + vector_at)
    for first in range(start, end, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        r_mask = rows < end
        k, k_at, k_mask = _rows(K, b, h, begin, total, rows, r_mask, n_heads, HEAD_DIM, BLOCK_D)
        v, v_at, v_mask = _rows(V, b, h, begin, total, rows, r_mask, n_heads, VALUE_DIM, BLOCK_E)
        phi_k = tl.where(k_mask, _features(k, RELU), 0.0)
        d_phi = (
            tl.dot(v.to(DOT), d_state_transposed, tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)) + d_normaliser[None, :]
        )
        dv = tl.dot(phi_k.to(DOT), d_state_operand, tl.zeros([BLOCK, BLOCK_E], dtype=tl.float32))
        tl.store(DK + k_at, (d_phi * _feature_slope(k, RELU)).to(DK.dtype.element_ty), mask=k_mask)
        tl.store(DV + v_at, dv.to(DV.dtype.element_ty), mask=v_mask)


BLOCK_ROWS = 64
"""Rows per query block (the block tables), and per step of a part program except where
:func:`launch_config` takes 32."""
PROGRAMS_WANTED = 264
"""Programs a part launch aims for: two per SM of an H100."""
MAX_PARTS = 64


def launch_config(kernel: str, dtype: torch.dtype, block_d: int, block_e: int) -> dict:
    """``BLOCK`` and ``num_warps`` of ``kernel`` (``"state"``, ``"apply"``, ``"query_bwd"``,
    ``"key_bwd"``) for inputs of ``dtype`` and a ``block_d x block_e`` state. Above 64
    columns: 8 warps (the state and its gradient would not fit the registers of 4), and part
    programs take 32 rows per step instead of BLOCK_ROWS where float32 operands would
    overflow shared memory beside the state operands, and in the query backward at any
    type (its dS accumulator beside tiles of q, O and dO of 64 rows spills registers at bf16
    d 128). The apply kernel's blocks are the block tables' BLOCK_ROWS."""
    wide = max(block_d, block_e) > 64
    halved = wide and (kernel == "query_bwd" or (kernel != "apply" and dtype == torch.float32))
    return dict(BLOCK=32 if halved else BLOCK_ROWS, num_warps=8 if wide else 4)


def parts(n_sets: int, batch_heads: int) -> int:
    """Parts per set: enough for about PROGRAMS_WANTED programs over ``n_sets`` sets and
    ``batch_heads`` (batch x head) pairs, at most MAX_PARTS."""
    return max(1, min(MAX_PARTS, triton.cdiv(PROGRAMS_WANTED, max(1, n_sets * batch_heads))))


def linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    eps: float,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention of packed segments: (out ``(B, Tq, H, E)``, state, normaliser).

    The block tables list query blocks of ``BLOCK_ROWS`` rows. State ``(B, H, S_k, Dp, Ep)``
    and normaliser ``(B, H, S_k, Dp)`` are float32, padded to the kernels' block sizes.
    """
    batch, _, heads, head_dim = q.shape
    value_dim = v.shape[3]
    n_keysets = cu_seqlens_k.shape[0] - 1
    block_d, block_e = dot_width(head_dim), dot_width(value_dim)
    n_parts = parts(n_keysets, batch * heads)
    state_partial = torch.empty(
        batch, heads, n_keysets, n_parts, block_d, block_e, dtype=torch.float32, device=q.device
    )
    normaliser_partial = torch.empty(batch, heads, n_keysets, n_parts, block_d, dtype=torch.float32, device=q.device)
    out = new_output(v, q.shape[:3] + (value_dim,), v.dtype)
    common = dict(
        HEAD_DIM=head_dim,
        VALUE_DIM=value_dim,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        RELU=relu,
        DOT=dot_dtype(q.dtype),
    )
    if n_keysets:
        linear_state_kernel[(n_keysets * n_parts, batch * heads)](
            k,
            v,
            state_partial,
            normaliser_partial,
            cu_seqlens_k,
            heads,
            n_keysets,
            n_parts,
            **common,
            **launch_config("state", k.dtype, block_d, block_e),
        )
    state, normaliser = state_partial.sum(3), normaliser_partial.sum(3)
    if block_segment.shape[0]:
        linear_apply_kernel[(block_segment.shape[0], batch * heads)](
            q,
            state,
            normaliser,
            out,
            cu_seqlens_q,
            segment_keyset,
            block_segment,
            block_start,
            heads,
            n_keysets,
            cu_seqlens_q.shape[0] - 1,
            eps,
            **common,
            **launch_config("apply", q.dtype, block_d, block_e),
        )
    return out, state, normaliser


def linear_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    state: torch.Tensor,
    normaliser: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    eps: float,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`linear_attention_fwd` (the block tables are the
    forward's; the backward walks parts of segments instead)."""
    batch, _, heads, head_dim = q.shape
    value_dim = v.shape[3]
    n_keysets = cu_seqlens_k.shape[0] - 1
    n_segments = cu_seqlens_q.shape[0] - 1
    block_d, block_e = dot_width(head_dim), dot_width(value_dim)
    common = dict(
        HEAD_DIM=head_dim,
        VALUE_DIM=value_dim,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        RELU=relu,
        DOT=dot_dtype(q.dtype),
    )
    grad_out = grad_out.contiguous()
    dq, dk, dv = new_output(q, q.shape, q.dtype), new_output(k, k.shape, k.dtype), new_output(v, v.shape, v.dtype)
    query_parts = parts(n_segments, batch * heads)
    d_state_partial = torch.empty(
        batch * heads, n_segments, query_parts, block_d, block_e, dtype=torch.float32, device=q.device
    )
    d_normaliser_partial = torch.empty(
        batch * heads, n_segments, query_parts, block_d, dtype=torch.float32, device=q.device
    )
    if n_segments:
        linear_query_bwd_kernel[(n_segments * query_parts, batch * heads)](
            q,
            state,
            normaliser,
            out,
            grad_out,
            dq,
            d_state_partial,
            d_normaliser_partial,
            cu_seqlens_q,
            segment_keyset,
            heads,
            n_keysets,
            n_segments,
            query_parts,
            eps,
            **common,
            **launch_config("query_bwd", q.dtype, block_d, block_e),
        )
    keyset_of_segment = segment_keyset.long()
    d_state = torch.zeros(batch * heads, n_keysets, block_d, block_e, dtype=torch.float32, device=q.device)
    d_state = d_state.index_add(1, keyset_of_segment, d_state_partial.sum(2)).contiguous()
    d_normaliser = torch.zeros(batch * heads, n_keysets, block_d, dtype=torch.float32, device=q.device)
    d_normaliser = d_normaliser.index_add(1, keyset_of_segment, d_normaliser_partial.sum(2)).contiguous()
    key_parts = parts(n_keysets, batch * heads)
    if n_keysets:
        linear_key_bwd_kernel[(n_keysets * key_parts, batch * heads)](
            k,
            v,
            d_state,
            d_normaliser,
            dk,
            dv,
            cu_seqlens_k,
            heads,
            n_keysets,
            key_parts,
            **common,
            **launch_config("key_bwd", q.dtype, block_d, block_e),
        )
    return dq, dk, dv
