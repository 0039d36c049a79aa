"""The S6 selective scan over packed sequences, forward and backward, parallel over time.

Layout: contiguous ``x, dt (B, T, D)`` and ``Bm, C (B, T, N)`` packed sequence after
sequence (sequence ``s`` owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``); ``A (D, N)``
(negative) and the skip ``Dskip (D,)``. Per channel d and state n:

    h_t = exp(dt_t A) * h_{t-1} + dt_t * Bm_t * x_t,   y_t = sum_n C_t h_t + Dskip * x_t.

Every sequence is cut into chunks of ``CHUNK`` steps (``checkpoint_offsets`` numbers them,
sequence after sequence); a program owns one chunk, one batch row and ``BLOCK_D`` channels,
with its ``(BLOCK_D, N)`` state in registers. The forward pass runs in two launches: each
chunk's own state from zero and its sum of dt (``selective_scan_fwd_state_kernel``, one
vectorised reduction over its steps, ``STATE_ROWS`` at a time: no step waits on the one
before); then each chunk takes the state carried into it (the earlier chunks' states, each
decayed by ``exp(A * sum of dt)`` over the chunks between, in one vectorised reduction),
stores it as the chunk's checkpoint and walks its steps (``selective_scan_fwd_kernel``,
loading ``STATE_ROWS`` steps at a time: the walk waits on a load once a tile). The
backward pass mirrors it: each chunk's adjoint of its entering state from zero
(``dh_{t-1} = exp(dt_t A) (dh_t + g_t C_t)``, ``selective_scan_bwd_state_kernel``, a
vectorised reduction too); then each chunk takes the later chunks' adjoints, recomputes its
states from its checkpoint into a worker's scratch and walks its steps in reverse
(``selective_scan_bwd_kernel``, a fixed number of worker programs taking items in turn; an
item is a chunk, a batch row and a group of channel blocks, which it walks one block after
the other). Gradients that sum over channels (of Bm
and C) are accumulated per group of channel blocks (``n_groups = WORKERS // (chunks * B)``
groups, at least 1 and at most the blocks: ``n_groups * B * T * N`` floats, which does not
grow with D), those that sum over time (A, Dskip) per chunk, and summed by the launcher.
Scratch: O(chunks * B * D * N) floats and the workers' ``WORKERS * CHUNK * BLOCK_D * N``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .buffers import new_output
from .tiles import tile_row

CHUNK = 64
STATE_ROWS = 8
"""Steps the forward's walk and the chunk-state kernels load at a time (at most; a power of two
that divides the chunk)."""
CARRY_BLOCK = 1
"""Chunks the carry reduction reads at a time (more only costs registers: the loads of
successive chunks do not wait on each other)."""
GROUP = 16
"""Chunks per group of the carries: a chunk reads its own group's chunks and the other
groups' sums."""
SEARCH_BLOCK = 64
"""Sequences a program's search for its sequence reads at a time."""
WORKERS = 528
"""Programs of the backward's main launch (four per SM of an H100), each with its scratch."""


@triton.jit
def _step_inputs(X, DT, BM, row, t, length, channels, states, c_mask, n_mask, n_channels, n_state):
    """Step ``t`` (packed row ``row``) of a sequence of ``length``: (whether it is a step, for
    the channels and for the states; x and dt of the channels, B of the states; zeros past
    the end)."""
    valid = (channels * 0 + t) < length
    state_valid = (states * 0 + t) < length
    x = tl.load(X + row * n_channels + channels, mask=c_mask & valid, other=0.0).to(tl.float32)
    dt = tl.load(DT + row * n_channels + channels, mask=c_mask & valid, other=0.0).to(tl.float32)
    bm = tl.load(BM + row * n_state + states, mask=n_mask & state_valid, other=0.0).to(tl.float32)
    return valid, state_valid, x, dt, bm


@triton.jit
def _rows(P, rows, valid, columns, column_mask, width):
    """Packed rows ``rows (ROWS,)`` of a ``(B * T, width)`` input at ``columns``, float32
    ``(ROWS, columns)``; zeros where not ``valid`` (past the sequence's end)."""
    mask = valid[:, None] & column_mask[None, :]
    return tl.load(P + rows[:, None] * width + columns[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _decayed_rows(h, a, exponents, weights, vectors):
    """``h (BLOCK_D, BLOCK_N)`` plus, over rows r, ``exp(exponents[r, d] a[d, n]) weights[r, d]
    vectors[r, n]`` (exponents and weights ``(ROWS, BLOCK_D)``, vectors ``(ROWS, BLOCK_N)``)."""
    terms = tl.exp(exponents[:, :, None] * a[None, :, :]) * (weights[:, :, None] * vectors[:, None, :])
    return h + tl.sum(terms, axis=0)


@triton.jit
def _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state):
    """Offsets ``(BLOCK_D, BLOCK_N)`` of chunk ``chunk``'s state in a ``(B, chunks, D, N)`` buffer."""
    return ((b * n_checkpoints + chunk) * n_channels + channels[:, None]) * n_state + states[None, :]


@triton.jit
def _tiles(block, n_channels, n_state, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(channels of channel block ``block``, states, their masks, the tile's mask)."""
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    c_mask = channels < n_channels
    n_mask = states < n_state
    return channels, states, c_mask, n_mask, c_mask[:, None] & n_mask[None, :]


@triton.jit
def _chunk(cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK: tl.constexpr, SEARCH: tl.constexpr):
    """(first packed row and length of chunk ``chunk``'s sequence, the chunk's first step,
    the sequence's first and end chunk, total packed rows): its sequence is the number of
    sequences whose chunks end at or before it."""
    sequence = 0
    for first in range(0, n_sequences, SEARCH):
        candidates = first + tl.arange(0, SEARCH)
        ends = tl.load(checkpoint_offsets + candidates + 1, mask=candidates < n_sequences, other=2147483647)
        sequence += tl.sum((ends <= chunk).to(tl.int32), axis=0)
    begin = tl.load(cu_seqlens + sequence).to(tl.int64)
    length = tl.load(cu_seqlens + sequence + 1).to(tl.int64) - begin
    first_chunk = tl.load(checkpoint_offsets + sequence)
    total = tl.load(cu_seqlens + n_sequences).to(tl.int64)
    return begin, length, (chunk - first_chunk) * CHUNK, first_chunk, tl.load(checkpoint_offsets + sequence + 1), total


@triton.jit
def _carry(
    STATE,
    DT,
    a,
    b,
    n_checkpoints,
    chunk,
    count,
    step,
    channels,
    states,
    c_mask,
    n_mask,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CARRY: tl.constexpr,
):
    """The states of the ``count`` chunks (or groups) ``chunk + step * (1 + k)`` (k = 0, 1,
    ...), each decayed by ``exp(A * dt summed over those between it and this one)``, summed:
    ``(BLOCK_D, BLOCK_N)``; and the sum of their dts ``(BLOCK_D,)``. The states and dt sums
    are in ``STATE (B, chunks, D, N)`` and ``DT (B, chunks, D)``; read CARRY at a time."""
    carried = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    gap = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, count, CARRY):
        k = first + tl.arange(0, CARRY)
        row = (b * n_checkpoints + chunk + step * (k + 1)) * n_channels
        mask = (k < count)[:, None] & c_mask[None, :]
        dts = tl.load(DT + row[:, None] + channels[None, :], mask=mask, other=0.0)
        between = gap[None, :] + tl.cumsum(dts, axis=0) - dts
        at = (row[:, None, None] + channels[None, :, None]) * n_state + states[None, None, :]
        chunk_states = tl.load(STATE + at, mask=mask[:, :, None] & n_mask[None, None, :], other=0.0)
        carried += tl.sum(tl.exp(between[:, :, None] * a[None, :, :]) * chunk_states, axis=0)
        gap += tl.sum(dts, axis=0)
    return carried, gap


@triton.jit
def _carry_in(
    STATE,
    DT,
    GROUP_STATE,
    GROUP_DT,
    a,
    b,
    n_checkpoints,
    chunk,
    first_chunk,
    end_chunk,
    channels,
    states,
    c_mask,
    n_mask,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CARRY: tl.constexpr,
    GROUP: tl.constexpr,
    FORWARD: tl.constexpr,
):
    """What the other chunks of the sequence carry into chunk ``chunk``: FORWARD, the state
    entering it (from the chunks before it); else the adjoint of the state leaving it (from
    the chunks after it). The chunks are grouped by GROUP from the sequence's first: those of
    its own group are read one by one, the other groups as their group sums (written by
    ``selective_scan_group_kernel`` at each group's first chunk), then decayed across the
    chunks of its own group between: O(GROUP + chunks / GROUP) reads."""
    group = first_chunk + (chunk - first_chunk) // GROUP * GROUP
    if FORWARD:
        carried, gap = _carry(
            STATE,
            DT,
            a,
            b,
            n_checkpoints,
            chunk,
            chunk - group,
            -1,
            channels,
            states,
            c_mask,
            n_mask,
            n_channels,
            n_state,
            BLOCK_D,
            BLOCK_N,
            CARRY,
        )
        groups, _ = _carry(
            GROUP_STATE,
            GROUP_DT,
            a,
            b,
            n_checkpoints,
            group,
            (group - first_chunk) // GROUP,
            -GROUP,
            channels,
            states,
            c_mask,
            n_mask,
            n_channels,
            n_state,
            BLOCK_D,
            BLOCK_N,
            CARRY,
        )
    else:
        carried, gap = _carry(
            STATE,
            DT,
            a,
            b,
            n_checkpoints,
            chunk,
            tl.minimum(group + GROUP, end_chunk) - 1 - chunk,
            1,
            channels,
            states,
            c_mask,
            n_mask,
            n_channels,
            n_state,
            BLOCK_D,
            BLOCK_N,
            CARRY,
        )
        groups, _ = _carry(
            GROUP_STATE,
            GROUP_DT,
            a,
            b,
            n_checkpoints,
            group,
            (end_chunk - 1 - group) // GROUP,
            GROUP,
            channels,
            states,
            c_mask,
            n_mask,
            n_channels,
            n_state,
            BLOCK_D,
            BLOCK_N,
            CARRY,
        )
    return carried + tl.exp(gap[:, None] * a) * groups


@triton.jit
def selective_scan_group_kernel(
    CHUNK_STATE,
    CHUNK_DT,
    A,
    GROUP_STATE,
    GROUP_DT,
    cu_seqlens,
    checkpoint_offsets,
    n_sequences,
    n_checkpoints,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH: tl.constexpr,
    CARRY: tl.constexpr,
    GROUP: tl.constexpr,
    FORWARD: tl.constexpr,
):
    """For a chunk that starts a group of GROUP chunks of its sequence: the group's sum of the
    chunks' states (FORWARD: each decayed to the group's end; else adjoints, decayed to its
    start) and of their dts, stored at the chunk's slot."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    channels, states, c_mask, n_mask, tile_mask = _tiles(tl.program_id(2), n_channels, n_state, BLOCK_D, BLOCK_N)
    begin, length, first_step, first_chunk, end_chunk, total = _chunk(
        cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK, SEARCH
    )
    if (chunk - first_chunk) % GROUP == 0:
        a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        count = tl.minimum(GROUP, end_chunk - chunk)
        if FORWARD:
            summed, gap = _carry(
                CHUNK_STATE,
                CHUNK_DT,
                a,
                b,
                n_checkpoints,
                chunk + count,
                count,
                -1,
                channels,
                states,
                c_mask,
                n_mask,
                n_channels,
                n_state,
                BLOCK_D,
                BLOCK_N,
                CARRY,
            )
        else:
            summed, gap = _carry(
                CHUNK_STATE,
                CHUNK_DT,
                a,
                b,
                n_checkpoints,
                chunk - 1,
                count,
                1,
                channels,
                states,
                c_mask,
                n_mask,
                n_channels,
                n_state,
                BLOCK_D,
                BLOCK_N,
                CARRY,
            )
        tl.store(
            GROUP_STATE + _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state),
            summed,
            mask=tile_mask,
        )
        tl.store(GROUP_DT + (b * n_checkpoints + chunk) * n_channels + channels, gap, mask=c_mask)


@triton.jit
def selective_scan_fwd_state_kernel(
    X,
    DT,
    A,
    BM,
    CHUNK_STATE,
    CHUNK_DT,
    cu_seqlens,
    checkpoint_offsets,
    n_sequences,
    n_checkpoints,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH: tl.constexpr,
    ROWS: tl.constexpr,
):
    """A chunk's own state at its end, from zero, and its sum of dt: ``sum_t exp(A * dt summed
    over the steps after t) dt_t x_t Bm_t``, one vectorised reduction over its steps, ROWS at
    a time from the last (no step waits on the one before)."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    channels, states, c_mask, n_mask, tile_mask = _tiles(tl.program_id(2), n_channels, n_state, BLOCK_D, BLOCK_N)
    begin, length, first_step, first_chunk, end_chunk, total = _chunk(
        cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK, SEARCH
    )
    a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for back in range(0, CHUNK // ROWS):
        t = first_step + CHUNK - (back + 1) * ROWS + tl.arange(0, ROWS)
        valid = t < length
        row = b * total + begin + t
        dt = _rows(DT, row, valid, channels, c_mask, n_channels)
        after = dt_sum[None, :] + tl.sum(dt, axis=0)[None, :] - tl.cumsum(dt, axis=0)
        h = _decayed_rows(
            h,
            a,
            after,
            dt * _rows(X, row, valid, channels, c_mask, n_channels),
            _rows(BM, row, valid, states, n_mask, n_state),
        )
        dt_sum += tl.sum(dt, axis=0)
    tl.store(
        CHUNK_STATE + _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state), h, mask=tile_mask
    )
    tl.store(CHUNK_DT + (b * n_checkpoints + chunk) * n_channels + channels, dt_sum, mask=c_mask)


@triton.jit
def selective_scan_fwd_kernel(
    X,
    DT,
    A,
    BM,
    C,
    DSKIP,
    Y,
    CHECKPOINTS,
    CHUNK_STATE,
    CHUNK_DT,
    GROUP_STATE,
    GROUP_DT,
    cu_seqlens,
    checkpoint_offsets,
    n_sequences,
    n_checkpoints,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH: tl.constexpr,
    CARRY: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
):
    """A chunk's outputs: the state carried in from the earlier chunks of its sequence
    (stored as its checkpoint), then the walk over its steps, ROWS loaded at a time and taken
    from registers one by one."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    channels, states, c_mask, n_mask, tile_mask = _tiles(tl.program_id(2), n_channels, n_state, BLOCK_D, BLOCK_N)
    begin, length, first_step, first_chunk, end_chunk, total = _chunk(
        cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK, SEARCH
    )
    a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    skip = tl.load(DSKIP + channels, mask=c_mask, other=0.0).to(tl.float32)
    h = _carry_in(
        CHUNK_STATE,
        CHUNK_DT,
        GROUP_STATE,
        GROUP_DT,
        a,
        b,
        n_checkpoints,
        chunk,
        first_chunk,
        end_chunk,
        channels,
        states,
        c_mask,
        n_mask,
        n_channels,
        n_state,
        BLOCK_D,
        BLOCK_N,
        CARRY,
        GROUP,
        True,
    )
    tl.store(
        CHECKPOINTS + _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state), h, mask=tile_mask
    )
    for first in range(0, CHUNK, ROWS):
        steps = first + tl.arange(0, ROWS)
        valid = first_step + steps < length
        rows = b * total + begin + first_step + steps
        tile_x = _rows(X, rows, valid, channels, c_mask, n_channels)
        tile_dt = _rows(DT, rows, valid, channels, c_mask, n_channels)
        tile_bm = _rows(BM, rows, valid, states, n_mask, n_state)
        tile_c = _rows(C, rows, valid, states, n_mask, n_state)
        for i in range(first, first + ROWS):
            x = tile_row(tile_x, steps, i)
            dt = tile_row(tile_dt, steps, i)
            h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * tile_row(tile_bm, steps, i)[None, :]
            y = tl.sum(h * tile_row(tile_c, steps, i)[None, :], axis=1) + skip * x
            row = b * total + begin + first_step + i
            tl.store(
                Y + row * n_channels + channels,
                y.to(Y.dtype.element_ty),
                mask=c_mask & (channels * 0 + first_step + i < length),
            )


@triton.jit
def selective_scan_bwd_state_kernel(
    DT,
    A,
    C,
    DY,
    CHUNK_ADJOINT,
    CHUNK_DT,
    cu_seqlens,
    checkpoint_offsets,
    n_sequences,
    n_checkpoints,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH: tl.constexpr,
    ROWS: tl.constexpr,
):
    """A chunk's own adjoint of the state entering it, from zero at its end
    (``dh_{t-1} = exp(dt_t A) (dh_t + dy_t C_t)``, so ``sum_t exp(A * dt summed up to t)
    dy_t C_t``), and its sum of dt: one vectorised reduction over its steps, ROWS at a time
    from the first (no step waits on the one before)."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    channels, states, c_mask, n_mask, tile_mask = _tiles(tl.program_id(2), n_channels, n_state, BLOCK_D, BLOCK_N)
    begin, length, first_step, first_chunk, end_chunk, total = _chunk(
        cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK, SEARCH
    )
    a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, CHUNK // ROWS):
        t = first_step + i * ROWS + tl.arange(0, ROWS)
        valid = t < length
        row = b * total + begin + t
        dt = _rows(DT, row, valid, channels, c_mask, n_channels)
        through = dt_sum[None, :] + tl.cumsum(dt, axis=0)
        dh = _decayed_rows(
            dh,
            a,
            through,
            _rows(DY, row, valid, channels, c_mask, n_channels),
            _rows(C, row, valid, states, n_mask, n_state),
        )
        dt_sum += tl.sum(dt, axis=0)
    tl.store(
        CHUNK_ADJOINT + _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state), dh, mask=tile_mask
    )
    tl.store(CHUNK_DT + (b * n_checkpoints + chunk) * n_channels + channels, dt_sum, mask=c_mask)


@triton.jit
def selective_scan_bwd_kernel(
    X,
    DT,
    A,
    BM,
    C,
    DSKIP,
    DY,
    CHECKPOINTS,
    CHUNK_ADJOINT,
    CHUNK_DT,
    GROUP_STATE,
    GROUP_DT,
    SCRATCH,
    cu_seqlens,
    checkpoint_offsets,
    DX,
    DDT,
    DA_PARTIAL,
    DBM_PARTIAL,
    DC_PARTIAL,
    DDSKIP_PARTIAL,
    n_sequences,
    n_checkpoints,
    n_batch,
    n_blocks,
    n_groups,
    n_channels,
    n_state,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SEARCH: tl.constexpr,
    CARRY: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Workers take (chunk, batch row, group of channel blocks) items in turn; group g holds
    the blocks g, g + n_groups, ... For each block of an item: the adjoint carried in from the
    later chunks of its sequence; the chunk's states recomputed from its checkpoint into the
    worker's scratch; the reverse walk giving dx, ddt and the chunk's shares of dA, dDskip,
    and its block's shares of dB and dC, added to the group's (zeros before its first block)."""
    scratch = (
        SCRATCH
        + tl.program_id(0).to(tl.int64) * CHUNK * BLOCK_D * BLOCK_N
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N
        + tl.arange(0, BLOCK_N)[None, :]
    )
    per_group = tl.cdiv(n_blocks, n_groups)
    mine = tl.cdiv(n_checkpoints * n_batch * n_groups - tl.program_id(0), tl.num_programs(0)) * per_group
    for work in range(0, mine):
        item = tl.program_id(0) + (work // per_group) * tl.num_programs(0)
        chunk = item // (n_batch * n_groups)
        b = ((item // n_groups) % n_batch).to(tl.int64)
        group_of_blocks = item % n_groups
        block = group_of_blocks + (work % per_group) * n_groups
        begin, length, first_step, first_chunk, end_chunk, total = _chunk(
            cu_seqlens, checkpoint_offsets, chunk, n_sequences, CHUNK, SEARCH
        )
        if block < n_blocks:
            channels, states, c_mask, n_mask, tile_mask = _tiles(block, n_channels, n_state, BLOCK_D, BLOCK_N)
            a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            skip = tl.load(DSKIP + channels, mask=c_mask, other=0.0).to(tl.float32)
            slot = _chunk_slot(b, n_checkpoints, chunk, channels, states, n_channels, n_state)
            dh = _carry_in(
                CHUNK_ADJOINT,
                CHUNK_DT,
                GROUP_STATE,
                GROUP_DT,
                a,
                b,
                n_checkpoints,
                chunk,
                first_chunk,
                end_chunk,
                channels,
                states,
                c_mask,
                n_mask,
                n_channels,
                n_state,
                BLOCK_D,
                BLOCK_N,
                CARRY,
                GROUP,
                False,
            )
            entering = tl.load(CHECKPOINTS + slot, mask=tile_mask, other=0.0)
            h = entering
            for i in range(0, CHUNK):
                t = first_step + i
                valid, state_valid, x, dt, bm = _step_inputs(
                    X, DT, BM, b * total + begin + t, t, length, channels, states, c_mask, n_mask, n_channels, n_state
                )
                h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
                tl.store(scratch + i * BLOCK_D * BLOCK_N, h)
            tl.debug_barrier()
            da = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
            dskip = tl.zeros([BLOCK_D], dtype=tl.float32)
            for reverse_i in range(0, CHUNK):
                i = CHUNK - 1 - reverse_i
                t = first_step + i
                row = b * total + begin + t
                valid, state_valid, x, dt, bm = _step_inputs(
                    X, DT, BM, row, t, length, channels, states, c_mask, n_mask, n_channels, n_state
                )
                c = tl.load(C + row * n_state + states, mask=n_mask & state_valid, other=0.0).to(tl.float32)
                g = tl.load(DY + row * n_channels + channels, mask=c_mask & valid, other=0.0).to(tl.float32)
                h = tl.load(scratch + i * BLOCK_D * BLOCK_N)
                not_first = (states * 0 + i) > 0
                previous = tl.load(
                    scratch + (i - 1) * BLOCK_D * BLOCK_N, mask=tile_mask & not_first[None, :], other=0.0
                )
                previous = tl.where(not_first[None, :], previous, entering)
                dh = tl.where(valid[:, None], dh + g[:, None] * c[None, :], dh)
                decay = tl.exp(dt[:, None] * a)
                through_decay = dh * previous * decay
                ddt = tl.sum(through_decay * a, axis=1) + tl.sum(dh * bm[None, :], axis=1) * x
                dx = tl.sum(dh * bm[None, :], axis=1) * dt + g * skip
                da += through_decay * dt[:, None]
                dskip += g * x
                tl.store(DX + row * n_channels + channels, dx.to(DX.dtype.element_ty), mask=c_mask & valid)
                tl.store(DDT + row * n_channels + channels, ddt.to(DDT.dtype.element_ty), mask=c_mask & valid)
                partial_row = (group_of_blocks * n_batch * total + row) * n_state + states
                row_mask = n_mask & state_valid
                db = tl.sum(dh * (dt * x)[:, None], axis=0) + tl.load(
                    DBM_PARTIAL + partial_row, mask=row_mask, other=0.0
                )
                dc = tl.sum(g[:, None] * h, axis=0) + tl.load(DC_PARTIAL + partial_row, mask=row_mask, other=0.0)
                tl.store(DBM_PARTIAL + partial_row, db, mask=row_mask)
                tl.store(DC_PARTIAL + partial_row, dc, mask=row_mask)
                dh = tl.where(valid[:, None], dh * decay, dh)
            tl.debug_barrier()
            tl.store(DA_PARTIAL + slot, da, mask=tile_mask)
            tl.store(DDSKIP_PARTIAL + (b * n_checkpoints + chunk) * n_channels + channels, dskip, mask=c_mask)


def _blocks(n_channels: int, n_state: int) -> tuple[int, int]:
    block_n = max(2, triton.next_power_of_2(n_state))
    return min(32, triton.next_power_of_2(n_channels)), block_n


def state_rows(chunk: int) -> int:
    """Steps the chunk-state kernels read at a time for chunks of ``chunk`` steps."""
    return math.gcd(chunk, STATE_ROWS)


def block_groups(n_checkpoints: int, batch: int, n_blocks: int) -> int:
    """Groups of channel blocks of the backward's items: enough for every worker to take one
    (chunk, batch row, group) item, at most one per block."""
    return max(1, min(n_blocks, WORKERS // max(1, n_checkpoints * batch)))


def checkpoint_offsets(cu_seqlens: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``(S + 1,)`` int32: where each sequence's checkpoints (one per ``chunk`` steps) start."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    chunks = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
    return torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)]).to(torch.int32)


def selective_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    C: torch.Tensor,
    Dskip: torch.Tensor,
    cu_seqlens: torch.Tensor,
    offsets: torch.Tensor,
    n_checkpoints: int,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y ``(B, T, D)`` in x's dtype, and the chunk checkpoints (float32) for the backward.

    ``offsets`` is :func:`checkpoint_offsets` of ``cu_seqlens`` for ``chunk`` and
    ``n_checkpoints`` its last entry; all inputs contiguous.
    """
    batch, _, n_channels = x.shape
    n_state = A.shape[1]
    block_d, block_n = _blocks(n_channels, n_state)
    y = new_output(x, x.shape, x.dtype)
    checkpoints = torch.empty(batch, n_checkpoints, n_channels, n_state, dtype=torch.float32, device=x.device)
    chunk_state = torch.empty_like(checkpoints)
    chunk_dt = torch.empty(batch, n_checkpoints, n_channels, dtype=torch.float32, device=x.device)
    grid = (n_checkpoints, batch, triton.cdiv(n_channels, block_d))
    if n_checkpoints and x.numel():
        A = A.float().contiguous()
        common = dict(BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, SEARCH=SEARCH_BLOCK)
        sizes = (cu_seqlens.shape[0] - 1, n_checkpoints, n_channels, n_state)
        selective_scan_fwd_state_kernel[grid](
            x, dt, A, Bm, chunk_state, chunk_dt, cu_seqlens, offsets, *sizes, ROWS=state_rows(chunk), **common
        )
        group_state, group_dt = torch.empty_like(chunk_state), torch.empty_like(chunk_dt)
        selective_scan_group_kernel[grid](
            chunk_state,
            chunk_dt,
            A,
            group_state,
            group_dt,
            cu_seqlens,
            offsets,
            *sizes,
            CARRY=CARRY_BLOCK,
            GROUP=GROUP,
            FORWARD=True,
            **common,
        )
        selective_scan_fwd_kernel[grid](
            x,
            dt,
            A,
            Bm,
            C,
            Dskip.float().contiguous(),
            y,
            checkpoints,
            chunk_state,
            chunk_dt,
            group_state,
            group_dt,
            cu_seqlens,
            offsets,
            *sizes,
            CARRY=CARRY_BLOCK,
            GROUP=GROUP,
            ROWS=state_rows(chunk),
            **common,
        )
    return y, checkpoints


def selective_scan_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    C: torch.Tensor,
    Dskip: torch.Tensor,
    checkpoints: torch.Tensor,
    cu_seqlens: torch.Tensor,
    offsets: torch.Tensor,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, ddt, dA, dBm, dC, dDskip) of :func:`selective_scan_fwd` (the same ``chunk``)."""
    batch, total, n_channels = x.shape
    n_state = A.shape[1]
    n_checkpoints = checkpoints.shape[1]
    block_d, block_n = _blocks(n_channels, n_state)
    n_blocks = triton.cdiv(n_channels, block_d)
    grad_y = grad_y.contiguous()
    dx, ddt = new_output(x, x.shape, x.dtype), new_output(dt, dt.shape, dt.dtype)
    chunk_adjoint = torch.empty_like(checkpoints)
    chunk_dt = torch.empty(batch, n_checkpoints, n_channels, dtype=torch.float32, device=x.device)
    da_partial = torch.zeros_like(checkpoints)
    dskip_partial = torch.zeros_like(chunk_dt)
    n_groups = block_groups(n_checkpoints, batch, n_blocks)
    db_partial = torch.zeros(n_groups, batch, total, n_state, dtype=torch.float32, device=x.device)
    dc_partial = torch.zeros_like(db_partial)
    workers = min(WORKERS, n_checkpoints * batch * n_groups)
    scratch = torch.empty(workers * chunk * block_d * block_n, dtype=torch.float32, device=x.device)
    if n_checkpoints and x.numel():
        A = A.float().contiguous()
        common = dict(BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, SEARCH=SEARCH_BLOCK)
        sequences = cu_seqlens.shape[0] - 1
        sizes = (sequences, n_checkpoints, n_channels, n_state)
        grid = (n_checkpoints, batch, n_blocks)
        selective_scan_bwd_state_kernel[grid](
            dt, A, C, grad_y, chunk_adjoint, chunk_dt, cu_seqlens, offsets, *sizes, ROWS=state_rows(chunk), **common
        )
        group_adjoint, group_dt = torch.empty_like(chunk_adjoint), torch.empty_like(chunk_dt)
        selective_scan_group_kernel[grid](
            chunk_adjoint,
            chunk_dt,
            A,
            group_adjoint,
            group_dt,
            cu_seqlens,
            offsets,
            *sizes,
            CARRY=CARRY_BLOCK,
            GROUP=GROUP,
            FORWARD=False,
            **common,
        )
        selective_scan_bwd_kernel[(workers,)](
            x,
            dt,
            A,
            Bm,
            C,
            Dskip.float().contiguous(),
            grad_y,
            checkpoints,
            chunk_adjoint,
            chunk_dt,
            group_adjoint,
            group_dt,
            scratch,
            cu_seqlens,
            offsets,
            dx,
            ddt,
            da_partial,
            db_partial,
            dc_partial,
            dskip_partial,
            sequences,
            n_checkpoints,
            batch,
            n_blocks,
            n_groups,
            n_channels,
            n_state,
            CARRY=CARRY_BLOCK,
            GROUP=GROUP,
            **common,
        )
    return (
        dx,
        ddt,
        da_partial.sum(dim=(0, 1)),
        db_partial.sum(0).to(Bm.dtype),
        dc_partial.sum(0).to(C.dtype),
        dskip_partial.sum(dim=(0, 1)),
    )
