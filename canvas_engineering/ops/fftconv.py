"""Circular FFT convolution of packed segments with a frequency-domain filter.

:func:`segment_gated_fft_conv` gates and convolves in one step: it runs the Triton kernels of
``canvas_engineering.kernels.fftconv`` (the custom op ``canvas_engineering::gated_fft_conv``,
DFTs as matrix products, the sigmoid gate fused) where :func:`use_triton` says so and every
segment's FFT is at most ``MAX_KERNEL_LENGTH`` long, else the eager ``torch.fft`` version,
:func:`segment_fft_conv` of the gated input.
"""

from __future__ import annotations

from itertools import accumulate
from typing import List, Tuple

import torch

from canvas_engineering.ops.backend import use_triton
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex

MAX_KERNEL_LENGTH = 8192
"""Longest FFT the kernels run (the longest their sm_90 build is checked at); groups with a
longer segment run eagerly."""


def fft_length(n: int) -> int:
    """The FFT length for a sequence of n: the next power of two >= max(n, 2)."""
    return 1 << max(1, (n - 1).bit_length())


def segment_fft_conv(x: torch.Tensor, response: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
    """Per segment of N rows: zero-pad to ``fft_length(N)``, multiply the spectrum by the
    filter's first ``fft_length(N) // 2 + 1`` frequencies, invert, keep the first N rows.

    Args:
        x: ``(B, Tq, D)`` packed query rows.
        response: ``(F, D)`` complex filter, ``F >= fft_length(max N) // 2 + 1``.
        index: the segments (all members of a bucket share one FFT length).

    Returns:
        ``(B, Tq, D)`` in the dtype of ``x``; float16 and bfloat16 inputs are transformed in
        float32 (torch.fft has no bfloat16 kernels, nor float16 ones on CPU).
    """
    if x.numel() == 0:
        return x.clone()
    transformed = x.to(torch.promote_types(x.dtype, torch.float32))
    batches = []
    for bucket in index.segment_buckets:
        length = fft_length(bucket.queries.width)
        spectrum = torch.fft.rfft(bucket.queries.gather(transformed, zero_padding=True), n=length, dim=2)
        filtered = torch.fft.irfft(spectrum * response[: spectrum.shape[2]], n=length, dim=2)
        batches.append(filtered[:, :, : bucket.queries.width])
    return index.assemble_queries(batches).to(x.dtype)


@torch.library.custom_op("canvas_engineering::gated_fft_conv", mutates_args=())
def _gated_fft_conv_op(
    mixed: torch.Tensor, gate_logits: torch.Tensor, spectrum: torch.Tensor, cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor, class_lengths: List[int], class_sizes: List[int],
) -> torch.Tensor:
    """The Triton convolution of ``mixed * sigmoid(gate_logits)`` with ``spectrum (F, D, 2)``."""
    from canvas_engineering.kernels.fftconv import fftconv_fwd

    return fftconv_fwd(mixed, gate_logits, spectrum.float(), cu_seqlens, class_segments, class_lengths, class_sizes)


@_gated_fft_conv_op.register_fake
def _(mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes):
    return torch.empty_like(mixed)


@torch.library.custom_op("canvas_engineering::gated_fft_conv_backward", mutates_args=())
def _gated_fft_conv_backward_op(
    grad: torch.Tensor, mixed: torch.Tensor, gate_logits: torch.Tensor, spectrum: torch.Tensor, cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor, class_lengths: List[int], class_sizes: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d mixed, d gate_logits, d spectrum) of the Triton convolution."""
    from canvas_engineering.kernels.fftconv import fftconv_bwd

    classes = (cu_seqlens, class_segments, class_lengths, class_sizes)
    d_mixed, d_gate, d_spectrum = fftconv_bwd(grad, mixed, gate_logits, spectrum.float(), *classes)
    return d_mixed, d_gate, d_spectrum.to(spectrum.dtype)


@_gated_fft_conv_backward_op.register_fake
def _(grad, mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes):
    return torch.empty_like(mixed), torch.empty_like(gate_logits), torch.empty_like(spectrum)


def _setup_context(ctx, inputs, output) -> None:
    mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes = inputs
    ctx.save_for_backward(mixed, gate_logits, spectrum, cu_seqlens, class_segments)
    ctx.classes = (class_lengths, class_sizes)


def _backward(ctx, grad):
    mixed, gate_logits, spectrum, cu_seqlens, class_segments = ctx.saved_tensors
    grads = _gated_fft_conv_backward_op(grad.contiguous(), mixed, gate_logits, spectrum, cu_seqlens, class_segments, *ctx.classes)
    return grads + (None,) * 4


_gated_fft_conv_op.register_autograd(_backward, setup_context=_setup_context)
_tables = PerIndexCache()


def prepare_fft_conv(index: SegmentIndex) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]:
    """The kernels' tables of ``index``, built once: int32 query offsets ``(S + 1,)``, the
    non-empty segments grouped by FFT length ``(S',)`` int32, each group's FFT length and size."""

    def tables():
        device = index.query_segment.device
        lengths = [n for n, _ in index.shapes]
        classes: dict = {}
        for segment, n in enumerate(lengths):
            if n:
                classes.setdefault(fft_length(n), []).append(segment)
        order = sorted(classes)
        offsets = torch.tensor(list(accumulate(lengths, initial=0)), dtype=torch.int32, device=device)
        members = torch.tensor([s for length in order for s in classes[length]], dtype=torch.int32, device=device)
        return offsets, members, order, [len(classes[length]) for length in order]

    return _tables.get(index, tables)


def segment_gated_fft_conv(
    mixed: torch.Tensor, gate_logits: torch.Tensor, response: torch.Tensor, index: SegmentIndex
) -> torch.Tensor:
    """:func:`segment_fft_conv` of ``mixed * sigmoid(gate_logits)``.

    The Triton kernels (DFTs as matrix products; float32 inside, TF32 matrix products on a
    GPU) run for FFTs up to ``MAX_KERNEL_LENGTH``; a group with a longer segment runs the
    eager ``torch.fft`` version.

    Args:
        mixed, gate_logits: ``(B, Tq, D)`` packed query rows.
        response: ``(F, D)`` complex filter, ``F >= fft_length(max N) // 2 + 1``.
        index: the segments.

    Returns:
        ``(B, Tq, D)`` in the dtype of ``mixed``.
    """
    longest = fft_length(max([n for n, _ in index.shapes] + [0]))
    if response.shape[0] < longest // 2 + 1:
        raise ValueError(f"segment_gated_fft_conv: the filter needs {longest // 2 + 1} frequencies, got {response.shape[0]}")
    if use_triton(mixed) and index.n_queries and longest <= MAX_KERNEL_LENGTH:
        spectrum = torch.view_as_real(response).contiguous()
        return _gated_fft_conv_op(mixed.contiguous(), gate_logits.contiguous(), spectrum, *prepare_fft_conv(index))
    return segment_fft_conv(mixed * torch.sigmoid(gate_logits), response, index)
