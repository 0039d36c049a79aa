"""The RWKV WKV recurrence over packed sequences, forward and backward, parallel over time.

Layout: contiguous ``k, v (B, T, H, D)`` packed sequence after sequence (sequence ``s``
owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``); ``w, u (H, D)``.
Per channel, with ``e_t = exp(clamp(k_t, -10, 10))``, step t outputs

    y_t = (a_t + exp(u) e_t v_t) / (b_t + exp(u) e_t + eps),
    a_t = sum_{s<t} exp((t-1-s) w) e_s v_s,   b_t = sum_{s<t} exp((t-1-s) w) e_s.

Every sequence is split into ``n_parts`` parts of ``ceil(length / n_parts)`` steps (the last
shorter, trailing ones possibly empty); a program owns one part, one (batch, head) and
``BLOCK_D`` channels, one channel per thread. The forward pass runs in two launches: each
part's own sums, one vectorised reduction over its steps (``wkv_fwd_state_kernel``: no step
waits on the one before), then each part takes the sums carried into it (the earlier parts'
sums, decayed to its first step, in one vectorised reduction) and walks its steps
(``wkv_fwd_kernel``, loading ``TILE`` steps at a time, so that the walk waits on a load once
a tile, not at every step). (a, b) are kept scaled by ``exp(-p)``, p a running maximum
exponent (the RWKV-4 kernel's trick), so no exponential overflows at any length.

The forward saves only the parts' own sums, ``(3, S * parts, B * H, D)`` float32; the backward
recomputes from them what it needs at each step. It scans in reverse with four running
adjoints, split the same way: each part's adjoints (``wkv_bwd_state_kernel``, walking its
steps forward from the sums carried in, ``TILE`` steps loaded at a time), then each part
takes the later parts' adjoints and walks its steps in reverse (``wkv_bwd_kernel``), in
tiles of ``TILE`` steps: the sums at a tile's first step are the carried-in sums advanced
over the part's steps before it, and at each of its steps the tile's advanced over the
tile's steps before it (from the tile's keys and values, loaded once), in vectorised
reductions under the running maximum. It writes dk, dv and its share of dw and du (summed by
the launcher). Scratch and saved state: O(parts * B * H * D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output
from .constants import KEY_CLAMP
from .tiles import tile_row

PROGRAMS_WANTED = 2048
"""Programs a launch aims for: about 16 walks per SM of an H100, so that each SM interleaves
many one-step-at-a-time walks and their loads' latencies overlap."""
MAX_PARTS = 64
"""At most this many parts per sequence (each part reads every earlier or later part's sums)."""
MIN_STEPS = 16
"""Parts shorter than this (for sequences of the mean length) are not worth a program."""
CARRY_BLOCK = 16
"""Parts, or steps, the carry reductions read at a time."""
TILE = 16
"""Steps the walks load at a time (one load wait per tile, then the tile's steps from
registers), and per tile of the backward's reverse walk: a step's sums are recomputed from its
tile's first step (at most TILE - 1 steps, from the tile's keys and values), a tile's from its
part's first step."""


@triton.jit
def _part_program(
    cu_seqlens, n_parts, n_heads, stride_b, stride_t, stride_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """What a program (grid: sequence x part, batch x head, channel block) works on: (h, its
    channels, their mask, its part index, the part's first and end step within the sequence,
    the steps per part, the partial-sum slot of its first channel for part 0 of its sequence,
    the offsets of its channels at the part's first step in k, v and their gradients). The
    channels are hinted as not aligned, so that loads are not vectorised along them: a
    ``(rows, BLOCK_D)`` tile is laid out one channel per thread, its reductions over rows stay
    within a thread, and each channel's running sums take one register (not one per channel
    of a thread's vector)."""
    sequence = tl.program_id(0) // n_parts
    part = tl.program_id(0) % n_parts
    batch_head = tl.program_id(1)
    channels = tl.multiple_of(tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D), 1)
    begin = tl.load(cu_seqlens + sequence)
    length = tl.load(cu_seqlens + sequence + 1) - begin
    steps = tl.cdiv(length, n_parts)
    start = part * steps
    first_slot = ((sequence * n_parts).to(tl.int64) * tl.num_programs(1) + batch_head) * HEAD_DIM
    h = (batch_head % n_heads).to(tl.int64)
    offset = (batch_head // n_heads).to(tl.int64) * stride_b + h * stride_h + channels
    return (
        h,
        channels,
        channels < HEAD_DIM,
        part,
        start,
        tl.minimum(start + steps, length),
        steps,
        first_slot,
        offset + (begin.to(tl.int64) + start) * stride_t,
    )


@triton.jit
def _clamped_key(K, offset, mask, CLAMP: tl.constexpr):
    raw = tl.load(K + offset, mask=mask, other=0.0).to(tl.float32)
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
def _absorb(numerator, denominator, exponent, scaled, numerators, denominators):
    """The scaled sums plus rows ``(ROWS, BLOCK_D)`` of sums ``(numerators, denominators) *
    exp(scaled)`` (masked rows at -inf), under one running maximum exponent."""
    top = tl.maximum(exponent, tl.max(scaled, axis=0))
    shift = tl.where(top > float("-inf"), top, 0.0)
    kept = tl.exp(exponent - shift)
    weight = tl.exp(scaled - shift[None, :])
    return (
        kept * numerator + tl.sum(weight * numerators, axis=0),
        kept * denominator + tl.sum(weight * denominators, axis=0),
        top,
    )


@triton.jit
def _carried_in(
    PART_STATE, part_stride, first_slot, part, steps, w, channels, c_mask, HEAD_DIM: tl.constexpr, CARRY: tl.constexpr
):
    """The scaled sums carried into a part: each earlier part j's own sums (``PART_STATE``:
    numerators, denominators and exponents, ``part_stride`` apart), decayed over the
    ``(part - 1 - j) * steps`` steps between its end and this part's start."""
    numerator = tl.zeros(w.shape, dtype=tl.float32)
    denominator = tl.zeros(w.shape, dtype=tl.float32)
    exponent = tl.full(w.shape, float("-inf"), dtype=tl.float32)
    for first in range(0, part, CARRY):
        earlier = first + tl.arange(0, CARRY)
        at = first_slot + (earlier * tl.num_programs(1) * HEAD_DIM)[:, None] + channels[None, :]
        mask = (earlier < part)[:, None] & c_mask[None, :]
        gap = ((part - 1 - earlier) * steps).to(tl.float32)
        scaled = tl.load(PART_STATE + 2 * part_stride + at, mask=mask, other=float("-inf")) + gap[:, None] * w[None, :]
        numerator, denominator, exponent = _absorb(
            numerator,
            denominator,
            exponent,
            scaled,
            tl.load(PART_STATE + at, mask=mask, other=0.0),
            tl.load(PART_STATE + part_stride + at, mask=mask, other=0.0),
        )
    return numerator, denominator, exponent


@triton.jit
def _absorb_steps(numerator, denominator, exponent, k, v, rows, mask, n, w):
    """The scaled sums plus steps ``rows`` (clamped keys and values ``(ROWS, BLOCK_D)``, where
    ``mask``) of a run of n steps, each step r's ``e^k (v, 1)`` decayed over the ``n - 1 - r``
    steps after it; ``exponent`` already decayed over the n steps."""
    scaled = tl.where(mask, ((n - 1 - rows).to(tl.float32))[:, None] * w[None, :] + k, float("-inf"))
    return _absorb(numerator, denominator, exponent, scaled, v, tl.where(mask, 1.0, 0.0))


@triton.jit
def _steps(K, V, offset, first, n, c_mask, stride_t, CLAMP: tl.constexpr, ROWS: tl.constexpr):
    """Steps ``rows = first .. first + ROWS - 1`` of a run of n steps from the channels' offset
    ``offset``: (rows, their mask and offsets ``(ROWS, BLOCK_D)``, clamped keys and values in
    float32, zeros past the run), in one load each."""
    rows = first + tl.arange(0, ROWS)
    mask = (rows < n)[:, None] & c_mask[None, :]
    at = offset[None, :] + (tl.cast(rows, tl.int64) * stride_t)[:, None]
    _, k = _clamped_key(K, at, mask, CLAMP)
    return rows, mask, at, k, tl.load(V + at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _skip(
    K, V, offset, n, numerator, denominator, exponent, w, c_mask, stride_t, CLAMP: tl.constexpr, ROWS: tl.constexpr
):
    """The scaled sums at a step (its channels' offset ``offset``) advanced over that step and
    the ``n - 1`` after it: decayed over n steps, plus each step r's ``e^k (v, 1)`` decayed over
    the ``n - 1 - r`` steps after it, read ``ROWS`` steps at a time."""
    exponent = exponent + n * w
    for first in range(0, n, ROWS):
        rows, mask, _, k, v = _steps(K, V, offset, first, n, c_mask, stride_t, CLAMP, ROWS)
        numerator, denominator, exponent = _absorb_steps(numerator, denominator, exponent, k, v, rows, mask, n, w)
    return numerator, denominator, exponent


@triton.jit
def _output(numerator, denominator, exponent, k, v, u, eps):
    """Step t's output y_t, ``1 / den_t`` and bonus share ``exp(u) e_t / den_t`` from the scaled
    sums before it."""
    bonus = u + k
    top = tl.maximum(exponent, bonus)
    kept = tl.exp(exponent - top)
    fresh = tl.exp(bonus - top)
    scaled_den = kept * denominator + fresh + eps * tl.exp(-top)
    return (kept * numerator + fresh * v) / scaled_den, tl.exp(-top) / scaled_den, fresh / scaled_den


@triton.jit
def wkv_fwd_state_kernel(
    K,
    V,
    W,
    PART_STATE,
    cu_seqlens,
    stride_b,
    stride_t,
    stride_h,
    n_heads,
    n_parts,
    part_stride,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr,
    CARRY: tl.constexpr,
):
    """A part's own scaled sums over its steps, from zero, at its end: one vectorised
    reduction over its steps, CARRY at a time (no step waits on the one before)."""
    h, channels, c_mask, part, start, end, steps, first_slot, part_offset = _part_program(
        cu_seqlens, n_parts, n_heads, stride_b, stride_t, stride_h, HEAD_DIM, BLOCK_D
    )
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    numerator, denominator, exponent = _skip(
        K,
        V,
        part_offset,
        end - start,
        tl.zeros([BLOCK_D], dtype=tl.float32),
        tl.zeros([BLOCK_D], dtype=tl.float32),
        tl.full([BLOCK_D], float("-inf"), dtype=tl.float32),
        w,
        c_mask,
        stride_t,
        CLAMP,
        CARRY,
    )
    slot = first_slot + part * tl.num_programs(1) * HEAD_DIM + channels
    tl.store(PART_STATE + slot, numerator, mask=c_mask)
    tl.store(PART_STATE + part_stride + slot, denominator, mask=c_mask)
    tl.store(PART_STATE + 2 * part_stride + slot, exponent, mask=c_mask)


@triton.jit
def wkv_fwd_kernel(
    K,
    V,
    W,
    U,
    Y,
    PART_STATE,
    cu_seqlens,
    stride_b,
    stride_t,
    stride_h,
    n_heads,
    n_parts,
    part_stride,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr,
    CARRY: tl.constexpr,
    TILE: tl.constexpr,
):
    """A part's outputs: the sums carried in, then the walk over its steps, TILE steps loaded
    at a time (one load wait per tile, not per step)."""
    h, channels, c_mask, part, start, end, steps, first_slot, part_offset = _part_program(
        cu_seqlens, n_parts, n_heads, stride_b, stride_t, stride_h, HEAD_DIM, BLOCK_D
    )
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(U + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    numerator, denominator, exponent = _carried_in(
        PART_STATE, part_stride, first_slot, part, steps, w, channels, c_mask, HEAD_DIM, CARRY
    )
    for first in range(0, end - start, TILE):
        rows, _, _, tile_k, tile_v = _steps(K, V, part_offset, first, end - start, c_mask, stride_t, CLAMP, TILE)
        for step in range(first, tl.minimum(first + TILE, end - start)):
            k = tile_row(tile_k, rows, step)
            v = tile_row(tile_v, rows, step)
            y = _output(numerator, denominator, exponent, k, v, u, eps)[0]
            tl.store(Y + part_offset + tl.cast(step, tl.int64) * stride_t, y.to(Y.dtype.element_ty), mask=c_mask)
            numerator, denominator, exponent = _advance(numerator, denominator, exponent, k, v, w)


@triton.jit
def _adjoints_back(sum_alpha, sum_beta, lagged_alpha, lagged_beta, alpha, beta, decay):
    """The four running adjoints one step back, past a step with adjoints (alpha, beta): the
    sums gain the step and decay, the lagged sums gain the sums and decay."""
    lagged_alpha = decay * (lagged_alpha + sum_alpha)
    lagged_beta = decay * (lagged_beta + sum_beta)
    return alpha + decay * sum_alpha, beta + decay * sum_beta, lagged_alpha, lagged_beta


@triton.jit
def wkv_bwd_state_kernel(
    K,
    V,
    W,
    U,
    DY,
    PART_STATE,
    PART_ADJOINT,
    cu_seqlens,
    stride_b,
    stride_t,
    stride_h,
    n_heads,
    n_parts,
    part_stride,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr,
    CARRY: tl.constexpr,
    TILE: tl.constexpr,
):
    """A part's own running adjoints at its first step: with r = s - start, alpha_s =
    dy_s / den_s and beta_s = -dy_s y_s / den_s (the adjoints of a_s and b_s, recomputed by
    walking the part's steps forward from the sums carried in), ``sum_s exp(r w) alpha_s``,
    ``sum_s r exp(r w) alpha_s`` and beta's (``PART_ADJOINT``, ``part_stride`` apart)."""
    h, channels, c_mask, part, start, end, steps, first_slot, part_offset = _part_program(
        cu_seqlens, n_parts, n_heads, stride_b, stride_t, stride_h, HEAD_DIM, BLOCK_D
    )
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(U + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    numerator, denominator, exponent = _carried_in(
        PART_STATE, part_stride, first_slot, part, steps, w, channels, c_mask, HEAD_DIM, CARRY
    )
    sum_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, end - start, TILE):
        rows, mask, at, tile_k, tile_v = _steps(K, V, part_offset, first, end - start, c_mask, stride_t, CLAMP, TILE)
        tile_dy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32)
        for step in range(first, tl.minimum(first + TILE, end - start)):
            k = tile_row(tile_k, rows, step)
            v = tile_row(tile_v, rows, step)
            dy = tile_row(tile_dy, rows, step)
            y, inv_den, _ = _output(numerator, denominator, exponent, k, v, u, eps)
            lag = tl.cast(step, tl.float32)
            weight = tl.exp(lag * w)
            sum_alpha += weight * dy * inv_den
            sum_beta -= weight * dy * y * inv_den
            lagged_alpha += lag * weight * dy * inv_den
            lagged_beta -= lag * weight * dy * y * inv_den
            numerator, denominator, exponent = _advance(numerator, denominator, exponent, k, v, w)
    slot = first_slot + part * tl.num_programs(1) * HEAD_DIM + channels
    tl.store(PART_ADJOINT + slot, sum_alpha, mask=c_mask)
    tl.store(PART_ADJOINT + part_stride + slot, sum_beta, mask=c_mask)
    tl.store(PART_ADJOINT + 2 * part_stride + slot, lagged_alpha, mask=c_mask)
    tl.store(PART_ADJOINT + 3 * part_stride + slot, lagged_beta, mask=c_mask)


@triton.jit
def _carried_adjoints(SUM, LAGGED, at, mask, gap, w):
    """The later parts' (sum, lagged) adjoints at offsets ``at (CARRY, BLOCK_D)``, each decayed
    over ``gap`` steps between this part's end and its start: (sum of exp(gap w) sum_j,
    sum of exp(gap w) (gap sum_j + lagged_j))."""
    sums = tl.load(SUM + at, mask=mask, other=0.0)
    decayed = tl.exp(gap[:, None] * w[None, :])
    return tl.sum(decayed * sums, axis=0), tl.sum(
        decayed * (gap[:, None] * sums + tl.load(LAGGED + at, mask=mask, other=0.0)), axis=0
    )


@triton.jit
def wkv_bwd_kernel(
    K,
    V,
    W,
    U,
    DY,
    DK,
    DV,
    DW_PARTIAL,
    DU_PARTIAL,
    PART_STATE,
    PART_ADJOINT,
    cu_seqlens,
    stride_b,
    stride_t,
    stride_h,
    n_heads,
    n_parts,
    part_stride,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr,
    CARRY: tl.constexpr,
    TILE: tl.constexpr,
):
    """A part's gradients. The running sums A_s = sum_{t>s} alpha_t exp((t-1-s) w), B_s (the
    same for beta) and their lag-weighted versions C_s, E_s give dv_s, dk_s and dw; they start
    from the later parts' adjoints (part j's decayed over the ``(j - part - 1) * steps`` steps
    between this part's end and its start). The walk goes back tile by tile: a tile's sums at
    its first step are the carried-in sums advanced over the part's steps before it, a step's
    the tile's advanced over the tile's steps before it (its keys and values loaded once)."""
    h, channels, c_mask, part, start, end, steps, first_slot, part_offset = _part_program(
        cu_seqlens, n_parts, n_heads, stride_b, stride_t, stride_h, HEAD_DIM, BLOCK_D
    )
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(U + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
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
        carried, carried_lagged = _carried_adjoints(PART_ADJOINT, PART_ADJOINT + 2 * part_stride, at, mask, gap, w)
        sum_alpha += carried
        lagged_alpha += carried_lagged
        carried, carried_lagged = _carried_adjoints(
            PART_ADJOINT + part_stride, PART_ADJOINT + 3 * part_stride, at, mask, gap, w
        )
        sum_beta += carried
        lagged_beta += carried_lagged
    carried_numerator, carried_denominator, carried_exponent = _carried_in(
        PART_STATE,
        part_stride,
        first_slot,
        part,
        steps,
        w,
        channels,
        c_mask,
        HEAD_DIM,
        CARRY,
    )
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), TILE)
    for tile in range(0, n_tiles):
        tile_start = (n_tiles - 1 - tile) * TILE
        tile_offset = part_offset + tl.cast(tile_start, tl.int64) * stride_t
        tile_numerator, tile_denominator, tile_exponent = _skip(
            K,
            V,
            part_offset,
            tile_start,
            carried_numerator,
            carried_denominator,
            carried_exponent,
            w,
            c_mask,
            stride_t,
            CLAMP,
            TILE,
        )
        tile_steps = tl.minimum(end - start - tile_start, TILE)
        rows, _, _, tile_k, tile_v = _steps(K, V, tile_offset, 0, tile_steps, c_mask, stride_t, CLAMP, TILE)
        for back in range(0, tile_steps):
            step = tile_steps - 1 - back
            numerator, denominator, exponent = _absorb_steps(
                tile_numerator,
                tile_denominator,
                tile_exponent + step * w,
                tile_k,
                tile_v,
                rows,
                (rows < step)[:, None] & c_mask[None, :],
                step,
                w,
            )
            offset = tile_offset + tl.cast(step, tl.int64) * stride_t
            raw_k, k = _clamped_key(K, offset, c_mask, CLAMP)
            v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offset, mask=c_mask, other=0.0).to(tl.float32)
            y, inv_den, share = _output(numerator, denominator, exponent, k, v, u, eps)
            key_weight = tl.exp(k)
            direct = dy * share
            dv = direct + key_weight * sum_alpha
            dk = direct * (v - y) + key_weight * (v * sum_alpha + sum_beta)
            dk = tl.where((raw_k >= -CLAMP) & (raw_k <= CLAMP), dk, 0.0)
            tl.store(DV + offset, dv.to(DV.dtype.element_ty), mask=c_mask)
            tl.store(DK + offset, dk.to(DK.dtype.element_ty), mask=c_mask)
            du += direct * (v - y)
            dw += key_weight * (v * lagged_alpha + lagged_beta)
            sum_alpha, sum_beta, lagged_alpha, lagged_beta = _adjoints_back(
                sum_alpha,
                sum_beta,
                lagged_alpha,
                lagged_beta,
                dy * inv_den,
                -dy * y * inv_den,
                decay,
            )
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
    """(grid, parts per sequence, channel block, part-sum shape ``(S * parts, B * H, D)``) of a launch over k."""
    batch, total, heads, head_dim = k.shape
    block = _channel_block(head_dim)
    sequences = cu_seqlens.shape[0] - 1
    n_parts = _parts(sequences, total, batch * heads, triton.cdiv(head_dim, block))
    grid = (sequences * n_parts, batch * heads, triton.cdiv(head_dim, block))
    return grid, n_parts, block, (sequences * n_parts, batch * heads, head_dim)


def part_state_shape(k: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
    """The shape ``(3, S * parts, B * H, D)`` of the part sums :func:`wkv_fwd` returns for k."""
    return (3, *_layout(k, cu_seqlens)[3])


def _launch_arguments(k: torch.Tensor, n_parts: int, part_shape: tuple) -> tuple:
    """The strides, heads, parts per sequence and the stride between part-sum tensors."""
    return (k.stride(0), k.stride(1), k.stride(2), k.shape[2], n_parts, part_shape[0] * part_shape[1] * part_shape[2])


def wkv_fwd(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV at every step of every packed sequence.

    Args:
        k, v: contiguous ``(B, T, H, D)``.
        w, u: ``(H, D)`` log decay (negative) and bonus.
        cu_seqlens: ``(S + 1,)`` int32 sequence offsets.

    Returns:
        y ``(B, T, H, D)`` in v's dtype; and each part's own scaled sums (numerators,
        denominators, exponents) ``(3, S * parts, B * H, D)`` float32, which :func:`wkv_bwd` needs.
    """
    if k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(
            f"wkv: k and v must be contiguous (B, T, H, D) of one shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    y = new_output(v, v.shape, v.dtype)
    grid, n_parts, block, part_shape = _layout(k, cu_seqlens)
    part_state = new_output(k, (3, *part_shape), torch.float32)
    if grid[0] and y.numel():
        w = w.float().contiguous()
        common = dict(HEAD_DIM=k.shape[3], BLOCK_D=block, CLAMP=KEY_CLAMP, CARRY=CARRY_BLOCK, num_warps=1)
        arguments = _launch_arguments(k, n_parts, part_shape)
        wkv_fwd_state_kernel[grid](k, v, w, part_state, cu_seqlens, *arguments, **common)
        wkv_fwd_kernel[grid](
            k, v, w, u.float().contiguous(), y, part_state, cu_seqlens, *arguments, eps, TILE=TILE, **common
        )
    return y, part_state


def wkv_bwd(
    grad_y: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    part_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dk, dv, dw, du) of :func:`wkv_fwd` from its inputs and part sums; dw and du
    are ``(H, D)`` float32."""
    batch, _, heads, head_dim = k.shape
    grad_y = grad_y.contiguous()
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("wkv_bwd: k and v must be contiguous")
    dk = new_output(k, k.shape, k.dtype)
    dv = new_output(v, v.shape, v.dtype)
    grid, n_parts, block, part_shape = _layout(k, cu_seqlens)
    part_adjoint = torch.empty((4, *part_shape), dtype=torch.float32, device=k.device)
    dw_partial = torch.zeros(part_shape, dtype=torch.float32, device=k.device)
    du_partial = torch.zeros_like(dw_partial)
    if grid[0] and k.numel():
        w, u = w.float().contiguous(), u.float().contiguous()
        common = dict(HEAD_DIM=head_dim, BLOCK_D=block, CLAMP=KEY_CLAMP, CARRY=CARRY_BLOCK, TILE=TILE, num_warps=1)
        arguments = (*_launch_arguments(k, n_parts, part_shape), eps)
        wkv_bwd_state_kernel[grid](k, v, w, u, grad_y, part_state, part_adjoint, cu_seqlens, *arguments, **common)
        wkv_bwd_kernel[grid](
            k,
            v,
            w,
            u,
            grad_y,
            dk,
            dv,
            dw_partial,
            du_partial,
            part_state,
            part_adjoint,
            cu_seqlens,
            *arguments,
            **common,
        )
    fold = lambda partial: partial.view(-1, batch, heads, head_dim).sum(dim=(0, 1))
    return dk, dv, fold(dw_partial), fold(du_partial)
