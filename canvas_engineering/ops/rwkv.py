"""The RWKV WKV recurrence over the key sets of packed segments.

:func:`segment_wkv` runs the Triton scan of ``canvas_engineering.kernels.wkv`` (as the custom
op ``canvas_engineering::wkv``) where :func:`use_triton` says so, else :func:`eager_wkv`, the
chunked :func:`wkv_scan` of each key-set bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from canvas_engineering.kernels.constants import KEY_CLAMP
from canvas_engineering.ops.backend import HAS_TRITON, use_triton
from canvas_engineering.ops.segments import PerIndexCache, RowSelection, SegmentIndex


@torch.library.custom_op("canvas_engineering::wkv", mutates_args=())
def _wkv_op(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the parts' own sums) of the Triton WKV forward."""
    from canvas_engineering.kernels.wkv import wkv_fwd

    return wkv_fwd(k, v, w, u, cu_seqlens)


@_wkv_op.register_fake
def _(k, v, w, u, cu_seqlens):
    from canvas_engineering.kernels.wkv import part_state_shape

    return torch.empty_like(v), k.new_empty(part_state_shape(k, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("canvas_engineering::wkv_backward", mutates_args=())
def _wkv_backward_op(
    grad_y: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    part_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dk, dv, dw, du) of the Triton WKV backward."""
    from canvas_engineering.kernels.wkv import wkv_bwd

    return wkv_bwd(grad_y, k, v, w, u, part_state, cu_seqlens)


@_wkv_backward_op.register_fake
def _(grad_y, k, v, w, u, part_state, cu_seqlens):
    return (
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(w, dtype=torch.float32),
        torch.empty_like(w, dtype=torch.float32),
    )


def _wkv_setup_context(ctx, inputs, output) -> None:
    k, v, w, u, cu_seqlens = inputs
    ctx.save_for_backward(k, v, w, u, output[1], cu_seqlens)
    ctx.dtypes = (w.dtype, u.dtype)


def _wkv_backward(ctx, grad_y, grad_part_state):
    k, v, w, u, part_state, *tables = ctx.saved_tensors
    dk, dv, dw, du = _wkv_backward_op(grad_y.contiguous(), k, v, w, u, part_state, *tables)
    return (dk, dv, dw.to(ctx.dtypes[0]), du.to(ctx.dtypes[1])) + (None,) * len(tables)


_wkv_op.register_autograd(_wkv_backward, setup_context=_wkv_setup_context)


@dataclass(eq=False)
class WkvTables:
    """What the kernels need of a :class:`SegmentIndex` (int32): its key-set offsets
    ``(S_k + 1,)``, the scanned sequences."""

    cu_seqlens: torch.Tensor

    @staticmethod
    def build(index: SegmentIndex) -> WkvTables:
        return WkvTables(index.int32_table(index.keyset_offsets))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tables in the order the custom ops take them."""
        return (self.cu_seqlens,)


_tables = PerIndexCache()


def wkv_tables(scan: SegmentIndex) -> WkvTables:
    """The kernels' tables of the key sets of ``scan`` (cached)."""
    return _tables.get(scan, lambda: WkvTables.build(scan))


def wkv_scan(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, eps: float = 1e-6, chunk: int = 64
) -> torch.Tensor:
    """The WKV output at every step of each sequence.

    With ``e_s = exp(clamp(k_s, -10, 10))``, step t gives
    ``(sum_{s<t} exp((t-1-s) w) e_s v_s + exp(u) e_t v_t) / (sum_{s<t} exp((t-1-s) w) e_s + exp(u) e_t + eps)``.

    Computed channel-major (one row of chunks per channel) in chunks of ``chunk`` steps, all
    chunks at once: within a chunk the numerator and denominator sums are one batched product
    with the lower-triangular decay matrix ``exp((t-1-s) w)`` of each channel; the sums carried
    into each chunk come from a short loop over chunks. Every exponent of w is
    ``<= 0``, so nothing grows beyond the sums themselves (at most L * e^10), and the
    current step's ``exp(u + k_t)`` is divided out of the ratio when it exceeds 1, so a large
    bonus cannot overflow either. O(L * chunk) work per channel. Half-precision inputs are
    scanned in float32, outside any autocast region (whose half-precision products would
    round the sums carried from chunk to chunk), and the result is returned in v's dtype.

    Args:
        k, v: ``(batch, L, H, d)``.
        w: ``(H, d)`` log decay per step (negative); u: ``(H, d)`` bonus of the current step.

    Returns:
        ``(batch, L, H, d)``.
    """
    if k.shape[0] == 0 or k.shape[1] == 0:
        return torch.zeros_like(v)
    with torch.autocast(v.device.type, enabled=False):
        compute_dtype = torch.promote_types(v.dtype, torch.float32)
        out = _chunked_wkv(*(t.to(compute_dtype) for t in (k, v, w, u)), eps, chunk)
    return out.to(v.dtype)


def _chunked_wkv(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, eps: float, chunk: int
) -> torch.Tensor:
    """:func:`wkv_scan` of a non-empty batch of non-empty sequences, all inputs in one dtype."""
    batch, length, heads = k.shape[:3]
    size = min(chunk, length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    channels_first = lambda t: rearrange(F.pad(t, (0, 0, 0, 0, 0, pad)), "b (c s) h d -> (h d) (b c) s", s=size)
    k_c = channels_first(k.clamp(-KEY_CLAMP, KEY_CLAMP))
    v_c = channels_first(v)
    w_c = w.reshape(-1, 1)
    steps = torch.arange(size, device=k.device, dtype=w.dtype)
    lag = steps.view(-1, 1) - 1 - steps.view(1, -1)
    within = torch.exp(lag.clamp(min=0) * w_c.unsqueeze(-1)) * (lag >= 0).to(w.dtype)  # (hd, t, s)
    key_weight = torch.exp(k_c)
    both = torch.cat([key_weight * v_c, key_weight], dim=1)  # (hd, 2bc, s)
    to_end = torch.exp((size - 1 - steps) * w_c)  # (hd, s)
    chunk_sums = torch.bmm(both, to_end.unsqueeze(-1)).view(-1, 2 * batch, n_chunks)
    carry = torch.exp(size * w_c)
    carried = [torch.zeros_like(chunk_sums[:, :, 0])]
    for sums in chunk_sums.unbind(2)[:-1]:
        carried.append(carry * carried[-1] + sums)
    carried = torch.stack(carried, 2).view(-1, 2 * batch * n_chunks, 1)
    from_start = torch.exp(steps * w_c).unsqueeze(1)  # (hd, 1, t)
    past = torch.baddbmm(from_start * carried, both, within.transpose(1, 2))  # (hd, 2bc, t)
    past_numerator, past_denominator = past.chunk(2, dim=1)
    bonus = u.reshape(-1, 1, 1) + k_c
    shift = bonus.clamp(min=0).detach()
    current, rescale = torch.exp(bonus - shift), torch.exp(-shift)
    out = (past_numerator * rescale + current * v_c) / (past_denominator * rescale + current + eps * rescale)
    return rearrange(out, "(h d) (b c) s -> b (c s) h d", h=heads, b=batch)[:, :length]


def _steps_read(index: SegmentIndex) -> tuple[list[int], list[int]]:
    """(per key set, the steps anyone reads: the longest ``min(N, M)`` among the segments
    that read it; the packed key rows of those steps, key set after key set)."""
    needed = [0] * len(index.keyset_sizes)
    for (n, m), keyset in zip(index.shapes, index.keyset_of):
        needed[keyset] = max(needed[keyset], min(n, m))
    starts = index.keyset_offsets[:-1]
    return needed, [start + step for start, count in zip(starts, needed) for step in range(count)]


def _keys_read(index: SegmentIndex) -> tuple[RowSelection, SegmentIndex]:
    needed, read_rows = _steps_read(index)
    distinct, position = torch.unique(index.key_source.index[read_rows], return_inverse=True)
    rows = RowSelection.of(distinct.tolist())
    cut = SegmentIndex.build(
        index.query_lengths,
        index.keyset_of,
        needed,
        query_source=index.query_source.index.tolist(),
        key_source=position.tolist(),
    )
    device = index.query_segment.device
    return RowSelection(rows.index.to(device), rows.start), cut.to(device)


_reads = PerIndexCache()


def keys_read(index: SegmentIndex) -> tuple[RowSelection, SegmentIndex]:
    """(the rows of the op's key/value input that the WKV of ``index`` reads, once each and
    in order; ``index`` over just those rows, each key set cut to the steps anyone reads).

    A query at position i of a segment reads step ``min(i, M - 1)``, which the cut key set
    still holds, so :func:`segment_wkv` over the cut index gives the same outputs; a module
    projects only the rows it takes (``rows.take(key_input)``) instead of all M.
    """
    return _reads.get(index, lambda: _keys_read(index))


@dataclass(eq=False)
class WkvPlan:
    """How :func:`segment_wkv` runs over an index.

    A query at position i of a segment reads step ``min(i, M - 1)``, so a key set is scanned
    only up to the longest ``min(N, M)`` among the segments that read it.

    Attributes:
        scan: the key sets cut to the steps anyone reads (its packed key rows are rows of
            the op's packed key rows).
        bucket_rows: per key-set bucket of ``scan``, the packed key row behind each of its
            ``count * width`` slots.
        read: ``(Tq,)`` the packed row of ``scan`` each packed query row reads.
    """

    scan: SegmentIndex
    bucket_rows: list[torch.Tensor]
    read: torch.Tensor

    @staticmethod
    def build(index: SegmentIndex) -> WkvPlan:
        needed, read_rows = _steps_read(index)
        scan = SegmentIndex.build(index.query_lengths, index.keyset_of, needed, key_source=read_rows).to(
            index.query_segment.device
        )
        bucket_rows = [scan.key_source.index[bucket.keys.slots.index] for bucket in scan.keyset_buckets]
        read = scan.query_key_start + torch.minimum(index.query_offset, index.query_key_length - 1).clamp(min=0)
        return WkvPlan(scan, bucket_rows, read)


def _gather_rows(packed: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """``packed (B, T, H, d)`` at ``rows`` (``count * width`` of them) as ``(B * count, width, H, d)``.

    ``torch.gather``, not ``index_select``, whose backward CPU inductor miscompiles here
    (torch 2.13; docs/notes.md).
    """
    index = rows.view(1, -1, 1, 1).expand(packed.shape[0], -1, *packed.shape[2:])
    return torch.gather(packed, 1, index).unflatten(1, (count, -1)).flatten(0, 1)


_plans = PerIndexCache()


def wkv_plan(index: SegmentIndex) -> WkvPlan:
    """The plan of :func:`segment_wkv` over ``index`` (cached)."""
    return _plans.get(index, lambda: WkvPlan.build(index))


def prepare_wkv(index: SegmentIndex) -> None:
    """Build ahead of a forward what :func:`segment_wkv` derives from ``index``: its plan, and
    where Triton is installed the kernel tables."""
    plan = wkv_plan(index)
    if HAS_TRITON:
        wkv_tables(plan.scan)


def eager_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, plan: WkvPlan) -> torch.Tensor:
    """What the custom op computes, in eager PyTorch: the WKV of every key set of
    ``plan.scan``, k, v ``(B, Tk, H, d)`` packed key rows to ``(B, T_scan, H, d)`` packed rows
    of ``plan.scan``; w, u ``(H, d)``."""
    return plan.scan.assemble_keys(
        [
            wkv_scan(
                _gather_rows(k, rows, len(bucket.members)), _gather_rows(v, rows, len(bucket.members)), w, u
            ).unflatten(0, (k.shape[0], len(bucket.members)))
            for bucket, rows in zip(plan.scan.keyset_buckets, plan.bucket_rows)
        ]
    )


def segment_wkv(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, index: SegmentIndex
) -> torch.Tensor:
    """WKV over each key set, read by each query row at step ``min(i, M - 1)``.

    Args:
        k, v: ``(B, Tk, H, d)`` packed key rows.
        w, u: ``(H, d)`` decay and bonus.
        index: the segments; each key set is scanned once, whatever reads it, and only as far
            as anyone reads.

    Returns:
        ``(B, Tq, H, d)``; zeros for queries whose key set is empty.
    """
    plan = wkv_plan(index)
    if plan.scan.n_keys == 0:
        return v.new_zeros(v.shape[:1] + (index.n_queries,) + v.shape[2:])
    if use_triton(k):
        packed_k, packed_v = plan.scan.pack_keys(k).contiguous(), plan.scan.pack_keys(v).contiguous()
        scanned, _ = _wkv_op(packed_k, packed_v, w, u, *wkv_tables(plan.scan).tensors)
    else:
        scanned = eager_wkv(k, v, w, u, plan)
    has_keys = (index.query_key_length > 0).view(1, -1, 1, 1).to(v.dtype)
    return torch.index_select(scanned, 1, plan.read) * has_keys
