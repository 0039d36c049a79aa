"""The S6 selective scan over the key sets of packed segments.

:func:`segment_selective_scan` runs the Triton scan of ``canvas_engineering.kernels.
selective_scan`` (as the custom op ``canvas_engineering::selective_scan``) where
:func:`use_triton` says so, else :func:`eager_selective_scan`, the two-level
:func:`selective_scan` of each key-set bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from canvas_engineering.ops.backend import HAS_TRITON, use_triton
from canvas_engineering.ops.composite import composite_gradients
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex


@torch.library.custom_op("canvas_engineering::selective_scan", mutates_args=())
def _selective_scan_op(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    cu_seqlens: torch.Tensor,
    checkpoint_offsets: torch.Tensor,
    n_checkpoints: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, state checkpoints) of the Triton selective scan."""
    from canvas_engineering.kernels.selective_scan import selective_scan_fwd

    return selective_scan_fwd(x, dt, A, B, C, D, cu_seqlens, checkpoint_offsets, n_checkpoints, chunk)


@_selective_scan_op.register_fake
def _(x, dt, A, B, C, D, cu_seqlens, checkpoint_offsets, n_checkpoints, chunk):
    return torch.empty_like(x), x.new_empty((x.shape[0], n_checkpoints, x.shape[2], A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("canvas_engineering::selective_scan_backward", mutates_args=())
def _selective_scan_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    checkpoints: torch.Tensor,
    cu_seqlens: torch.Tensor,
    checkpoint_offsets: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA, dB, dC, dD) of the Triton selective scan."""
    from canvas_engineering.kernels.selective_scan import selective_scan_bwd

    return selective_scan_bwd(grad_y, x, dt, A, B, C, D, checkpoints, cu_seqlens, checkpoint_offsets, chunk)


@_selective_scan_backward_op.register_fake
def _(grad_y, x, dt, A, B, C, D, checkpoints, cu_seqlens, checkpoint_offsets, chunk):
    return (
        torch.empty_like(x),
        torch.empty_like(dt),
        torch.empty_like(A, dtype=torch.float32),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D, dtype=torch.float32),
    )


def _selective_scan_setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, cu_seqlens, checkpoint_offsets, n_checkpoints, chunk = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, output[1], cu_seqlens, checkpoint_offsets)
    ctx.options = (n_checkpoints, chunk)


def _selective_scan_backward(ctx, grad_y, grad_checkpoints):
    x, dt, A, B, C, D, checkpoints, *tables = ctx.saved_tensors
    _, chunk = ctx.options
    dx, ddt, dA, dB, dC, dD = _selective_scan_backward_op(
        grad_y.contiguous(), x, dt, A, B, C, D, checkpoints, *tables, chunk
    )
    return (dx, ddt, dA.to(A.dtype), dB, dC, dD.to(D.dtype)) + (None,) * (len(tables) + len(ctx.options))


_selective_scan_op.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup_context)


@dataclass(eq=False)
class SelectiveScanTables:
    """What the kernels need of a :class:`SegmentIndex`: its key-set offsets ``(S_k + 1,)``
    int32 (the scanned sequences), where each key set's state checkpoints start ``(S_k + 1,)``
    int32 (one per ``chunk`` steps), the number of checkpoints, and ``chunk``."""

    cu_seqlens: torch.Tensor
    checkpoint_offsets: torch.Tensor
    n_checkpoints: int
    chunk: int

    @staticmethod
    def build(index: SegmentIndex) -> SelectiveScanTables:
        from canvas_engineering.kernels.selective_scan import CHUNK, checkpoint_offsets

        cu_seqlens = index.int32_table(index.keyset_offsets)
        starts = checkpoint_offsets(cu_seqlens, CHUNK)
        return SelectiveScanTables(cu_seqlens, starts, int(starts[-1]), CHUNK)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tables in the order the custom ops take them."""
        return (self.cu_seqlens, self.checkpoint_offsets)


_tables = PerIndexCache()


def selective_scan_tables(index: SegmentIndex) -> SelectiveScanTables:
    """The kernels' tables of ``index`` (cached)."""
    return _tables.get(index, lambda: SelectiveScanTables.build(index))


def prepare_selective_scan(index: SegmentIndex) -> None:
    """Build ahead of a forward what :func:`segment_selective_scan` derives from ``index``: the
    kernel tables, where Triton is installed."""
    if HAS_TRITON:
        selective_scan_tables(index)


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk: int = 0,
) -> torch.Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, h_0 = 0.

    Two levels, so that no loop runs over all L steps: the sequence is cut into chunks of
    ``chunk`` steps (default ``max(16, ceil(sqrt(L)))``); (1) every chunk is scanned from a
    zero state, all chunks at once, in a loop over the positions of a chunk; (2) the state
    entering each chunk follows from a loop over chunks; (3) each step adds what the state
    entering its chunk contributes, decayed by ``exp(A * sum of dt since the chunk start)``.
    Every exponent is ``dt * A <= 0`` or a sum of such, so nothing overflows at any length;
    exponents are floored at half the log of the smallest normal number (-43.7 in float32:
    a decay below 1e-19 is taken as 1e-19), so that no decay factor is a subnormal number,
    which x86 CPUs compute far slower (measurements: docs/notes.md).
    The sums of dt accumulate in the loop over positions, not through ``torch.cumsum``,
    which ``torch.use_deterministic_algorithms(True)`` refuses on CUDA tensors. The backward
    is written out (the adjoint recurrence in the same two levels) and keeps only the state
    after each step, about half of what autograd's would keep (docs/notes.md).
    Half-precision inputs are scanned in float32, outside any autocast region (whose
    half-precision products would round the state at every step), and the result is
    returned in x's dtype.

    Args:
        x, dt: ``(batch, L, channels)``.
        A: ``(channels, state)``, negative.
        B, C: ``(batch, L, state)``.
        D: ``(channels,)``.
        chunk: steps per chunk (0: the default).

    Returns:
        y: ``(batch, L, channels)``.
    """
    if x.shape[1] == 0:
        return torch.zeros_like(x)
    with torch.autocast(x.device.type, enabled=False):
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        size = chunk or max(16, math.ceil(math.sqrt(x.shape[1])))
        y = _SelectiveScan.apply(*(t.to(compute_dtype) for t in (x, dt, A, B, C, D)), size)
    return y.to(x.dtype)


def _exponent_floor(dtype: torch.dtype) -> float:
    """Half the log of the smallest normal number of ``dtype``: a decay ``exp(e)`` with e at
    or above it, and the product of two such, is a normal number."""
    return math.log(torch.finfo(dtype).tiny) / 2


class _FlooredExp(torch.autograd.Function):
    """``exp(max(exponent, floor))`` with ``floor`` half the log of the dtype's smallest
    normal number (-43.7 in float32, -354 in float64), so that decay factors and products
    of two of them stay normal numbers. What the floor changes is below ``exp(floor)``
    times the decayed value (1e-19 relative in float32). The derivative is taken as the
    output, as for ``exp`` (no clamp mask, one multiplication in the backward)."""

    @staticmethod
    def forward(ctx, exponent: torch.Tensor) -> torch.Tensor:
        output = torch.exp(exponent.clamp(min=_exponent_floor(exponent.dtype)))
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        return grad_output * output


def _chunked(t: torch.Tensor, n_chunks: int, size: int) -> torch.Tensor:
    """``(batch, L, f)`` zero-padded to ``n_chunks * size`` steps, as ``(batch, n_chunks, size, f)``."""
    return F.pad(t, (0, 0, 0, n_chunks * size - t.shape[1])).unflatten(1, (n_chunks, size))


def _two_level_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, size: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(y ``(batch, L, channels)``, per position t of a chunk the state after that step in
    every chunk, ``(batch, n_chunks, channels, state)``) of :func:`selective_scan` of a
    non-empty sequence in chunks of ``size`` steps, all inputs in one dtype;
    differentiable. (Per-step tensors rather than one of all steps: a tensor that large
    is mapped fresh from the system at each call, and its page faults cost more than the
    steps' own products.)"""
    batch, length, channels = x.shape
    n_chunks = -(-length // size)
    x_c, dt_c, B_c, C_c = (_chunked(t, n_chunks, size) for t in (x, dt, B, C))
    dt_steps, B_steps = dt_c.unbind(2), B_c.unbind(2)
    drive_steps = (dt_c * x_c).unbind(2)
    state = x.new_zeros(batch, n_chunks, channels, A.shape[1])
    local_states, elapsed = [], []
    since_chunk_start = torch.zeros_like(dt_steps[0])
    for dt_t, drive_t, B_t in zip(dt_steps, drive_steps, B_steps):
        state = _FlooredExp.apply(dt_t.unsqueeze(-1) * A) * state + drive_t.unsqueeze(-1) * B_t.unsqueeze(-2)
        local_states.append(state)
        since_chunk_start = since_chunk_start + dt_t
        elapsed.append(since_chunk_start)
    chunk_decay = _FlooredExp.apply(dt_c.sum(dim=2).unsqueeze(-1) * A)
    entering = [torch.zeros_like(state[:, 0])]
    for decay_j, state_j in zip(chunk_decay.unbind(1)[:-1], state.unbind(1)[:-1]):
        entering.append(decay_j * entering[-1] + state_j)
    entering = torch.stack(entering, dim=1)
    states = [local + _FlooredExp.apply(e.unsqueeze(-1) * A) * entering for local, e in zip(local_states, elapsed)]
    y = torch.stack([(state * C_t.unsqueeze(-2)).sum(-1) for state, C_t in zip(states, C_c.unbind(2))], dim=2) + D * x_c
    return y.flatten(1, 2)[:, :length], states


def _two_level_scan_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    states: Sequence[torch.Tensor],
    needed: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, ddt, dA, dB, dC, dD) of :func:`_two_level_scan` from the states it returned;
    None for those ``needed`` says no to.

    The adjoint ``g_t = grad_y_t C_t + a_{t+1} g_{t+1}`` (``a_t = exp(dt_t A)``, floored
    as in the forward) is the forward's recurrence run backwards, in the same two levels:
    each chunk from a zero adjoint after its end, all chunks at once; the adjoint reaching
    each chunk from the next by a loop over chunks; each step adds that, decayed by
    ``exp(A * sum of dt after the step)``. Then ``dB_t = sum_d g_t dt_t x_t``,
    ``d(dt_t x_t) = sum_n g_t B_t``, ``dC_t = sum_d grad_y_t h_t``, and through ``a_t``
    ``q_t = g_t h_{t-1} a_t`` gives ``ddt_t += sum_n q_t A`` and ``dA = sum_t q_t dt_t``.
    """
    length = x.shape[1]
    n_chunks, size = states[0].shape[1], len(states)
    x_c, dt_c, B_c, C_c, grad_c = (_chunked(t, n_chunks, size) for t in (x, dt, B, C, grad_y))
    floor = _exponent_floor(x.dtype)
    decay = lambda exponent: exponent.clamp_(min=floor).exp_()
    step_decay = lambda t: decay(dt_c[:, :, t].unsqueeze(-1) * A)
    per_step = lambda equation, tensors, other: torch.stack(
        [torch.einsum(equation, tensor, other[:, :, t]) for t, tensor in enumerate(tensors)], dim=2
    ).flatten(1, 2)[:, :length]
    need_x, need_dt, need_A, need_B, need_C, need_D = needed
    grad_C = per_step("bcdn,bcd->bcn", states, grad_c) if need_C else None
    grad_D = (grad_c * x_c).sum(dim=(0, 1, 2)) if need_D else None
    if not (need_x or need_dt or need_A or need_B):
        return None, None, None, None, grad_C, grad_D
    adjoint = [None] * size
    for t in reversed(range(size)):
        adjoint[t] = grad_c[:, :, t].unsqueeze(-1) * C_c[:, :, t].unsqueeze(-2)
        if t < size - 1:
            adjoint[t].addcmul_(step_decay(t + 1), adjoint[t + 1])
    chunk_decay = decay(dt_c.sum(dim=2).unsqueeze(-1) * A)
    first_decay = step_decay(0)
    arriving = torch.zeros_like(states[0])
    for c in reversed(range(n_chunks - 1)):
        arriving[:, c] = first_decay[:, c + 1] * adjoint[0][:, c + 1] + chunk_decay[:, c + 1] * arriving[:, c + 1]
    after = torch.zeros_like(dt_c[:, :, 0])
    for t in reversed(range(size)):
        adjoint[t].addcmul_(decay(after.unsqueeze(-1) * A), arriving)
        after = after + dt_c[:, :, t]
    grad_B = per_step("bcdn,bcd->bcn", adjoint, dt_c * x_c) if need_B else None
    grad_drive = per_step("bcdn,bcn->bcd", adjoint, B_c)
    grad_x = grad_drive * dt + D * grad_y if need_x else None
    grad_dt, grad_A = _chunked(grad_drive * x, n_chunks, size), torch.zeros_like(A)
    if need_dt or need_A:
        previous = torch.cat([torch.zeros_like(states[-1][:, :1]), states[-1][:, :-1]], dim=1)
        for t in range(size):
            through_decay = step_decay(t).mul_(adjoint[t]).mul_(previous)
            grad_dt[:, :, t] += (through_decay * A).sum(-1)
            grad_A += torch.einsum("bcdn,bcd->dn", through_decay, dt_c[:, :, t])
            previous = states[t]
    return (
        grad_x,
        grad_dt.flatten(1, 2)[:, :length] if need_dt else None,
        grad_A if need_A else None,
        grad_B,
        grad_C,
        grad_D,
    )


class _SelectiveScan(torch.autograd.Function):
    """:func:`_two_level_scan` with the backward written out (:func:`_two_level_scan_backward`,
    from the saved states: autograd would keep every intermediate of every step). Where
    the backward is itself differentiated (``create_graph=True``), it runs autograd through
    the composite instead, so higher derivatives are exact."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        size: int,
    ) -> torch.Tensor:
        y, states = _two_level_scan(x, dt, A, B, C, D, size)
        ctx.save_for_backward(x, dt, A, B, C, D, *states)
        ctx.size = size
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, dt, A, B, C, D, *states = ctx.saved_tensors
        if torch.is_grad_enabled():
            scan = lambda *inputs: _two_level_scan(*inputs, ctx.size)[0]
            return composite_gradients(scan, (x, dt, A, B, C, D), ctx.needs_input_grad, grad_y) + (None,)
        return _two_level_scan_backward(grad_y, x, dt, A, B, C, D, states, ctx.needs_input_grad[:6]) + (None,)


def segment_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    index: SegmentIndex,
) -> torch.Tensor:
    """:func:`selective_scan` over each key set of ``index``, once per key set.

    Args:
        x, dt: ``(Bt, Tk, channels)`` packed key rows; B, C: ``(Bt, Tk, state)``.
        A, D: as in :func:`selective_scan`.

    Returns:
        ``(Bt, Tk, channels)``.
    """
    if use_triton(x) and index.n_keys:
        tables = selective_scan_tables(index)
        contiguous = [t.contiguous() for t in (x, dt, A, B, C, D)]
        y, _ = _selective_scan_op(*contiguous, *tables.tensors, tables.n_checkpoints, tables.chunk)
        return y
    return eager_selective_scan(x, dt, A, B, C, D, index)


def eager_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    index: SegmentIndex,
) -> torch.Tensor:
    """:func:`segment_selective_scan` in eager PyTorch: x, dt ``(Bt, Tk, channels)``, B, C
    ``(Bt, Tk, state)`` to ``(Bt, Tk, channels)``, each key-set bucket's padded batch through
    :func:`selective_scan`."""
    batches = []
    for bucket in index.keyset_buckets:
        fold = lambda t: bucket.keys.gather(t).flatten(0, 1)  # noqa: B023 (called in this iteration)
        batches.append(
            selective_scan(fold(x), fold(dt), A, fold(B), fold(C), D).unflatten(0, (x.shape[0], len(bucket.members)))
        )
    return index.assemble_keys(batches)
