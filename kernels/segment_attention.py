"""Attention over packed segments ("varlen"), forward and backward, with optional local
windows, top-k key selection per row, and sigmoid weights instead of softmax.

Layout: queries ``q (B, Tq, H, D)`` packed segment after segment; keys and values
``k, v (B, Tk, H, D)`` packed by key set, read in place: key set ``j`` owns key rows
``cu_seqlens_k[j] .. cu_seqlens_k[j+1]``, segment ``s`` owns query rows
``cu_seqlens_q[s] .. cu_seqlens_q[s+1]`` and reads key set ``segment_keyset[s]`` (several
segments may read one key set). The last dimension is contiguous. Work is split into
blocks of ``block`` rows (:func:`block_rows`): query blocks for the forward and dQ
(``block_segment[i]``, ``block_start[i]``: the segment of block i and its first row within
the segment), key blocks of the key sets for dK/dV (``block_keyset``, ``block_start``),
whose programs visit every segment that reads their key set (``keyset_segments``, from
``cu_keyset_segments``), so no key is copied and no gradient is summed outside a kernel.
Each program walks the other side in tiles of the inner size of its launch configuration
(:func:`launch_config`).

Masks, per segment of N queries and M keys:
- local window ``WINDOW > 0``: key m is visible to query i when
  ``|i - floor(m * N / M)| <= WINDOW // 2``; each query block visits only the key tiles
  that meet its window (and each key block only the query tiles), so work is O(N * W).
- top-k (:func:`segment_topk_attention_fwd`): key m is visible to query i when its logit
  is ``>=`` the row's k-th largest logit (ties kept). One pass over the keys keeps each
  row's k largest logits in registers; the forward reads the kept values only, and the
  backward works from the saved selection, reading O(N * k * D) values for dQ, dK and dV.
  Rows whose k-th largest logit ties exactly with keys beyond their list take a threshold
  pass over the keys instead (forward and backward), on the logits of the forward's pass:
  the same products (:func:`_logits`) of the same tiles (the query block by each key tile,
  :func:`topk_launch_arguments`), so the backward keeps exactly the keys the forward kept
  (the tied rows' dK/dV in their own kernel, :func:`segment_topk_bwd_tied_kernel`).
A query with no visible key gets zeros and ``lse = -inf``.

Matrix products take their operands in ``DOT`` (:mod:`.operands`, bounded operands): the
inputs' bf16/fp16 on the GPU, the attention weights and their gradients cast to it before
their products, as FlashAttention does; float32 under the interpreter. Accumulators,
softmax statistics and ``lse`` are float32; outputs are stored in the input dtype. Offsets
that multiply two lengths are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output
from .operands import INTERPRETING, dot_dtype, dot_width

GPU_BLOCK = 64
"""Rows per block of the block tables on a GPU (query blocks and key blocks)."""
FLOAT32_BLOCK = 32
"""Rows per block on a GPU for float32 inputs at head dims above 64, whose float32
operands and accumulators do not fit the registers of 64-row blocks."""
GPU_CONFIGS = {
    "fwd": {64: (64, 4), 128: (64, 8)},
    "bwd_dq": {64: (64, 4), 128: (16, 8)},
    "bwd_dkdv": {64: (32, 8), 128: (16, 8)},
}
"""kind -> padded head dim (64 stands for every head dim up to 64) -> (inner tile rows,
warps) on a GPU, with Triton's default 3 pipeline stages: the tiles a program walks (key
tiles for the forward and dQ, query tiles for dK/dV), chosen per head dim from sm_90
compiles with the launches' divisibility hints (``benchmarks/launch_report.py``) as the
largest tiles whose registers do not spill for bf16/fp16 inputs."""
TOPK_KEYS = 32
"""Key tile rows of the top-k kernels (:func:`topk_launch_arguments`): the forward's
logits and the backward's threshold passes over them, whose dK/dV programs hold float32
accumulators for this many keys (at head dim 128, 64 spill)."""
FLOAT32_CONFIGS = {"bwd_dq": {64: (32, 8)}}
"""Where float32 inputs (float32 operands, TF32 products) take smaller tiles than
GPU_CONFIGS: dQ at head dim 64 (above 64 their blocks are FLOAT32_BLOCK rows)."""


def block_rows(head_dim: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per query block and per key block for inputs of ``dtype``: 16 under the
    interpreter (small tests cover several blocks); on a GPU, FLOAT32_BLOCK for float32
    inputs at head dims above 64, else GPU_BLOCK."""
    if torch.device(device).type != "cuda":
        return 16
    return FLOAT32_BLOCK if dtype == torch.float32 and head_dim > 64 else GPU_BLOCK


def launch_config(kind: str, head_dim: int, block: int, dtype: torch.dtype) -> dict:
    """Inner tile rows (``INNER``) and warps of kernel ``kind`` ('fwd', 'bwd_dq',
    'bwd_dkdv') at ``head_dim`` for blocks of ``block`` rows and inputs of ``dtype``: the
    one GPU configuration of GPU_CONFIGS (FLOAT32_CONFIGS first for float32), or the block
    itself with 4 warps under the interpreter."""
    if INTERPRETING:
        return {"INNER": block, "num_warps": 4}
    padded = 64 if head_dim <= 64 else 128
    configs = (
        FLOAT32_CONFIGS[kind]
        if dtype == torch.float32 and padded in FLOAT32_CONFIGS.get(kind, {})
        else GPU_CONFIGS[kind]
    )
    inner, warps = configs[padded]
    return {"INNER": min(inner, block), "num_warps": warps}


@triton.jit
def _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, segment_keyset, n_heads):
    """(batch, head, first row of the query block within its segment, the segment's first
    query row and query count, its key set's first key row and key count) of this program."""
    batch_head = tl.program_id(1)
    segment = tl.load(block_segment + tl.program_id(0))
    q_begin = tl.load(cu_seqlens_q + segment)
    keyset = tl.load(segment_keyset + segment)
    k_begin = tl.load(cu_seqlens_k + keyset)
    return (
        (batch_head // n_heads).to(tl.int64),
        (batch_head % n_heads).to(tl.int64),
        tl.load(block_start + tl.program_id(0)),
        q_begin,
        tl.load(cu_seqlens_q + segment + 1) - q_begin,
        k_begin,
        tl.load(cu_seqlens_k + keyset + 1) - k_begin,
    )


@triton.jit
def _key_block_context(
    block_keyset, block_start, cu_seqlens_k, cu_keyset_segments, n_heads, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr
):
    """(batch, head, first row of this program's keys within their key set, the key set's
    first key row and key count, and the range ``[first, last)`` of ``keyset_segments`` that
    lists the segments reading it) of this program: part ``program_id(0) % SPLIT`` (BLOCK_N
    keys) of key block ``program_id(0) // SPLIT``."""
    batch_head = tl.program_id(1)
    index = tl.program_id(0) // SPLIT
    keyset = tl.load(block_keyset + index)
    k_begin = tl.load(cu_seqlens_k + keyset)
    return (
        (batch_head // n_heads).to(tl.int64),
        (batch_head % n_heads).to(tl.int64),
        tl.load(block_start + index) + (tl.program_id(0) % SPLIT) * BLOCK_N,
        k_begin,
        tl.load(cu_seqlens_k + keyset + 1) - k_begin,
        tl.load(cu_keyset_segments + keyset),
        tl.load(cu_keyset_segments + keyset + 1),
    )


@triton.jit
def _block_rows(first, begin, count, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Positions ``first .. first + BLOCK - 1`` of a segment or key set of ``count`` rows
    starting at packed row ``begin``: (positions, columns, row mask, column mask, packed
    rows in int64)."""
    offs = first + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return offs, offs_d, offs < count, offs_d < HEAD_DIM, (begin + offs).to(tl.int64)


@triton.jit
def _store_rows(ptr, value, b, h, rows, offs_d, stride_b, stride_t, stride_h, row_mask, d_mask):
    """Store ``value (rows, D)`` into rows ``rows`` of head h in batch b of a (B, T, H, D) tensor."""
    tl.store(
        ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + offs_d[None, :],
        value.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _load_rows(ptr, b, h, rows, offs_d, stride_b, stride_t, stride_h, row_mask, d_mask):
    """Rows ``rows`` (int64) of head h in batch b of a (B, T, H, D) tensor as ``(rows, D)``
    in its own dtype; zeros outside the masks."""
    return tl.load(
        ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )


@triton.jit
def _load_columns(ptr, b, h, rows, offs_d, stride_b, stride_t, stride_h, row_mask, d_mask):
    """The same rows transposed: ``(D, rows)``."""
    return tl.load(
        ptr + b * stride_b + h * stride_h + rows[None, :] * stride_t + offs_d[:, None],
        mask=row_mask[None, :] & d_mask[:, None],
        other=0.0,
    )


@triton.jit
def _key_range(q_first, n_q, n_k, WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The keys ``[low, high)`` that queries ``q_first .. q_first + BLOCK_ROWS - 1`` can see."""
    if WINDOW > 0:
        first = tl.maximum(q_first - WINDOW // 2, 0).to(tl.int64)
        last = (q_first + BLOCK_ROWS - 1 + WINDOW // 2).to(tl.int64)
        low = tl.cdiv(first * n_k, tl.maximum(n_q, 1)).to(tl.int32)
        high = tl.minimum(tl.cdiv((last + 1) * n_k, tl.maximum(n_q, 1)), n_k).to(tl.int32)
    else:
        low = q_first * 0
        high = n_k
    return low, high


@triton.jit
def _query_range(k_first, n_q, n_k, WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The queries ``[low, high)`` that keys ``k_first .. k_first + BLOCK_ROWS - 1`` are visible to."""
    if WINDOW > 0:
        last_key = (tl.minimum(k_first + BLOCK_ROWS, n_k) - 1).to(tl.int64)
        low = tl.maximum((k_first.to(tl.int64) * n_q) // tl.maximum(n_k, 1) - WINDOW // 2, 0).to(tl.int32)
        high = tl.minimum((last_key * n_q) // tl.maximum(n_k, 1) + WINDOW // 2 + 1, n_q).to(tl.int32)
    else:
        low = k_first * 0
        high = n_q
    return low, high


@triton.jit
def _visible(queries, keys, n_q, n_k, s, threshold, WINDOW: tl.constexpr, USE_THRESHOLD: tl.constexpr):
    """Which (query, key) pairs of a tile of logits ``s`` count, beyond the segment bounds:
    ``queries``, ``keys`` and ``threshold`` are broadcast to the tile's shape (``(M, 1)``
    and ``(1, N)`` for a tile of queries by keys, the other way for its transpose)."""
    valid = (queries < n_q) & (keys < n_k)
    if WINDOW > 0:
        distance = queries - (keys.to(tl.int64) * n_q) // tl.maximum(n_k, 1)
        valid = valid & (distance <= WINDOW // 2) & (distance >= -(WINDOW // 2))
    if USE_THRESHOLD:
        valid = valid & (s >= threshold)
    return valid


@triton.jit
def _logits(
    q, K, b, h, k_begin, n_k, offs_n, offs_d, d_mask, stride_kb, stride_kt, stride_kh, scale, DOT: tl.constexpr
):
    """Logits ``(M, N)`` of queries ``q`` against the keys ``offs_n`` of a segment: the one
    place they are computed for a query block, so that every pass over them rounds alike."""
    kt = _load_columns(
        K, b, h, (k_begin + offs_n).to(tl.int64), offs_d, stride_kb, stride_kt, stride_kh, offs_n < n_k, d_mask
    )
    return tl.dot(q, kt.to(DOT), tl.zeros([q.shape[0], offs_n.shape[0]], dtype=tl.float32)) * scale


@triton.jit
def _attend(
    q,
    K,
    V,
    b,
    h,
    k_begin,
    n_k,
    offs_m,
    n_q,
    low,
    high,
    threshold,
    offs_d,
    d_mask,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """(acc ``(M, D)``, row max, row sum) of a query block over the key tiles that meet
    keys ``[low, high)``: online softmax (acc unnormalised), or sigmoid weights (acc final)."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range((low // BLOCK_N) * BLOCK_N, high, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_k
        v = _load_rows(
            V, b, h, (k_begin + offs_n).to(tl.int64), offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask
        ).to(DOT)
        s = _logits(q, K, b, h, k_begin, n_k, offs_n, offs_d, d_mask, stride_kb, stride_kt, stride_kh, scale, DOT)
        valid = _visible(offs_m[:, None], offs_n[None, :], n_q, n_k, s, threshold[:, None], WINDOW, USE_THRESHOLD)
        if SIGMOID:
            p = tl.where(valid, tl.sigmoid(s), 0.0)
            acc = tl.dot(p.to(DOT), v, acc)
        else:
            s = tl.where(valid, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - shift[:, None])
            rescale = tl.exp(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = tl.dot(p.to(DOT), v, acc * rescale[:, None])
            row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _normalised(acc, row_max, row_sum, SIGMOID: tl.constexpr):
    """(output, lse) of a query block from :func:`_attend`'s results (zeros and ``-inf``
    for a row that sees no key; lse unused for sigmoid weights)."""
    out = acc
    lse = row_max
    if not SIGMOID:
        seen = row_sum > 0
        out = acc / tl.where(seen, row_sum, 1.0)[:, None]
        lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def segment_attention_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    block_segment,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    n_heads,
    total_q,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """One query block of BLOCK_M rows against its key tiles of BLOCK_N rows."""
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(
        block_segment, block_start, cu_seqlens_q, cu_seqlens_k, segment_keyset, n_heads
    )

    offs_m, offs_d, m_mask, d_mask, q_rows = _block_rows(q_first, q_begin, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(DOT)
    lse_rows = (b * n_heads + h) * total_q + q_rows
    low, high = _key_range(q_first, n_q, n_k, WINDOW, BLOCK_M)
    acc, row_max, row_sum = _attend(
        q,
        K,
        V,
        b,
        h,
        k_begin,
        n_k,
        offs_m,
        n_q,
        low,
        high,
        tl.zeros([BLOCK_M], dtype=tl.float32),
        offs_d,
        d_mask,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        scale,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        WINDOW,
        False,
        SIGMOID,
        DOT,
    )
    out, lse = _normalised(acc, row_max, row_sum, SIGMOID)
    if not SIGMOID:
        tl.store(LSE + lse_rows, lse, mask=m_mask)
    _store_rows(O, out, b, h, q_rows, offs_d, stride_ob, stride_ot, stride_oh, m_mask, d_mask)


@triton.jit
def _probabilities(s, valid, lse, SIGMOID: tl.constexpr):
    """Attention weights of a tile: softmax from the saved log-sum-exp (broadcast to the
    tile), or the sigmoid."""
    if SIGMOID:
        p = tl.where(valid, tl.sigmoid(s), 0.0)
    else:
        p = tl.where(valid, tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)), 0.0)
    return p


@triton.jit
def _logit_gradient(p, dp, delta, SIGMOID: tl.constexpr):
    """dS of a tile from its weights, dP and the rows' ``delta`` (broadcast to the tile)."""
    if SIGMOID:
        ds = dp * p * (1.0 - p)
    else:
        ds = p * (dp - delta)
    return ds


@triton.jit
def _dkdv_over_queries(
    dk,
    dv,
    k,
    v,
    Q,
    K,
    DO,
    LSE,
    DELTA,
    THRESHOLD,
    b,
    h,
    q_begin,
    n_q,
    k_begin,
    offs_n,
    n_k,
    low,
    high,
    offs_d,
    d_mask,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """``dk`` (dK / scale) and ``dv`` ``(N, D)`` of the key block ``k, v`` (in DOT) plus
    those of one segment's query tiles that meet queries ``[low, high)``, on transposed
    tiles (keys by queries), so that every product reads its operands as loaded. With a
    threshold, the logits are the forward's own (:func:`_logits` on query tiles of
    BLOCK_M rows by the key block), so that the threshold selects what the forward did."""
    for start in range((low // BLOCK_M) * BLOCK_M, high, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_q
        q_rows = (q_begin + offs_m).to(tl.int64)
        do = _load_rows(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, m_mask, d_mask).to(DOT)
        stat_rows = (b * n_heads + h) * total_q + q_rows
        lse = tl.load(LSE + stat_rows, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stat_rows, mask=m_mask, other=0.0)
        threshold = tl.zeros([BLOCK_M], dtype=tl.float32)
        if USE_THRESHOLD:
            threshold = tl.load(THRESHOLD + stat_rows, mask=m_mask, other=0.0)
            q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(DOT)
            st = tl.trans(
                _logits(q, K, b, h, k_begin, n_k, offs_n, offs_d, d_mask, stride_kb, stride_kt, stride_kh, scale, DOT)
            )
        else:
            qt = _load_columns(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(DOT)
            st = tl.dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)) * scale
            q = tl.trans(qt)
        valid = _visible(offs_m[None, :], offs_n[:, None], n_q, n_k, st, threshold[None, :], WINDOW, USE_THRESHOLD)
        pt = _probabilities(st, valid, lse[None, :], SIGMOID)
        dv = tl.dot(pt.to(DOT), do, dv)
        dpt = tl.dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        dst = _logit_gradient(pt, dpt, delta[None, :], SIGMOID)
        dk = tl.dot(dst.to(DOT), q, dk)
    return dk, dv


@triton.jit
def _dq_over_keys(
    q,
    do,
    lse,
    delta,
    threshold,
    K,
    V,
    b,
    h,
    k_begin,
    n_k,
    offs_m,
    n_q,
    low,
    high,
    offs_d,
    d_mask,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """dQ / scale ``(M, D)`` of the query block ``q, do`` (in DOT) over the key tiles that
    meet keys ``[low, high)``. With a threshold, the logits are the forward's own
    (:func:`_logits`), so that the threshold selects what the forward did."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range((low // BLOCK_N) * BLOCK_N, high, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_k
        k_rows = (k_begin + offs_n).to(tl.int64)
        k = _load_rows(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask).to(DOT)
        vt = _load_columns(V, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask).to(DOT)
        if USE_THRESHOLD:
            s = _logits(q, K, b, h, k_begin, n_k, offs_n, offs_d, d_mask, stride_kb, stride_kt, stride_kh, scale, DOT)
        else:
            s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        valid = _visible(offs_m[:, None], offs_n[None, :], n_q, n_k, s, threshold[:, None], WINDOW, USE_THRESHOLD)
        p = _probabilities(s, valid, lse[:, None], SIGMOID)
        dp = tl.dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        ds = _logit_gradient(p, dp, delta[:, None], SIGMOID)
        dq = tl.dot(ds.to(DOT), k, dq)
    return dq


@triton.jit
def _dkdv_over_segments(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    THRESHOLD,
    tied_prefix,
    cu_seqlens_q,
    keyset_segments,
    b,
    h,
    first,
    last,
    k_first,
    k_begin,
    n_k,
    offs_n,
    offs_d,
    n_mask,
    d_mask,
    k_rows,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_THRESHOLD: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """``dk`` (dK / scale) and ``dv`` ``(N, D)`` of the keys ``k_rows`` (positions ``offs_n``
    of their key set) over the segments ``keyset_segments[first:last]`` that read the key
    set: the query tiles each segment's window reaches, or with a threshold, every query
    tile of the segments that have rows with ties beyond their list (``tied_prefix``)."""
    k = _load_rows(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask).to(DOT)
    v = _load_rows(V, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask).to(DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(first, last):
        segment = tl.load(keyset_segments + i)
        q_begin = tl.load(cu_seqlens_q + segment)
        n_q = tl.load(cu_seqlens_q + segment + 1) - q_begin
        low, high = _query_range(k_first, n_q, n_k, WINDOW, BLOCK_N)
        if USE_THRESHOLD:
            high = tl.where(
                _tied_rows(tied_prefix, cu_seqlens_q, keyset_segments, i, i + 1, b * n_heads + h, total_q) > 0,
                high,
                low,
            )
        dk, dv = _dkdv_over_queries(
            dk,
            dv,
            k,
            v,
            Q,
            K,
            DO,
            LSE,
            DELTA,
            THRESHOLD,
            b,
            h,
            q_begin,
            n_q,
            k_begin,
            offs_n,
            n_k,
            low,
            high,
            offs_d,
            d_mask,
            stride_qb,
            stride_qt,
            stride_qh,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_dob,
            stride_dot,
            stride_doh,
            n_heads,
            total_q,
            scale,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            WINDOW,
            USE_THRESHOLD,
            SIGMOID,
            DOT,
        )
    return dk, dv


@triton.jit
def segment_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    cu_seqlens_q,
    cu_seqlens_k,
    keyset_segments,
    cu_keyset_segments,
    block_keyset,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """One key block of BLOCK_N rows of a key set against the query tiles of every segment
    that reads the key set (``keyset_segments``), on transposed tiles (keys by queries),
    so that every product reads its operands as loaded."""
    b, h, k_first, k_begin, n_k, first, last = _key_block_context(
        block_keyset, block_start, cu_seqlens_k, cu_keyset_segments, n_heads, 1, BLOCK_N
    )

    offs_n, offs_d, n_mask, d_mask, k_rows = _block_rows(k_first, k_begin, n_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    dk, dv = _dkdv_over_segments(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        LSE,
        cu_seqlens_q,
        cu_seqlens_q,
        keyset_segments,
        b,
        h,
        first,
        last,
        k_first,
        k_begin,
        n_k,
        offs_n,
        offs_d,
        n_mask,
        d_mask,
        k_rows,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_dob,
        stride_dot,
        stride_doh,
        n_heads,
        total_q,
        scale,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        WINDOW,
        False,
        SIGMOID,
        DOT,
    )
    _store_rows(DK, dk * scale, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
    _store_rows(DV, dv, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)


@triton.jit
def segment_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    block_segment,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SIGMOID: tl.constexpr,
    DOT: tl.constexpr,
):
    """One query block of BLOCK_M rows against its key tiles of BLOCK_N rows."""
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(
        block_segment, block_start, cu_seqlens_q, cu_seqlens_k, segment_keyset, n_heads
    )

    offs_m, offs_d, m_mask, d_mask, q_rows = _block_rows(q_first, q_begin, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(DOT)
    do = _load_rows(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, m_mask, d_mask).to(DOT)
    stat_rows = (b * n_heads + h) * total_q + q_rows
    lse = tl.load(LSE + stat_rows, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + stat_rows, mask=m_mask, other=0.0)
    low, high = _key_range(q_first, n_q, n_k, WINDOW, BLOCK_M)
    dq = _dq_over_keys(
        q,
        do,
        lse,
        delta,
        lse,
        K,
        V,
        b,
        h,
        k_begin,
        n_k,
        offs_m,
        n_q,
        low,
        high,
        offs_d,
        d_mask,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        scale,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        WINDOW,
        False,
        SIGMOID,
        DOT,
    )
    _store_rows(DQ, dq * scale, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)


@triton.jit
def _merge_tile(s, offs_n, best, best_key, ties, TOP: tl.constexpr):
    """Merge a tile of logits ``s (M, N)`` (``-inf`` where no key) at segment positions
    ``offs_n`` into each row's running top list: ``best (M, TOP)`` holds the largest logits
    seen so far (``-inf`` in slots still free, ``+inf`` in slots beyond k, never replaced),
    ``best_key`` their positions, ``ties`` the number of keys outside the list whose logit
    equals the list's least. Each step moves the tile's largest remaining logit of every
    row into the slot of the list's least, while it is larger; rows are done after at most
    k steps, and most tiles need few."""
    slots = tl.arange(0, TOP)
    least = tl.min(best, axis=1)
    top = tl.max(s, axis=1)
    take = top > least
    while tl.max(take.to(tl.int32), axis=0) > 0:
        slot = tl.min(tl.where(best == least[:, None], slots[None, :], TOP), axis=1)
        column = tl.min(tl.where(s == top[:, None], offs_n[None, :], 2147483647), axis=1)
        placed = take[:, None] & (slots[None, :] == slot[:, None])
        best = tl.where(placed, top[:, None], best)
        best_key = tl.where(placed, column[:, None], best_key)
        s = tl.where(take[:, None] & (offs_n[None, :] == column[:, None]), float("-inf"), s)
        new_least = tl.min(best, axis=1)
        evicted_tie = (new_least == least) & (least > float("-inf"))
        ties = tl.where(take, tl.where(evicted_tie, ties + 1, 0), ties)
        least = new_least
        top = tl.max(s, axis=1)
        take = top > least
    return best, best_key, ties + tl.sum(((s == least[:, None]) & (s > float("-inf"))).to(tl.int32), axis=1)


@triton.jit
def _slot(x, slots, j):
    """Column ``j`` of a ``(M, TOP)`` tile."""
    return tl.sum(tl.where(slots[None, :] == j, x, 0), axis=1)


@triton.jit
def segment_topk_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    selection,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    block_segment,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    n_heads,
    total_q,
    scale,
    top_k,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOP: tl.constexpr,
    DOT: tl.constexpr,
):
    """Top-k attention of one query block in one pass over its segment's keys: the logits
    of each key tile go into each row's running top-k list (:func:`_merge_tile`); the
    output is then the softmax over the kept logits, reading only the kept values. The
    selection is saved (see :func:`segment_topk_attention_fwd`) for the backward pass.

    Rows whose k-th largest logit ties with keys beyond the list (exact ties, as integer
    inputs give) take a second pass over the keys with the threshold, as the same
    :func:`_logits` computes them, in key tiles of BLOCK_N rows, those of the backward's
    threshold passes (:func:`topk_launch_arguments`)."""
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(
        block_segment, block_start, cu_seqlens_q, cu_seqlens_k, segment_keyset, n_heads
    )

    offs_m, offs_d, m_mask, d_mask, q_rows = _block_rows(q_first, q_begin, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    slots = tl.arange(0, TOP)
    q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(DOT)

    wanted = tl.minimum(top_k, n_k)
    best = tl.where(slots[None, :] < wanted, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, TOP], dtype=tl.float32)
    best_key = tl.full([BLOCK_M, TOP], -1, dtype=tl.int32)
    ties = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, n_k, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _logits(q, K, b, h, k_begin, n_k, offs_n, offs_d, d_mask, stride_kb, stride_kt, stride_kh, scale, DOT)
        best, best_key, ties = _merge_tile(
            tl.where(offs_n[None, :] < n_k, s, float("-inf")), offs_n, best, best_key, ties, TOP
        )
    threshold = tl.min(best, axis=1)

    kept = best_key >= 0
    row_max = tl.max(tl.where(kept, best, float("-inf")), axis=1)
    p = tl.where(kept, tl.exp(best - tl.where(row_max == float("-inf"), 0.0, row_max)[:, None]), 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(TOP):
        key = _slot(best_key, slots, j)
        v = _load_rows(
            V, b, h, (k_begin + key).to(tl.int64), offs_d, stride_vb, stride_vt, stride_vh, m_mask & (key >= 0), d_mask
        )
        acc += _slot(p, slots, j)[:, None] * v.to(tl.float32)
    out, lse = _normalised(acc, row_max, tl.sum(p, axis=1), False)

    overflow = (ties > 0) & m_mask
    if tl.max(overflow.to(tl.int32), axis=0) > 0:
        acc, row_max, row_sum = _attend(
            q,
            K,
            V,
            b,
            h,
            k_begin,
            n_k,
            offs_m,
            n_q,
            0,
            n_k,
            tl.where(overflow, threshold, float("inf")),
            offs_d,
            d_mask,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            scale,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            0,
            True,
            False,
            DOT,
        )
        tied_out, tied_lse = _normalised(acc, row_max, row_sum, False)
        out = tl.where(overflow[:, None], tied_out, out)
        lse = tl.where(overflow, tied_lse, lse)

    stat_rows = (b * n_heads + h) * total_q + q_rows
    tl.store(LSE + stat_rows, lse, mask=m_mask)
    _store_rows(O, out, b, h, q_rows, offs_d, stride_ob, stride_ot, stride_oh, m_mask, d_mask)
    record = stat_rows * (TOP + 2)
    tl.store(selection + record[:, None] + slots[None, :], tl.where(kept, k_begin + best_key, -1), mask=m_mask[:, None])
    tl.store(selection + record + TOP, ties, mask=m_mask)
    tl.store(selection + record + TOP + 1, threshold.to(tl.int32, bitcast=True), mask=m_mask)


@triton.jit
def segment_topk_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    TIED_THRESHOLD,
    DQ,
    SELECTED_P,
    SELECTED_DS,
    selection,
    cu_seqlens_q,
    cu_seqlens_k,
    segment_keyset,
    block_segment,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOP: tl.constexpr,
    DOT: tl.constexpr,
):
    """dQ of one query block from its saved selection: per kept key, the weight and dS of
    each row from the gathered key and value rows (O(k * D) per row); the weights and dS
    are saved for the dK/dV kernel. Rows with ties beyond the list (``TIED_THRESHOLD``
    finite) take the threshold pass over the keys instead, over the forward's key tiles
    (BLOCK_N rows)."""
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(
        block_segment, block_start, cu_seqlens_q, cu_seqlens_k, segment_keyset, n_heads
    )

    offs_m, offs_d, m_mask, d_mask, q_rows = _block_rows(q_first, q_begin, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask).to(tl.float32)
    do = _load_rows(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, m_mask, d_mask).to(tl.float32)
    stat_rows = (b * n_heads + h) * total_q + q_rows
    lse = tl.load(LSE + stat_rows, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + stat_rows, mask=m_mask, other=0.0)
    tied = tl.load(TIED_THRESHOLD + stat_rows, mask=m_mask, other=float("inf"))
    overflow = tied < float("inf")
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(TOP):
        key = tl.load(selection + stat_rows * (TOP + 2) + j, mask=m_mask, other=-1)
        used = (key >= 0) & ~overflow
        k = _load_rows(K, b, h, key.to(tl.int64), offs_d, stride_kb, stride_kt, stride_kh, used, d_mask).to(tl.float32)
        v = _load_rows(V, b, h, key.to(tl.int64), offs_d, stride_vb, stride_vt, stride_vh, used, d_mask).to(tl.float32)
        p = tl.where(used, tl.exp(tl.sum(q * k, axis=1) * scale - tl.where(used, lse, 0.0)), 0.0)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dq += ds[:, None] * k
        tl.store(SELECTED_P + stat_rows * TOP + j, p, mask=m_mask)
        tl.store(SELECTED_DS + stat_rows * TOP + j, ds, mask=m_mask)
    if tl.max(overflow.to(tl.int32), axis=0) > 0:
        dq += _dq_over_keys(
            q.to(DOT),
            do.to(DOT),
            lse,
            delta,
            tied,
            K,
            V,
            b,
            h,
            k_begin,
            n_k,
            offs_m,
            n_q,
            0,
            n_k,
            offs_d,
            d_mask,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            scale,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            0,
            True,
            False,
            DOT,
        )
    _store_rows(DQ, dq * scale, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)


@triton.jit
def _tied_rows(tied_prefix, cu_seqlens_q, keyset_segments, first, last, batch_head, total_q):
    """The query rows with ties beyond their list (``tied_prefix``: their running count per
    (batch, head)) in the segments ``keyset_segments[first:last]``."""
    prefix = tied_prefix + batch_head * (total_q + 1)
    count = first * 0
    for i in range(first, last):
        segment = tl.load(keyset_segments + i)
        count += tl.load(prefix + tl.load(cu_seqlens_q + segment + 1)) - tl.load(
            prefix + tl.load(cu_seqlens_q + segment)
        )
    return count


@triton.jit
def segment_topk_bwd_tied_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    TIED_THRESHOLD,
    DK_TIED,
    DV_TIED,
    tied_prefix,
    cu_seqlens_q,
    cu_seqlens_k,
    keyset_segments,
    cu_keyset_segments,
    block_keyset,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """dK / scale and dV (float32, laid out as K and V) of BLOCK_N keys (one of the
    BLOCK_M // BLOCK_N parts of a key block of BLOCK_M rows) from the query rows with ties
    beyond their list (``tied_prefix``, ``TIED_THRESHOLD`` finite): the threshold pass over
    these keys for each segment that reads their key set and has such rows, in query tiles
    of BLOCK_M rows (the forward's query blocks by its key tiles). Written only where there
    are such rows; the programs of other blocks end after reading ``tied_prefix``."""
    b, h, k_first, k_begin, n_k, first, last = _key_block_context(
        block_keyset, block_start, cu_seqlens_k, cu_keyset_segments, n_heads, BLOCK_M // BLOCK_N, BLOCK_N
    )

    if _tied_rows(tied_prefix, cu_seqlens_q, keyset_segments, first, last, b * n_heads + h, total_q) > 0:
        offs_n, offs_d, n_mask, d_mask, k_rows = _block_rows(k_first, k_begin, n_k, HEAD_DIM, BLOCK_N, BLOCK_D)
        dk, dv = _dkdv_over_segments(
            Q,
            K,
            V,
            DO,
            LSE,
            DELTA,
            TIED_THRESHOLD,
            tied_prefix,
            cu_seqlens_q,
            keyset_segments,
            b,
            h,
            first,
            last,
            k_first,
            k_begin,
            n_k,
            offs_n,
            offs_d,
            n_mask,
            d_mask,
            k_rows,
            stride_qb,
            stride_qt,
            stride_qh,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_vb,
            stride_vt,
            stride_vh,
            stride_dob,
            stride_dot,
            stride_doh,
            n_heads,
            total_q,
            scale,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            0,
            True,
            False,
            DOT,
        )
        _store_rows(DK_TIED, dk, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
        _store_rows(DV_TIED, dv, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)


@triton.jit
def segment_topk_bwd_dkdv_kernel(
    Q,
    DO,
    DK,
    DV,
    DK_TIED,
    DV_TIED,
    SELECTED_P,
    SELECTED_DS,
    selection,
    entry_order,
    entry_start,
    tied_prefix,
    cu_seqlens_q,
    cu_seqlens_k,
    keyset_segments,
    cu_keyset_segments,
    block_keyset,
    block_start,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    n_heads,
    total_q,
    total_k,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TOP: tl.constexpr,
    DOT: tl.constexpr,
):
    """dK and dV of one key block from the selection entries that name its keys
    (``entry_order``: each (batch, head)'s entries ``row * TOP + slot`` sorted by key row;
    ``entry_start``: where each key row's entries begin): BLOCK_M entries at a time, their
    weights and dS spread over the block's keys by a one-hot product with the gathered
    dO and Q rows (the entries of every segment that reads the key set). Where a segment
    reading the key set has query rows with ties beyond their list (``tied_prefix``), the
    block adds those rows' sums from :func:`segment_topk_bwd_tied_kernel` (``DK_TIED``,
    ``DV_TIED``)."""
    b, h, k_first, k_begin, n_k, first, last = _key_block_context(
        block_keyset, block_start, cu_seqlens_k, cu_keyset_segments, n_heads, 1, BLOCK_N
    )

    offs_n, offs_d, n_mask, d_mask, k_rows = _block_rows(k_first, k_begin, n_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    batch_head = b * n_heads + h
    entries = batch_head * total_q * TOP
    starts = entry_start + batch_head * (total_k + 1) + k_begin
    first_entry = tl.load(starts + k_first)
    last_entry = tl.load(starts + tl.minimum(k_first + BLOCK_N, n_k))
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(first_entry, last_entry, BLOCK_M):
        offs_e = start + tl.arange(0, BLOCK_M)
        e_mask = offs_e < last_entry
        entry = tl.load(entry_order + entries + offs_e, mask=e_mask, other=0).to(tl.int64)
        q_rows = entry // TOP
        key = tl.load(selection + (batch_head * total_q + q_rows) * (TOP + 2) + entry % TOP, mask=e_mask, other=-1)
        hit = (k_rows[:, None] == key[None, :]) & e_mask[None, :]
        p = tl.load(SELECTED_P + entries + entry, mask=e_mask, other=0.0)
        ds = tl.load(SELECTED_DS + entries + entry, mask=e_mask, other=0.0)
        do = _load_rows(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, e_mask, d_mask).to(DOT)
        q = _load_rows(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, e_mask, d_mask).to(DOT)
        dv = tl.dot(tl.where(hit, p[None, :], 0.0).to(DOT), do, dv)
        dk = tl.dot(tl.where(hit, ds[None, :], 0.0).to(DOT), q, dk)
    if _tied_rows(tied_prefix, cu_seqlens_q, keyset_segments, first, last, batch_head, total_q) > 0:
        dk += _load_rows(DK_TIED, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
        dv += _load_rows(DV_TIED, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)
    _store_rows(DK, dk * scale, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
    _store_rows(DV, dv, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(
                f"segment attention: {name} must be (B, T, H, D) with a contiguous last dim, got {tuple(t.shape)}"
            )
    if q.shape[3] != k.shape[3] or k.shape != v.shape:
        raise ValueError(f"segment attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.shape[3] > 128:
        raise ValueError(f"segment attention: head dims up to 128 are supported, got {q.shape[3]}")


def launch_arguments(kind: str, head_dim: int, block: int, dtype: torch.dtype) -> dict:
    """The compile-time arguments of kernel ``kind`` over blocks of ``block`` rows: the
    block on its own side, the inner tile on the other, warps and DOT."""
    config = launch_config(kind, head_dim, block, dtype)
    inner = config.pop("INNER")
    sides = {"BLOCK_M": inner, "BLOCK_N": block} if kind == "bwd_dkdv" else {"BLOCK_M": block, "BLOCK_N": inner}
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": dot_width(head_dim),
        "DOT": dot_dtype(dtype, bounded=True),
        **sides,
        **config,
    }


def topk_launch_arguments(kind: str, head_dim: int, block: int, dtype: torch.dtype) -> dict:
    """:func:`launch_arguments` for the top-k kernels ('fwd', 'bwd_dq', 'bwd_dkdv', and 'tied'
    for :func:`segment_topk_bwd_tied_kernel`): the forward, dQ and the tied rows' dK/dV
    take key tiles of TOPK_KEYS rows (at most the block) and query tiles of ``block`` rows
    (the query blocks), so that the forward's logits and the backward's
    threshold passes over them are the same products (:func:`_logits`) of the same tiles."""
    arguments = launch_arguments("bwd_dkdv" if kind == "tied" else kind, head_dim, block, dtype)
    if kind != "bwd_dkdv":
        arguments["BLOCK_N"] = min(TOPK_KEYS, block)
    if kind == "tied":
        arguments["BLOCK_M"] = block
    return arguments


def _backward_inputs(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    """(contiguous dO, delta = rowsum(dO * O) ``(B, H, Tq)`` float32, the strides of q, k,
    v and dO) for the backward kernels."""
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    strides = tuple(s for t in (q, k, v, grad_out) for s in t.stride()[:3])
    return grad_out, delta, strides


def segment_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    scale: float,
    block: int,
    window: int = 0,
    sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over packed segments.

    Args:
        q: ``(B, Tq, H, D)``; k, v: ``(B, Tk, H, D)``; D <= 128.
        cu_seqlens_q: ``(S + 1,)`` int32 segment offsets; cu_seqlens_k: ``(S_k + 1,)`` int32
        key-set offsets; segment_keyset: ``(S,)`` int32, the key set each segment reads
        (read in place: several segments may read one key set).
        block_segment, block_start: ``(n_blocks,)`` int32 query-block table (``block`` rows each).
        scale: logit scale; block: rows per block (a power of two >= 16);
        window: local window (0: none);
        sigmoid: sigmoid weights instead of softmax.

    Returns:
        out ``(B, Tq, H, D)`` in q's dtype, lse ``(B, H, Tq)`` float32 (unused for sigmoid).
    """
    _check(q, k, v)
    batch, total_q, heads, head_dim = q.shape
    out = new_output(q, q.shape, q.dtype)
    lse = new_output(q, (batch, heads, total_q), torch.float32)
    grid = (block_segment.shape[0], batch * heads)
    if grid[0]:
        segment_attention_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            segment_keyset,
            block_segment,
            block_start,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            heads,
            total_q,
            scale,
            WINDOW=window,
            SIGMOID=sigmoid,
            **launch_arguments("fwd", head_dim, block, q.dtype),
        )
    return out, lse


def segment_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    keyset_segments: torch.Tensor,
    cu_keyset_segments: torch.Tensor,
    q_block_segment: torch.Tensor,
    q_block_start: torch.Tensor,
    k_block_keyset: torch.Tensor,
    k_block_start: torch.Tensor,
    scale: float,
    block: int,
    window: int = 0,
    sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`segment_attention_fwd`: (dq, dk, dv) in the inputs' dtypes.

    ``keyset_segments`` lists the segments grouped by key set, key set j's from
    ``cu_keyset_segments[j]`` (int32); ``k_block_keyset``/``k_block_start`` list the key
    blocks of the key sets (``block`` rows each).
    """
    _check(q, k, v)
    batch, total_q, heads, head_dim = q.shape
    grad_out, delta, strides = _backward_inputs(grad_out, q, k, v, out)
    dq, dk, dv = new_output(q, q.shape, q.dtype), new_output(k, k.shape, k.dtype), new_output(v, v.shape, v.dtype)
    flags = dict(WINDOW=window, SIGMOID=sigmoid)
    if k_block_keyset.shape[0]:
        segment_attention_bwd_dkdv_kernel[(k_block_keyset.shape[0], batch * heads)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dk,
            dv,
            cu_seqlens_q,
            cu_seqlens_k,
            keyset_segments,
            cu_keyset_segments,
            k_block_keyset,
            k_block_start,
            *strides,
            heads,
            total_q,
            scale,
            **flags,
            **launch_arguments("bwd_dkdv", head_dim, block, q.dtype),
        )
    if q_block_segment.shape[0]:
        segment_attention_bwd_dq_kernel[(q_block_segment.shape[0], batch * heads)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dq,
            cu_seqlens_q,
            cu_seqlens_k,
            segment_keyset,
            q_block_segment,
            q_block_start,
            *strides,
            heads,
            total_q,
            scale,
            **flags,
            **launch_arguments("bwd_dq", head_dim, block, q.dtype),
        )
    return dq, dk, dv


def top_slots(top_k: int) -> int:
    """Slots of a row's top-k list: top_k rounded up to a power of two."""
    return triton.next_power_of_2(max(1, top_k))


def selection_threshold(selection: torch.Tensor) -> torch.Tensor:
    """The per-row threshold ``(B, H, Tq)`` float32 (the k-th largest logit; ``+inf`` without
    keys) of a selection record of :func:`segment_topk_attention_fwd`."""
    return selection[..., -1].contiguous().view(torch.float32)


def segment_topk_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    block_segment: torch.Tensor,
    block_start: torch.Tensor,
    scale: float,
    block: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k attention over packed segments: each query attends to the keys of its segment
    whose logit is ``>=`` its k-th largest (k = min(top_k, M); ties kept), in one pass over
    the keys.

    Args: as :func:`segment_attention_fwd`, with ``top_k >= 1``.

    Returns:
        out ``(B, Tq, H, D)``, lse ``(B, H, Tq)`` float32, and the selection record
        ``(B, H, Tq, TOP + 2)`` int32 (TOP = :func:`top_slots`): the packed key rows of the
        row's k largest logits (-1 in unused slots), the number of further keys tied with
        the k-th largest (the backward pass then takes the threshold pass for that row),
        and the threshold's float32 bits (:func:`selection_threshold`).
    """
    _check(q, k, v)
    batch, total_q, heads, head_dim = q.shape
    top = top_slots(top_k)
    out = new_output(q, q.shape, q.dtype)
    lse = new_output(q, (batch, heads, total_q), torch.float32)
    selection = torch.empty(batch, heads, total_q, top + 2, dtype=torch.int32, device=q.device)
    if block_segment.shape[0]:
        segment_topk_fwd_kernel[(block_segment.shape[0], batch * heads)](
            q,
            k,
            v,
            out,
            lse,
            selection,
            cu_seqlens_q,
            cu_seqlens_k,
            segment_keyset,
            block_segment,
            block_start,
            *(s for t in (q, k, v, out) for s in t.stride()[:3]),
            heads,
            total_q,
            scale,
            top_k,
            TOP=top,
            **topk_launch_arguments("fwd", head_dim, block, q.dtype),
        )
    return out, lse, selection


def segment_topk_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    segment_keyset: torch.Tensor,
    keyset_segments: torch.Tensor,
    cu_keyset_segments: torch.Tensor,
    q_block_segment: torch.Tensor,
    q_block_start: torch.Tensor,
    k_block_keyset: torch.Tensor,
    k_block_start: torch.Tensor,
    scale: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`segment_topk_attention_fwd` from its saved selection: (dq, dk, dv);
    the tables as for :func:`segment_attention_bwd`.

    dQ per query block over its kept keys; the tied rows' dK and dV (float32 scratch laid
    out as k and v, written only for key blocks that such rows read); then each (batch,
    head)'s selection entries sorted by key row (a stable sort of ``Tq * TOP`` entries, so
    the work and memory grow with k, not with the number of keys), from which each key
    block sums its dK and dV.
    """
    _check(q, k, v)
    batch, total_q, heads, head_dim = q.shape
    total_k = k.shape[1]
    top = selection.shape[-1] - 2
    if total_q * top >= 2**31:
        raise ValueError(f"segment top-k attention: {total_q} queries x {top} slots do not fit int32 entry numbers")
    grad_out, delta, strides = _backward_inputs(grad_out, q, k, v, out)
    dq, dk, dv = new_output(q, q.shape, q.dtype), new_output(k, k.shape, k.dtype), new_output(v, v.shape, v.dtype)
    tied = selection[..., top] > 0
    tied_threshold = torch.where(tied, selection_threshold(selection), float("inf")).contiguous()
    selected_p = torch.empty(batch, heads, total_q, top, dtype=torch.float32, device=q.device)
    selected_ds = torch.empty_like(selected_p)
    if q_block_segment.shape[0]:
        segment_topk_bwd_dq_kernel[(q_block_segment.shape[0], batch * heads)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            tied_threshold,
            dq,
            selected_p,
            selected_ds,
            selection,
            cu_seqlens_q,
            cu_seqlens_k,
            segment_keyset,
            q_block_segment,
            q_block_start,
            *strides,
            heads,
            total_q,
            scale,
            TOP=top,
            **topk_launch_arguments("bwd_dq", head_dim, block, q.dtype),
        )
    dk_tied, dv_tied = torch.empty_like(k, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)
    tied_prefix = torch.nn.functional.pad(
        tied.reshape(batch * heads, total_q).to(torch.int32).cumsum(1, dtype=torch.int32), (1, 0)
    )
    tied_arguments = topk_launch_arguments("tied", head_dim, block, q.dtype)
    if k_block_keyset.shape[0]:
        segment_topk_bwd_tied_kernel[(k_block_keyset.shape[0] * (block // tied_arguments["BLOCK_N"]), batch * heads)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            tied_threshold,
            dk_tied,
            dv_tied,
            tied_prefix,
            cu_seqlens_q,
            cu_seqlens_k,
            keyset_segments,
            cu_keyset_segments,
            k_block_keyset,
            k_block_start,
            *strides,
            heads,
            total_q,
            scale,
            **tied_arguments,
        )
    keys = selection[..., :top].reshape(batch * heads, total_q * top)
    sorted_keys, entry_order = torch.sort(torch.where(keys < 0, total_k, keys), dim=1, stable=True)
    rows = torch.arange(total_k + 1, dtype=sorted_keys.dtype, device=q.device).expand(batch * heads, -1).contiguous()
    entry_start = torch.searchsorted(sorted_keys, rows).to(torch.int32)
    if k_block_keyset.shape[0]:
        segment_topk_bwd_dkdv_kernel[(k_block_keyset.shape[0], batch * heads)](
            q,
            grad_out,
            dk,
            dv,
            dk_tied,
            dv_tied,
            selected_p,
            selected_ds,
            selection,
            entry_order.to(torch.int32),
            entry_start,
            tied_prefix,
            cu_seqlens_q,
            cu_seqlens_k,
            keyset_segments,
            cu_keyset_segments,
            k_block_keyset,
            k_block_start,
            *strides,
            heads,
            total_q,
            total_k,
            scale,
            TOP=top,
            **topk_launch_arguments("bwd_dkdv", head_dim, block, q.dtype),
        )
    return dq, dk, dv
