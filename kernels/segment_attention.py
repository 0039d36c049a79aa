"""Attention over packed segments ("varlen"), forward and backward, with optional local
windows, per-row logit thresholds (top-k) and sigmoid instead of softmax.

Layout: queries ``q (B, Tq, H, D)`` packed segment after segment; keys and values
``k, v (B, Tk, H, D)`` packed the same way, one key range per segment; segment ``s`` owns
query rows ``cu_seqlens_q[s] .. cu_seqlens_q[s+1]`` and key rows ``cu_seqlens_k[s] ..
cu_seqlens_k[s+1]``. The last dimension is contiguous. Work is split into query blocks of
``BLOCK_M`` rows (and, for dK/dV, key blocks of ``BLOCK_N``), listed in block tables:
``block_segment[i]`` and ``block_start[i]`` give the segment of block i and its first row
within the segment.

Masks, per segment of N queries and M keys:
- local window ``WINDOW > 0``: key m is visible to query i when
  ``|i - floor(m * N / M)| <= WINDOW // 2``; each query block visits only the key blocks
  that meet its window (and each key block only the query blocks), so work is O(N * W).
- threshold ``USE_THRESHOLD``: key m is visible to query i when its logit is ``>=
  threshold[i]`` (the row's k-th largest logit, from :func:`segment_topk_threshold`).
A query with no visible key gets zeros and ``lse = -inf``.

All arithmetic is in float32: every load is converted right away (bf16 and fp16 inputs
are accepted; outputs are stored in the input dtype, ``lse`` in float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output

def block_rows(head_dim: int, device: torch.device) -> int:
    """Rows per query block and per key block: 16 off a GPU (the interpreter), and on a GPU
    64 for head dims up to 64, 32 above (four float32 tiles of block x head_dim must fit)."""
    if torch.device(device).type != "cuda":
        return 16
    return 64 if head_dim <= 64 else 32


@triton.jit
def _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, n_heads):
    """(batch, head, first row of the block within its segment, the segment's first query
    row and query count, its first key row and key count) of this program."""
    batch_head = tl.program_id(1)
    segment = tl.load(block_segment + tl.program_id(0))
    q_begin = tl.load(cu_seqlens_q + segment)
    k_begin = tl.load(cu_seqlens_k + segment)
    return (
        (batch_head // n_heads).to(tl.int64), (batch_head % n_heads).to(tl.int64), tl.load(block_start + tl.program_id(0)),
        q_begin, tl.load(cu_seqlens_q + segment + 1) - q_begin, k_begin, tl.load(cu_seqlens_k + segment + 1) - k_begin,
    )


@triton.jit
def _load_tile(ptr, b, h, rows, offs_d, stride_b, stride_t, stride_h, row_mask, d_mask):
    """Rows ``rows`` of head h in batch b of a (B, T, H, D) tensor, in float32; zeros outside the masks."""
    return tl.load(ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + offs_d[None, :],
                   mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _key_range(q_first, n_q, n_k, WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The keys ``[low, high)`` that queries ``q_first .. q_first + BLOCK_ROWS - 1`` can see."""
    if WINDOW > 0:
        first = tl.maximum(q_first - WINDOW // 2, 0)
        last = q_first + BLOCK_ROWS - 1 + WINDOW // 2
        low = tl.cdiv(first * n_k, tl.maximum(n_q, 1))
        high = tl.minimum(tl.cdiv((last + 1) * n_k, tl.maximum(n_q, 1)), n_k)
    else:
        low = q_first * 0
        high = n_k
    return low, high


@triton.jit
def _query_range(k_first, n_q, n_k, WINDOW: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The queries ``[low, high)`` that keys ``k_first .. k_first + BLOCK_ROWS - 1`` are visible to."""
    if WINDOW > 0:
        last_key = tl.minimum(k_first + BLOCK_ROWS, n_k) - 1
        low = tl.maximum((k_first * n_q) // tl.maximum(n_k, 1) - WINDOW // 2, 0)
        high = tl.minimum((last_key * n_q) // tl.maximum(n_k, 1) + WINDOW // 2 + 1, n_q)
    else:
        low = k_first * 0
        high = n_q
    return low, high


@triton.jit
def _visible(offs_m, offs_n, n_q, n_k, s, threshold, WINDOW: tl.constexpr, USE_THRESHOLD: tl.constexpr):
    """Which (query, key) pairs of a tile count, beyond the segment bounds."""
    valid = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
    if WINDOW > 0:
        placed = (offs_n * n_q) // tl.maximum(n_k, 1)
        distance = offs_m[:, None] - placed[None, :]
        valid = valid & (distance <= WINDOW // 2) & (distance >= -(WINDOW // 2))
    if USE_THRESHOLD:
        valid = valid & (s >= threshold[:, None])
    return valid


@triton.jit
def segment_attention_fwd_kernel(
    Q, K, V, O, LSE, THRESHOLD,
    cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    n_heads, total_q, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, USE_THRESHOLD: tl.constexpr, SIGMOID: tl.constexpr,
):
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, n_heads)

    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_begin + offs_m).to(tl.int64)
    q = _load_tile(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)
    threshold = tl.zeros([BLOCK_M], dtype=tl.float32)
    lse_rows = (b * n_heads + h) * total_q + q_rows
    if USE_THRESHOLD:
        threshold = tl.load(THRESHOLD + lse_rows, mask=m_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    low, high = _key_range(q_first, n_q, n_k, WINDOW, BLOCK_M)
    for start in range((low // BLOCK_N) * BLOCK_N, high, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_k
        k_rows = (k_begin + offs_n).to(tl.int64)
        k = _load_tile(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
        v = _load_tile(V, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)
        s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        valid = _visible(offs_m, offs_n, n_q, n_k, s, threshold, WINDOW, USE_THRESHOLD)
        if SIGMOID:
            p = tl.where(valid, tl.sigmoid(s), 0.0)
            acc = tl.dot(p, v, acc)
        else:
            s = tl.where(valid, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - shift[:, None])
            rescale = tl.exp(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = tl.dot(p, v, acc * rescale[:, None])
            row_max = new_max
    if SIGMOID:
        out = acc
    else:
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        lse = tl.where(row_sum > 0, row_max + tl.log(tl.where(row_sum > 0, row_sum, 1.0)), float("-inf"))
        tl.store(LSE + lse_rows, lse, mask=m_mask)
    tl.store(O + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _probabilities(s, valid, lse, SIGMOID: tl.constexpr):
    """Attention weights of a tile: softmax from the saved log-sum-exp, or the sigmoid."""
    if SIGMOID:
        p = tl.where(valid, tl.sigmoid(s), 0.0)
    else:
        p = tl.where(valid, tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), 0.0)
    return p


@triton.jit
def segment_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, THRESHOLD, DK, DV,
    cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    n_heads, total_q, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, USE_THRESHOLD: tl.constexpr, SIGMOID: tl.constexpr,
):
    b, h, k_first, q_begin, n_q, k_begin, n_k = _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, n_heads)

    offs_n = k_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n_k
    d_mask = offs_d < HEAD_DIM
    k_rows = (k_begin + offs_n).to(tl.int64)
    k = _load_tile(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
    v = _load_tile(V, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    low, high = _query_range(k_first, n_q, n_k, WINDOW, BLOCK_N)
    for start in range((low // BLOCK_M) * BLOCK_M, high, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_q
        q_rows = (q_begin + offs_m).to(tl.int64)
        q = _load_tile(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)
        do = _load_tile(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, m_mask, d_mask)
        stat_rows = (b * n_heads + h) * total_q + q_rows
        lse = tl.load(LSE + stat_rows, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stat_rows, mask=m_mask, other=0.0)
        threshold = tl.zeros([BLOCK_M], dtype=tl.float32)
        if USE_THRESHOLD:
            threshold = tl.load(THRESHOLD + stat_rows, mask=m_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        valid = _visible(offs_m, offs_n, n_q, n_k, s, threshold, WINDOW, USE_THRESHOLD)
        p = _probabilities(s, valid, lse, SIGMOID)
        dv = tl.dot(tl.trans(p), do, dv)
        dp = tl.dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if SIGMOID:
            ds = dp * p * (1.0 - p)
        else:
            ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds), q, dk)
    tl.store(DK + b * stride_kb + h * stride_kh + k_rows[:, None] * stride_kt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])
    tl.store(DV + b * stride_vb + h * stride_vh + k_rows[:, None] * stride_vt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def segment_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, THRESHOLD, DQ,
    cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    n_heads, total_q, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, USE_THRESHOLD: tl.constexpr, SIGMOID: tl.constexpr,
):
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, n_heads)

    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_begin + offs_m).to(tl.int64)
    q = _load_tile(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)
    do = _load_tile(DO, b, h, q_rows, offs_d, stride_dob, stride_dot, stride_doh, m_mask, d_mask)
    stat_rows = (b * n_heads + h) * total_q + q_rows
    lse = tl.load(LSE + stat_rows, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + stat_rows, mask=m_mask, other=0.0)
    threshold = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_THRESHOLD:
        threshold = tl.load(THRESHOLD + stat_rows, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    low, high = _key_range(q_first, n_q, n_k, WINDOW, BLOCK_M)
    for start in range((low // BLOCK_N) * BLOCK_N, high, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_k
        k_rows = (k_begin + offs_n).to(tl.int64)
        k = _load_tile(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
        v = _load_tile(V, b, h, k_rows, offs_d, stride_vb, stride_vt, stride_vh, n_mask, d_mask)
        s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
        valid = _visible(offs_m, offs_n, n_q, n_k, s, threshold, WINDOW, USE_THRESHOLD)
        p = _probabilities(s, valid, lse, SIGMOID)
        dp = tl.dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if SIGMOID:
            ds = dp * p * (1.0 - p)
        else:
            ds = p * (dp - delta[:, None])
        dq = tl.dot(ds, k, dq)
    tl.store(DQ + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def segment_topk_threshold_kernel(
    Q, K, THRESHOLD,
    cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    n_heads, total_q, scale, top_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per query row, the k-th largest logit over its segment's keys (counted with
    multiplicity, k = min(top_k, M)), found by repeated max passes over the keys: each pass
    takes the largest logit below the previous value and counts how often it occurs, until
    k logits are counted. O(BLOCK_M) state per block, never the row of logits."""
    b, h, q_first, q_begin, n_q, k_begin, n_k = _block_context(block_segment, block_start, cu_seqlens_q, cu_seqlens_k, n_heads)

    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_begin + offs_m).to(tl.int64)
    q = _load_tile(Q, b, h, q_rows, offs_d, stride_qb, stride_qt, stride_qh, m_mask, d_mask)
    wanted = tl.minimum(top_k, n_k)
    threshold = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    counted = tl.zeros([BLOCK_M], dtype=tl.int32)
    for _ in range(0, wanted):
        below = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for start in range(0, n_k, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_k
            k_rows = (k_begin + offs_n).to(tl.int64)
            k = _load_tile(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
            s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
            s = tl.where(n_mask[None, :] & (s < threshold[:, None]), s, float("-inf"))
            below = tl.maximum(below, tl.max(s, axis=1))
        occurrences = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start in range(0, n_k, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_k
            k_rows = (k_begin + offs_n).to(tl.int64)
            k = _load_tile(K, b, h, k_rows, offs_d, stride_kb, stride_kt, stride_kh, n_mask, d_mask)
            s = tl.dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * scale
            hits = n_mask[None, :] & (s == below[:, None])
            occurrences += tl.sum(hits.to(tl.int32), axis=1)
        searching = counted < wanted
        threshold = tl.where(searching, below, threshold)
        counted = tl.where(searching, counted + occurrences, counted)
    tl.store(THRESHOLD + (b * n_heads + h) * total_q + q_rows, threshold, mask=m_mask)


def _head_block(head_dim: int) -> int:
    """The padded head dimension: a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(head_dim))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(f"segment attention: {name} must be (B, T, H, D) with a contiguous last dim, got {tuple(t.shape)}")
    if q.shape[3] != k.shape[3] or k.shape != v.shape:
        raise ValueError(f"segment attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.shape[3] > 128:
        raise ValueError(f"segment attention: head dims up to 128 are supported, got {q.shape[3]}")


def segment_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    block_segment: torch.Tensor, block_start: torch.Tensor,
    scale: float, block: int, window: int = 0, threshold: torch.Tensor | None = None, sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over packed segments.

    Args:
        q: ``(B, Tq, H, D)``; k, v: ``(B, Tk, H, D)``; D <= 128.
        cu_seqlens_q, cu_seqlens_k: ``(S + 1,)`` int32 segment offsets.
        block_segment, block_start: ``(n_blocks,)`` int32 query-block table (``block`` rows each).
        scale: logit scale; block: rows per block (a power of two >= 16);
        window: local window (0: none);
        threshold: ``(B, H, Tq)`` float32 per-row logit threshold, or None;
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
            q, k, v, out, lse, threshold if threshold is not None else lse,
            cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, total_q, scale,
            HEAD_DIM=head_dim, BLOCK_D=_head_block(head_dim), BLOCK_M=block, BLOCK_N=block,
            WINDOW=window, USE_THRESHOLD=threshold is not None, SIGMOID=sigmoid,
        )
    return out, lse


def segment_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    q_block_segment: torch.Tensor, q_block_start: torch.Tensor,
    k_block_segment: torch.Tensor, k_block_start: torch.Tensor,
    scale: float, block: int, window: int = 0, threshold: torch.Tensor | None = None, sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`segment_attention_fwd`: (dq, dk, dv) in the inputs' dtypes.

    ``k_block_segment``/``k_block_start`` list the key blocks (``block`` rows each).
    """
    _check(q, k, v)
    batch, total_q, heads, head_dim = q.shape
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dq = new_output(q, q.shape, q.dtype)
    dk = new_output(k, k.shape, k.dtype)
    dv = new_output(v, v.shape, v.dtype)
    common = dict(
        HEAD_DIM=head_dim, BLOCK_D=_head_block(head_dim), BLOCK_M=block, BLOCK_N=block,
        WINDOW=window, USE_THRESHOLD=threshold is not None, SIGMOID=sigmoid,
    )
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    threshold_arg = threshold if threshold is not None else lse
    if k_block_segment.shape[0]:
        segment_attention_bwd_dkdv_kernel[(k_block_segment.shape[0], batch * heads)](
            q, k, v, grad_out, lse, delta, threshold_arg, dk, dv,
            cu_seqlens_q, cu_seqlens_k, k_block_segment, k_block_start,
            *strides, heads, total_q, scale, **common,
        )
    if q_block_segment.shape[0]:
        segment_attention_bwd_dq_kernel[(q_block_segment.shape[0], batch * heads)](
            q, k, v, grad_out, lse, delta, threshold_arg, dq,
            cu_seqlens_q, cu_seqlens_k, q_block_segment, q_block_start,
            *strides, heads, total_q, scale, **common,
        )
    return dq, dk, dv


def segment_topk_threshold(
    q: torch.Tensor, k: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    block_segment: torch.Tensor, block_start: torch.Tensor,
    scale: float, block: int, top_k: int,
) -> torch.Tensor:
    """Per query row the k-th largest logit of its segment (k = min(top_k, M)): ``(B, H, Tq)``
    float32; ``+inf`` for a row whose segment has no key."""
    _check(q, k, k)
    batch, total_q, heads, head_dim = q.shape
    threshold = new_output(q, (batch, heads, total_q), torch.float32)
    if block_segment.shape[0]:
        segment_topk_threshold_kernel[(block_segment.shape[0], batch * heads)](
            q, k, threshold, cu_seqlens_q, cu_seqlens_k, block_segment, block_start,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            heads, total_q, scale, top_k,
            HEAD_DIM=head_dim, BLOCK_D=_head_block(head_dim), BLOCK_M=block, BLOCK_N=block,
        )
    return threshold
