"""Circular FFT convolution of packed segments with a frequency-domain filter.

:func:`segment_gated_fft_conv` gates and convolves in one step: it runs the Triton kernels of
``canvas_engineering.kernels.fftconv`` (the custom op ``canvas_engineering::gated_fft_conv``,
DFTs as matrix products, the sigmoid gate fused) where :func:`use_triton` says so and every
segment's FFT is at most ``MAX_KERNEL_LENGTH`` long, else the eager ``torch.fft`` version,
:func:`eager_gated_fft_conv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canvas_engineering.ops.backend import HAS_TRITON, use_triton
from canvas_engineering.ops.composite import composite_gradients
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex

MAX_KERNEL_LENGTH = 8192
"""Longest FFT the kernels run (the longest their sm_90 build is checked at); groups with a
longer segment run eagerly."""


def fft_length(n: int) -> int:
    """The FFT length for a sequence of n: the next power of two >= max(n, 2)."""
    return 1 << max(1, (n - 1).bit_length())


def _gated_circular_conv(
    mixed: torch.Tensor, gate_logits: torch.Tensor, response: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output ``(B, S, W, D)``, the gate, the spectrum of the gated input) of
    ``irfft(rfft(mixed * sigmoid(gate_logits), n=length) * response, n=length)[:W]`` along
    dim 2. The output is made row-major: torch.fft returns the transform dimension
    innermost, and elementwise products of that layout with row-major tensors run several
    times slower."""
    gate = torch.sigmoid(gate_logits)
    spectrum = torch.fft.rfft(mixed * gate, n=length, dim=2)
    out = torch.fft.irfft(spectrum * response, n=length, dim=2)[:, :, : mixed.shape[2]].contiguous()
    return out, gate, spectrum


class _GatedCircularConv(torch.autograd.Function):
    """:func:`_gated_circular_conv` with the backward written out: one forward FFT of the
    gradient and one inverse per call (autograd's version adds a full complex FFT and
    zero-fills for the padding and the cut).

    With G the spectrum of the gradient (zero-padded to L) and U that of the gated input,
    d gated input ``= irfft(G * conj(response), n=L)[:W]`` (the correlation with the filter;
    irfft drops the imaginary parts of bins 0 and L/2 in both directions) and d response
    ``= c_k / L * sum over batches of G * conj(U)`` with ``c_k = 1`` at bins 0 and L/2 and
    2 between (each interior bin stands for itself and its mirror). Where the backward is
    itself differentiated (``create_graph=True``), it runs autograd through the composite
    instead, so higher derivatives are exact.
    """

    @staticmethod
    def forward(
        ctx, mixed: torch.Tensor, gate_logits: torch.Tensor, response: torch.Tensor, length: int
    ) -> torch.Tensor:
        out, gate, spectrum = _gated_circular_conv(mixed, gate_logits, response, length)
        ctx.save_for_backward(mixed, gate_logits, response, gate, spectrum)
        ctx.length = length
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mixed, gate_logits, response, gate, spectrum = ctx.saved_tensors
        length = ctx.length
        if torch.is_grad_enabled():
            convolution = lambda *inputs: _gated_circular_conv(*inputs, length)[0]
            return composite_gradients(convolution, (mixed, gate_logits, response), ctx.needs_input_grad, grad) + (
                None,
            )
        grad_spectrum = torch.fft.rfft(grad, n=length, dim=2)
        d_gated = torch.fft.irfft(grad_spectrum * response.conj(), n=length, dim=2)[:, :, : mixed.shape[2]].contiguous()
        d_mixed = d_gated * gate
        d_gate_logits = d_mixed * mixed * (1 - gate) if ctx.needs_input_grad[1] else None
        d_response = None
        if ctx.needs_input_grad[2]:
            bin_weight = torch.full((response.shape[0], 1), 2.0 / length, dtype=gate.dtype, device=gate.device)
            bin_weight[[0, -1]] = 1.0 / length
            d_response = ((grad_spectrum * spectrum.conj()).sum(dim=(0, 1)) * bin_weight).to(response.dtype)
        return d_mixed, d_gate_logits, d_response, None


def eager_gated_fft_conv(
    mixed: torch.Tensor, gate_logits: torch.Tensor, response: torch.Tensor, index: SegmentIndex
) -> torch.Tensor:
    """Per segment of N rows: gate (``mixed * sigmoid(gate_logits)``), zero-pad to
    ``fft_length(N)``, multiply the spectrum by the filter's first ``fft_length(N) // 2 + 1``
    frequencies, invert, keep the first N rows; with torch.fft.

    Args:
        mixed, gate_logits: ``(B, Tq, D)`` packed query rows.
        response: ``(F, D)`` complex filter, ``F >= fft_length(max N) // 2 + 1``.
        index: the segments (all members of a bucket share one FFT length).

    Returns:
        ``(B, Tq, D)`` in the dtype of ``mixed``; float16 and bfloat16 inputs are transformed
        in float32 (torch.fft has no bfloat16 kernels, nor float16 ones on CPU).
    """
    if mixed.numel() == 0:
        return (mixed * gate_logits).clone()
    compute_dtype = torch.promote_types(mixed.dtype, torch.float32)
    mixed_c, gate_c = mixed.to(compute_dtype), gate_logits.to(compute_dtype)
    batches = []
    for bucket in index.segment_buckets:
        length = fft_length(bucket.queries.width)
        gathered = bucket.queries.gather(mixed_c, zero_padding=True), bucket.queries.gather(gate_c)
        batches.append(_GatedCircularConv.apply(*gathered, response[: length // 2 + 1], length))
    return index.assemble_queries(batches).to(mixed.dtype)


@torch.library.custom_op("canvas_engineering::gated_fft_conv", mutates_args=())
def _gated_fft_conv_op(
    mixed: torch.Tensor,
    gate_logits: torch.Tensor,
    spectrum: torch.Tensor,
    cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor,
    class_lengths: list[int],
    class_sizes: list[int],
) -> torch.Tensor:
    """The Triton convolution of ``mixed * sigmoid(gate_logits)`` with ``spectrum (F, D, 2)``."""
    from canvas_engineering.kernels.fftconv import fftconv_fwd

    return fftconv_fwd(mixed, gate_logits, spectrum.float(), cu_seqlens, class_segments, class_lengths, class_sizes)


@_gated_fft_conv_op.register_fake
def _(mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes):
    return torch.empty_like(mixed)


@torch.library.custom_op("canvas_engineering::gated_fft_conv_backward", mutates_args=())
def _gated_fft_conv_backward_op(
    grad: torch.Tensor,
    mixed: torch.Tensor,
    gate_logits: torch.Tensor,
    spectrum: torch.Tensor,
    cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor,
    class_lengths: list[int],
    class_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d mixed, d gate_logits, d spectrum) of the Triton convolution."""
    from canvas_engineering.kernels.fftconv import fftconv_bwd

    classes = (cu_seqlens, class_segments, class_lengths, class_sizes)
    d_mixed, d_gate, d_spectrum = fftconv_bwd(grad, mixed, gate_logits, spectrum.float(), *classes)
    return d_mixed, d_gate, d_spectrum.to(spectrum.dtype)


@_gated_fft_conv_backward_op.register_fake
def _(grad, mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes):
    return torch.empty_like(mixed), torch.empty_like(gate_logits), torch.empty_like(spectrum)


def _gated_fft_conv_setup_context(ctx, inputs, output) -> None:
    mixed, gate_logits, spectrum, cu_seqlens, class_segments, class_lengths, class_sizes = inputs
    ctx.save_for_backward(mixed, gate_logits, spectrum, cu_seqlens, class_segments)
    ctx.options = (class_lengths, class_sizes)


def _gated_fft_conv_backward(ctx, grad):
    mixed, gate_logits, spectrum, *tables = ctx.saved_tensors
    grads = _gated_fft_conv_backward_op(grad.contiguous(), mixed, gate_logits, spectrum, *tables, *ctx.options)
    return grads + (None,) * (len(tables) + len(ctx.options))


_gated_fft_conv_op.register_autograd(_gated_fft_conv_backward, setup_context=_gated_fft_conv_setup_context)


@dataclass(eq=False)
class GatedFftConvTables:
    """What the kernels need of a :class:`SegmentIndex`: int32 query offsets ``(S + 1,)``, the
    non-empty segments grouped by FFT length ``(S',)`` int32, each group's FFT length and size
    (Python lists, ascending lengths)."""

    cu_seqlens: torch.Tensor
    class_segments: torch.Tensor
    class_lengths: list[int]
    class_sizes: list[int]

    @staticmethod
    def build(index: SegmentIndex) -> GatedFftConvTables:
        classes: dict = {}
        for segment, n in enumerate(index.query_lengths):
            if n:
                classes.setdefault(fft_length(n), []).append(segment)
        order = sorted(classes)
        return GatedFftConvTables(
            index.int32_table(index.query_offsets),
            index.int32_table(s for length in order for s in classes[length]),
            order,
            [len(classes[length]) for length in order],
        )

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tables in the order the custom ops take them."""
        return (self.cu_seqlens, self.class_segments)


_tables = PerIndexCache()


def gated_fft_conv_tables(index: SegmentIndex) -> GatedFftConvTables:
    """The kernels' tables of ``index`` (cached)."""
    return _tables.get(index, lambda: GatedFftConvTables.build(index))


def prepare_gated_fft_conv(index: SegmentIndex) -> None:
    """Build ahead of a forward what :func:`segment_gated_fft_conv` derives from ``index``: the
    kernel tables, where Triton is installed."""
    if HAS_TRITON:
        gated_fft_conv_tables(index)


def segment_gated_fft_conv(
    mixed: torch.Tensor, gate_logits: torch.Tensor, response: torch.Tensor, index: SegmentIndex
) -> torch.Tensor:
    """:func:`eager_gated_fft_conv` (``mixed`` gated by ``sigmoid(gate_logits)``, then convolved).

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
    longest = fft_length(max(index.query_lengths, default=0))
    if response.shape[0] < longest // 2 + 1:
        raise ValueError(
            f"segment_gated_fft_conv: the filter needs {longest // 2 + 1} frequencies, got {response.shape[0]}"
        )
    if use_triton(mixed) and index.n_queries and longest <= MAX_KERNEL_LENGTH:
        spectrum = torch.view_as_real(response).contiguous()
        tables = gated_fft_conv_tables(index)
        classes = (tables.class_lengths, tables.class_sizes)
        return _gated_fft_conv_op(mixed.contiguous(), gate_logits.contiguous(), spectrum, *tables.tensors, *classes)
    return eager_gated_fft_conv(mixed, gate_logits, response, index)
