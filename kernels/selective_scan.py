"""The S6 selective scan over packed sequences, forward and backward.

Layout: contiguous ``x, dt (B, T, D)`` and ``Bm, C (B, T, N)`` packed sequence after
sequence (sequence ``s`` owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``); ``A (D, N)``
(negative) and the skip ``Dskip (D,)``. Per channel d and state n:

    h_t = exp(dt_t A) * h_{t-1} + dt_t * Bm_t * x_t,   y_t = sum_n C_t h_t + Dskip * x_t.

Each program owns one sequence, one batch row and ``BLOCK_D`` channels, and keeps its
``(BLOCK_D, N)`` state in registers while it walks the steps. The forward pass stores the
state entering every chunk of ``CHUNK`` steps (``checkpoints``, O(T / CHUNK * D * N)); the
backward pass walks the chunks in reverse, recomputes a chunk's states from its checkpoint
into a per-program scratch buffer, and runs the adjoint recurrence
``dh_{t-1} = exp(dt_t A) * dh_t`` back through it. Gradients that sum over channels (of Bm
and C) are written per channel block and summed by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output

CHUNK = 64


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
def _checkpoint_slot(b, n_checkpoints, checkpoint, channels, states, n_channels, n_state):
    """Offsets ``(BLOCK_D, BLOCK_N)`` of the state checkpoint ``checkpoint`` of batch row b."""
    return ((b * n_checkpoints + checkpoint) * n_channels + channels[:, None]) * n_state + states[None, :]


@triton.jit
def selective_scan_fwd_kernel(
    X, DT, A, BM, C, DSKIP, Y, CHECKPOINTS, cu_seqlens, checkpoint_offsets,
    n_channels, n_state,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    sequence = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    c_mask = channels < n_channels
    n_mask = states < n_state
    begin = tl.load(cu_seqlens + sequence).to(tl.int64)
    length = tl.load(cu_seqlens + sequence + 1).to(tl.int64) - begin
    first_checkpoint = tl.load(checkpoint_offsets + sequence).to(tl.int64)
    n_checkpoints = tl.load(checkpoint_offsets + tl.num_programs(0)).to(tl.int64)
    tile_mask = c_mask[:, None] & n_mask[None, :]
    a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    skip = tl.load(DSKIP + channels, mask=c_mask, other=0.0).to(tl.float32)
    total = tl.load(cu_seqlens + tl.num_programs(0)).to(tl.int64)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for chunk in range(0, tl.cdiv(length, CHUNK)):
        slot = _checkpoint_slot(b, n_checkpoints, first_checkpoint + chunk, channels, states, n_channels, n_state)
        tl.store(CHECKPOINTS + slot, h, mask=tile_mask)
        for i in range(0, CHUNK):
            t = chunk * CHUNK + i
            row = b * total + begin + t
            valid, state_valid, x, dt, bm = _step_inputs(X, DT, BM, row, t, length, channels, states, c_mask, n_mask, n_channels, n_state)
            c = tl.load(C + row * n_state + states, mask=n_mask & state_valid, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
            y = tl.sum(h * c[None, :], axis=1) + skip * x
            tl.store(Y + row * n_channels + channels, y.to(Y.dtype.element_ty), mask=c_mask & valid)


@triton.jit
def selective_scan_bwd_kernel(
    X, DT, A, BM, C, DSKIP, DY, CHECKPOINTS, SCRATCH, cu_seqlens, checkpoint_offsets,
    DX, DDT, DA_PARTIAL, DBM_PARTIAL, DC_PARTIAL, DDSKIP_PARTIAL,
    n_channels, n_state,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    sequence = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    block = tl.program_id(2)
    n_blocks = tl.num_programs(2)
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    c_mask = channels < n_channels
    n_mask = states < n_state
    tile_mask = c_mask[:, None] & n_mask[None, :]
    begin = tl.load(cu_seqlens + sequence).to(tl.int64)
    length = tl.load(cu_seqlens + sequence + 1).to(tl.int64) - begin
    total = tl.load(cu_seqlens + tl.num_programs(0)).to(tl.int64)
    first_checkpoint = tl.load(checkpoint_offsets + sequence).to(tl.int64)
    n_checkpoints = tl.load(checkpoint_offsets + tl.num_programs(0)).to(tl.int64)
    a = tl.load(A + channels[:, None] * n_state + states[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    skip = tl.load(DSKIP + channels, mask=c_mask, other=0.0).to(tl.float32)
    program = (sequence * tl.num_programs(1) + b) * n_blocks + block
    scratch = SCRATCH + program.to(tl.int64) * CHUNK * BLOCK_D * BLOCK_N + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + states[None, :]
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    da = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dskip = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(length, CHUNK)
    for reverse_chunk in range(0, n_chunks):
        chunk = n_chunks - 1 - reverse_chunk
        slot = _checkpoint_slot(b, n_checkpoints, first_checkpoint + chunk, channels, states, n_channels, n_state)
        h = tl.load(CHECKPOINTS + slot, mask=tile_mask, other=0.0)
        for i in range(0, CHUNK):
            t = chunk * CHUNK + i
            row = b * total + begin + t
            valid, state_valid, x, dt, bm = _step_inputs(X, DT, BM, row, t, length, channels, states, c_mask, n_mask, n_channels, n_state)
            h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
            tl.store(scratch + i * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        for reverse_i in range(0, CHUNK):
            i = CHUNK - 1 - reverse_i
            t = chunk * CHUNK + i
            row = b * total + begin + t
            valid, state_valid, x, dt, bm = _step_inputs(X, DT, BM, row, t, length, channels, states, c_mask, n_mask, n_channels, n_state)
            c = tl.load(C + row * n_state + states, mask=n_mask & state_valid, other=0.0).to(tl.float32)
            g = tl.load(DY + row * n_channels + channels, mask=c_mask & valid, other=0.0).to(tl.float32)
            h = tl.load(scratch + i * BLOCK_D * BLOCK_N)
            not_first = (states * 0 + i) > 0
            previous = tl.load(scratch + (i - 1) * BLOCK_D * BLOCK_N, mask=tile_mask & not_first[None, :], other=0.0)
            entering = tl.load(CHECKPOINTS + _checkpoint_slot(b, n_checkpoints, first_checkpoint + chunk, channels, states, n_channels, n_state), mask=tile_mask & ~not_first[None, :], other=0.0)
            previous = previous + entering
            dh = tl.where(valid[:, None], dh + g[:, None] * c[None, :], dh)
            decay = tl.exp(dt[:, None] * a)
            through_decay = dh * previous * decay
            ddt = tl.sum(through_decay * a, axis=1) + tl.sum(dh * bm[None, :], axis=1) * x
            dx = tl.sum(dh * bm[None, :], axis=1) * dt + g * skip
            da += through_decay * dt[:, None]
            dskip += g * x
            tl.store(DX + row * n_channels + channels, dx.to(DX.dtype.element_ty), mask=c_mask & valid)
            tl.store(DDT + row * n_channels + channels, ddt.to(DDT.dtype.element_ty), mask=c_mask & valid)
            partial_row = (block * tl.num_programs(1) * total + row) * n_state + states
            tl.store(DBM_PARTIAL + partial_row, tl.sum(dh * (dt * x)[:, None], axis=0), mask=n_mask & state_valid)
            tl.store(DC_PARTIAL + partial_row, tl.sum(g[:, None] * h, axis=0), mask=n_mask & state_valid)
            dh = tl.where(valid[:, None], dh * decay, dh)
        tl.debug_barrier()
    partial = (sequence * tl.num_programs(1) + b) * n_channels
    tl.store(DA_PARTIAL + (partial + channels[:, None]) * n_state + states[None, :], da, mask=tile_mask)
    tl.store(DDSKIP_PARTIAL + partial + channels, dskip, mask=c_mask)


def _blocks(n_channels: int, n_state: int) -> tuple[int, int]:
    block_n = max(2, triton.next_power_of_2(n_state))
    return min(32, triton.next_power_of_2(n_channels)), block_n


def checkpoint_offsets(cu_seqlens: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``(S + 1,)`` int32: where each sequence's checkpoints (one per ``chunk`` steps) start."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    chunks = torch.div(lengths + chunk - 1, chunk, rounding_mode="floor")
    return torch.cat([chunks.new_zeros(1), torch.cumsum(chunks, 0)]).to(torch.int32)


def selective_scan_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, C: torch.Tensor, Dskip: torch.Tensor,
    cu_seqlens: torch.Tensor, offsets: torch.Tensor, n_checkpoints: int, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y ``(B, T, D)`` in x's dtype, and the chunk checkpoints (float32) for the backward.

    ``offsets`` is :func:`checkpoint_offsets` of ``cu_seqlens`` for ``chunk`` and
    ``n_checkpoints`` its last entry; all inputs contiguous.
    """
    batch, _, n_channels = x.shape
    n_state = A.shape[1]
    block_d, block_n = _blocks(n_channels, n_state)
    y = new_output(x, x.shape, x.dtype)
    checkpoints = torch.zeros(batch, n_checkpoints, n_channels, n_state, dtype=torch.float32, device=x.device)
    grid = (cu_seqlens.shape[0] - 1, batch, triton.cdiv(n_channels, block_d))
    if grid[0] and x.numel():
        selective_scan_fwd_kernel[grid](
            x, dt, A.float().contiguous(), Bm, C, Dskip.float().contiguous(), y, checkpoints, cu_seqlens, offsets,
            n_channels, n_state, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        )
    return y, checkpoints


def selective_scan_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, C: torch.Tensor,
    Dskip: torch.Tensor, checkpoints: torch.Tensor, cu_seqlens: torch.Tensor, offsets: torch.Tensor, chunk: int = CHUNK,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, ddt, dA, dBm, dC, dDskip) of :func:`selective_scan_fwd` (the same ``chunk``)."""
    batch, total, n_channels = x.shape
    n_state = A.shape[1]
    block_d, block_n = _blocks(n_channels, n_state)
    sequences = cu_seqlens.shape[0] - 1
    n_blocks = triton.cdiv(n_channels, block_d)
    grad_y = grad_y.contiguous()
    dx, ddt = new_output(x, x.shape, x.dtype), new_output(dt, dt.shape, dt.dtype)
    da_partial = torch.zeros(sequences, batch, n_channels, n_state, dtype=torch.float32, device=x.device)
    dskip_partial = torch.zeros(sequences, batch, n_channels, dtype=torch.float32, device=x.device)
    db_partial = torch.zeros(n_blocks, batch, total, n_state, dtype=torch.float32, device=x.device)
    dc_partial = torch.zeros_like(db_partial)
    scratch = torch.empty(sequences * batch * n_blocks * chunk * block_d * block_n, dtype=torch.float32, device=x.device)
    if sequences and x.numel():
        selective_scan_bwd_kernel[(sequences, batch, n_blocks)](
            x, dt, A.float().contiguous(), Bm, C, Dskip.float().contiguous(), grad_y, checkpoints, scratch, cu_seqlens, offsets,
            dx, ddt, da_partial, db_partial, dc_partial, dskip_partial,
            n_channels, n_state, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        )
    return (
        dx, ddt, da_partial.sum(dim=(0, 1)), db_partial.sum(0).to(Bm.dtype), dc_partial.sum(0).to(C.dtype),
        dskip_partial.sum(dim=(0, 1)),
    )
