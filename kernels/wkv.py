"""The RWKV WKV recurrence over packed sequences, forward and backward, parallel over time.

Layout: contiguous ``k, v (B, T, H, D)`` packed sequence after sequence (sequence ``s``
owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``); ``w, u (H, D)``.
Per channel, with ``e_t = exp(clamp(k_t, -10, 10))``, step t outputs

    y_t = (a_t + exp(u) e_t v_t) / (b_t + exp(u) e_t + eps),
    a_t = sum_{s<t} exp((t-1-s) w) e_s v_s,   b_t = sum_{s<t} exp((t-1-s) w) e_s.

Every sequence is split into ``n_parts`` parts of ``ceil(length / n_parts)`` steps (the last
shorter, trailing ones possibly empty); a program owns one part, one (batch, head) and
``BLOCK_D`` channels. The forward pass runs in two launches: each part's own sums from a
zero state (``wkv_fwd_state_kernel``), then each part takes the sums carried into it (the
earlier parts' sums, decayed to its first step, in one vectorised reduction) and walks its
steps (``wkv_fwd_kernel``). (a, b) are kept scaled by ``exp(-p)``, p a running maximum
exponent (the RWKV-4 kernel's trick), so no exponential overflows at any length. The forward
saves, per step, ``1 / (b_t + exp(u) e_t + eps)`` and ``exp(u) e_t / (...)``. The backward
pass scans in reverse with four running adjoints, split the same way: each part's adjoints
from zero (``wkv_bwd_state_kernel``), then each part takes the later parts' adjoints and
walks its steps (``wkv_bwd_kernel``), writing dk, dv and its share of dw and du (summed by
the launcher). Scratch: O(parts * B * H * D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output

KEY_CLAMP = 10.0
PROGRAMS_WANTED = 2048
"""Programs a launch aims for: about 16 walks per SM of an H100, so that each SM interleaves
many one-step-at-a-time walks and their loads' latencies overlap."""
MAX_PARTS = 64
"""At most this many parts per sequence (each part reads every earlier or later part's sums)."""
MIN_STEPS = 16
"""Parts shorter than this (for sequences of the mean length) are not worth a program."""
CARRY_BLOCK = 16
"""Parts the carry reduction reads at a time."""


@triton.jit
def _part_program(cu_seqlens, n_parts, n_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program (grid: sequence x part, batch x head, channel block) works on: (b, h,
    its channels, their mask, the sequence's first packed row, its part index, the part's
    first and end step within the sequence, the steps per part, the partial-sum slot of its
    first channel for part 0 of its sequence)."""
    sequence = tl.program_id(0) // n_parts
    part = tl.program_id(0) % n_parts
    batch_head = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    begin = tl.load(cu_seqlens + sequence)
    length = tl.load(cu_seqlens + sequence + 1) - begin
    steps = tl.cdiv(length, n_parts)
    start = part * steps
    first_slot = ((sequence * n_parts).to(tl.int64) * tl.num_programs(1) + batch_head) * HEAD_DIM
    return ((batch_head // n_heads).to(tl.int64), (batch_head % n_heads).to(tl.int64), channels, channels < HEAD_DIM,
            begin.to(tl.int64), part, start, tl.minimum(start + steps, length), steps, first_slot)


@triton.jit
def _clamped_key(K, offset, c_mask, CLAMP: tl.constexpr):
    raw = tl.load(K + offset, mask=c_mask, other=0.0).to(tl.float32)
    return raw, tl.minimum(tl.maximum(raw, -CLAMP), CLAMP)


@triton.jit
def _advance(numerator, denominator, exponent, k, v, w):
    """The scaled sums (a, b) = (numerator, denominator) * exp(exponent) one step on: decayed
    by w, plus e^k (v, 1)."""
    decayed = exponent + w
    top = tl.maximum(decayed, k)
    kept = tl.exp(decayed - top)
    fresh = tl.exp(k - top)
    return kept * numerator + fresh * v, kept * denominator + fresh, top


@triton.jit
def wkv_fwd_state_kernel(
    K, V, W, PART_NUMERATOR, PART_DENOMINATOR, PART_EXPONENT, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr,
):
    """A part's own scaled sums over its steps, from zero, at its end."""
    b, h, channels, c_mask, begin, part, start, end, steps, first_slot = _part_program(cu_seqlens, n_parts, n_heads, HEAD_DIM, BLOCK_D)
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    numerator = tl.zeros([BLOCK_D], dtype=tl.float32)
    denominator = tl.zeros([BLOCK_D], dtype=tl.float32)
    exponent = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    offset = b * stride_b + h * stride_h + channels + (begin + start) * stride_t
    for _ in range(start, end):
        _, k = _clamped_key(K, offset, c_mask, CLAMP)
        v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
        numerator, denominator, exponent = _advance(numerator, denominator, exponent, k, v, w)
        offset += stride_t
    slot = first_slot + part * tl.num_programs(1) * HEAD_DIM + channels
    tl.store(PART_NUMERATOR + slot, numerator, mask=c_mask)
    tl.store(PART_DENOMINATOR + slot, denominator, mask=c_mask)
    tl.store(PART_EXPONENT + slot, exponent, mask=c_mask)


@triton.jit
def wkv_fwd_kernel(
    K, V, W, U, Y, INV_DEN, BONUS_SHARE, PART_NUMERATOR, PART_DENOMINATOR, PART_EXPONENT, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads, n_parts, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr, CARRY: tl.constexpr,
):
    """A part's outputs: the sums carried in (each earlier part j's, decayed over the
    ``(part - 1 - j) * steps`` steps between its end and this part's start, combined under
    one running maximum exponent), then the walk over its steps."""
    b, h, channels, c_mask, begin, part, start, end, steps, first_slot = _part_program(cu_seqlens, n_parts, n_heads, HEAD_DIM, BLOCK_D)
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(U + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    numerator = tl.zeros([BLOCK_D], dtype=tl.float32)
    denominator = tl.zeros([BLOCK_D], dtype=tl.float32)
    exponent = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    for first in range(0, part, CARRY):
        earlier = first + tl.arange(0, CARRY)
        e_mask = earlier < part
        at = first_slot + (earlier * tl.num_programs(1) * HEAD_DIM)[:, None] + channels[None, :]
        mask = e_mask[:, None] & c_mask[None, :]
        gap = ((part - 1 - earlier) * steps).to(tl.float32)
        scaled = tl.load(PART_EXPONENT + at, mask=mask, other=float("-inf")) + gap[:, None] * w[None, :]
        top = tl.maximum(exponent, tl.max(scaled, axis=0))
        shift = tl.where(top > float("-inf"), top, 0.0)
        kept = tl.exp(exponent - shift)
        weight = tl.exp(scaled - shift[None, :])
        numerator = kept * numerator + tl.sum(weight * tl.load(PART_NUMERATOR + at, mask=mask, other=0.0), axis=0)
        denominator = kept * denominator + tl.sum(weight * tl.load(PART_DENOMINATOR + at, mask=mask, other=0.0), axis=0)
        exponent = top
    offset = b * stride_b + h * stride_h + channels + (begin + start) * stride_t
    for _ in range(start, end):
        _, k = _clamped_key(K, offset, c_mask, CLAMP)
        v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
        bonus = u + k
        top = tl.maximum(exponent, bonus)
        kept = tl.exp(exponent - top)
        fresh = tl.exp(bonus - top)
        scaled_den = kept * denominator + fresh + eps * tl.exp(-top)
        tl.store(Y + offset, ((kept * numerator + fresh * v) / scaled_den).to(Y.dtype.element_ty), mask=c_mask)
        tl.store(INV_DEN + offset, tl.exp(-top) / scaled_den, mask=c_mask)
        tl.store(BONUS_SHARE + offset, fresh / scaled_den, mask=c_mask)
        numerator, denominator, exponent = _advance(numerator, denominator, exponent, k, v, w)
        offset += stride_t


@triton.jit
def _adjoints(DY, Y, INV_DEN, offset, c_mask):
    """(dy, y, alpha = dy / den, beta = -dy y / den) at ``offset``: the adjoints of a_t and b_t."""
    y = tl.load(Y + offset, mask=c_mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offset, mask=c_mask, other=0.0).to(tl.float32)
    inv_den = tl.load(INV_DEN + offset, mask=c_mask, other=0.0)
    return dy, y, dy * inv_den, -dy * y * inv_den


@triton.jit
def _adjoints_back(sum_alpha, sum_beta, lagged_alpha, lagged_beta, alpha, beta, decay):
    """The four running adjoints one step back, past a step with adjoints (alpha, beta): the
    sums gain the step and decay, the lagged sums gain the sums and decay."""
    lagged_alpha = decay * (lagged_alpha + sum_alpha)
    lagged_beta = decay * (lagged_beta + sum_beta)
    return alpha + decay * sum_alpha, beta + decay * sum_beta, lagged_alpha, lagged_beta


@triton.jit
def wkv_bwd_state_kernel(
    Y, INV_DEN, DY, W, PART_ALPHA, PART_BETA, PART_LAGGED_ALPHA, PART_LAGGED_BETA, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A part's own running adjoints at its first step, from zero at its end: with
    r = s - start, ``sum_s exp(r w) alpha_s`` and ``sum_s r exp(r w) alpha_s`` (and beta's)."""
    b, h, channels, c_mask, begin, part, start, end, steps, first_slot = _part_program(cu_seqlens, n_parts, n_heads, HEAD_DIM, BLOCK_D)
    decay = tl.exp(tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32))
    sum_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    offset = b * stride_b + h * stride_h + channels + (begin + end - 1) * stride_t
    for _ in range(start, end):
        _, _, alpha, beta = _adjoints(DY, Y, INV_DEN, offset, c_mask)
        sum_alpha, sum_beta, lagged_alpha, lagged_beta = _adjoints_back(sum_alpha, sum_beta, lagged_alpha, lagged_beta, alpha, beta, decay)
        offset -= stride_t
    slot = first_slot + part * tl.num_programs(1) * HEAD_DIM + channels
    tl.store(PART_ALPHA + slot, sum_alpha, mask=c_mask)
    tl.store(PART_BETA + slot, sum_beta, mask=c_mask)
    tl.store(PART_LAGGED_ALPHA + slot, lagged_alpha, mask=c_mask)
    tl.store(PART_LAGGED_BETA + slot, lagged_beta, mask=c_mask)


@triton.jit
def _carried_adjoints(SUM, LAGGED, at, mask, gap, w):
    """The later parts' (sum, lagged) adjoints at offsets ``at (CARRY, BLOCK_D)``, each decayed
    over ``gap`` steps between this part's end and its start: (sum of exp(gap w) sum_j,
    sum of exp(gap w) (gap sum_j + lagged_j))."""
    sums = tl.load(SUM + at, mask=mask, other=0.0)
    decayed = tl.exp(gap[:, None] * w[None, :])
    return tl.sum(decayed * sums, axis=0), tl.sum(decayed * (gap[:, None] * sums + tl.load(LAGGED + at, mask=mask, other=0.0)), axis=0)


@triton.jit
def wkv_bwd_kernel(
    K, V, W, Y, INV_DEN, BONUS_SHARE, DY, DK, DV, DW_PARTIAL, DU_PARTIAL,
    PART_ALPHA, PART_BETA, PART_LAGGED_ALPHA, PART_LAGGED_BETA, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads, n_parts,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr, CARRY: tl.constexpr,
):
    """A part's gradients. With alpha_t = dy_t / den_t and beta_t = -dy_t y_t / den_t (the
    adjoints of a_t and b_t), the running sums A_s = sum_{t>s} alpha_t exp((t-1-s) w), B_s
    (the same for beta) and their lag-weighted versions C_s, E_s give dv_s, dk_s and dw; they
    start from the later parts' adjoints (part j's decayed over the
    ``(j - part - 1) * steps`` steps between this part's end and its start)."""
    b, h, channels, c_mask, begin, part, start, end, steps, first_slot = _part_program(cu_seqlens, n_parts, n_heads, HEAD_DIM, BLOCK_D)
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    decay = tl.exp(w)
    sum_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(part + 1, n_parts, CARRY):
        later = first + tl.arange(0, CARRY)
        mask = (later < n_parts)[:, None] & c_mask[None, :]
        at = first_slot + (later * tl.num_programs(1) * HEAD_DIM)[:, None] + channels[None, :]
        gap = ((later - part - 1) * steps).to(tl.float32)
        carried, carried_lagged = _carried_adjoints(PART_ALPHA, PART_LAGGED_ALPHA, at, mask, gap, w)
        sum_alpha += carried
        lagged_alpha += carried_lagged
        carried, carried_lagged = _carried_adjoints(PART_BETA, PART_LAGGED_BETA, at, mask, gap, w)
        sum_beta += carried
        lagged_beta += carried_lagged
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    offset = b * stride_b + h * stride_h + channels + (begin + end - 1) * stride_t
    for _ in range(start, end):
        raw_k, k = _clamped_key(K, offset, c_mask, CLAMP)
        v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
        dy, y, alpha, beta = _adjoints(DY, Y, INV_DEN, offset, c_mask)
        share = tl.load(BONUS_SHARE + offset, mask=c_mask, other=0.0)
        key_weight = tl.exp(k)
        direct = dy * share
        dv = direct + key_weight * sum_alpha
        dk = direct * (v - y) + key_weight * (v * sum_alpha + sum_beta)
        dk = tl.where((raw_k >= -CLAMP) & (raw_k <= CLAMP), dk, 0.0)
        tl.store(DV + offset, dv.to(DV.dtype.element_ty), mask=c_mask)
        tl.store(DK + offset, dk.to(DK.dtype.element_ty), mask=c_mask)
        du += direct * (v - y)
        dw += key_weight * (v * lagged_alpha + lagged_beta)
        sum_alpha, sum_beta, lagged_alpha, lagged_beta = _adjoints_back(sum_alpha, sum_beta, lagged_alpha, lagged_beta, alpha, beta, decay)
        offset -= stride_t
    slot = first_slot + part * tl.num_programs(1) * HEAD_DIM + channels
    tl.store(DW_PARTIAL + slot, dw, mask=c_mask)
    tl.store(DU_PARTIAL + slot, du, mask=c_mask)


def _channel_block(head_dim: int) -> int:
    return min(32, triton.next_power_of_2(head_dim))


def _parts(sequences: int, total: int, batch_heads: int, channel_blocks: int) -> int:
    """Parts per sequence: enough for PROGRAMS_WANTED programs, at most MAX_PARTS, and none
    shorter than MIN_STEPS for sequences of the mean length."""
    by_programs = triton.cdiv(PROGRAMS_WANTED, max(1, sequences * batch_heads * channel_blocks))
    by_length = triton.cdiv(total, max(1, sequences) * MIN_STEPS)
    return max(1, min(MAX_PARTS, by_programs, by_length))


def _layout(k: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
    """(grid, parts per sequence, channel block, scratch shape ``(S * parts, B * H, D)``) of a launch over k."""
    batch, total, heads, head_dim = k.shape
    block = _channel_block(head_dim)
    sequences = cu_seqlens.shape[0] - 1
    n_parts = _parts(sequences, total, batch * heads, triton.cdiv(head_dim, block))
    grid = (sequences * n_parts, batch * heads, triton.cdiv(head_dim, block))
    return grid, n_parts, block, (sequences * n_parts, batch * heads, head_dim)


def wkv_fwd(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WKV at every step of every packed sequence.

    Args:
        k, v: contiguous ``(B, T, H, D)``.
        w, u: ``(H, D)`` log decay (negative) and bonus.
        cu_seqlens: ``(S + 1,)`` int32 sequence offsets.

    Returns:
        y ``(B, T, H, D)`` in v's dtype; and, float32, the inverse denominators and the bonus
        shares ``exp(u) e_t / den_t`` that :func:`wkv_bwd` needs.
    """
    if k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"wkv: k and v must be contiguous (B, T, H, D) of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    y = new_output(v, v.shape, v.dtype)
    inv_den = new_output(v, v.shape, torch.float32)
    share = new_output(v, v.shape, torch.float32)
    grid, n_parts, block, scratch = _layout(k, cu_seqlens)
    parts = [torch.empty(scratch, dtype=torch.float32, device=k.device) for _ in range(3)]
    if grid[0] and y.numel():
        w, common = w.float().contiguous(), dict(HEAD_DIM=k.shape[3], BLOCK_D=block, num_warps=1)
        strides = (k.stride(0), k.stride(1), k.stride(2), k.shape[2], n_parts)
        wkv_fwd_state_kernel[grid](k, v, w, *parts, cu_seqlens, *strides, CLAMP=KEY_CLAMP, **common)
        wkv_fwd_kernel[grid](
            k, v, w, u.float().contiguous(), y, inv_den, share, *parts, cu_seqlens, *strides, eps,
            CLAMP=KEY_CLAMP, CARRY=CARRY_BLOCK, **common,
        )
    return y, inv_den, share


def wkv_bwd(
    grad_y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
    inv_den: torch.Tensor, share: torch.Tensor, cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dk, dv, dw, du) of :func:`wkv_fwd`; dw and du are ``(H, D)`` float32."""
    batch, _, heads, head_dim = k.shape
    grad_y = grad_y.contiguous()
    if not (k.is_contiguous() and v.is_contiguous() and y.is_contiguous()):
        raise ValueError("wkv_bwd: k, v and y must be contiguous")
    dk = new_output(k, k.shape, k.dtype)
    dv = new_output(v, v.shape, v.dtype)
    grid, n_parts, block, scratch = _layout(k, cu_seqlens)
    parts = [torch.empty(scratch, dtype=torch.float32, device=k.device) for _ in range(4)]
    dw_partial = torch.zeros(scratch, dtype=torch.float32, device=k.device)
    du_partial = torch.zeros_like(dw_partial)
    if grid[0] and k.numel():
        w, common = w.float().contiguous(), dict(HEAD_DIM=head_dim, BLOCK_D=block, num_warps=1)
        strides = (k.stride(0), k.stride(1), k.stride(2), heads, n_parts)
        wkv_bwd_state_kernel[grid](y, inv_den, grad_y, w, *parts, cu_seqlens, *strides, **common)
        wkv_bwd_kernel[grid](
            k, v, w, y, inv_den, share, grad_y, dk, dv, dw_partial, du_partial, *parts, cu_seqlens, *strides,
            CLAMP=KEY_CLAMP, CARRY=CARRY_BLOCK, **common,
        )
    fold = lambda partial: partial.view(-1, batch, heads, head_dim).sum(dim=(0, 1))  # noqa: E731
    return dk, dv, fold(dw_partial), fold(du_partial)
