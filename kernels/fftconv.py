"""Gated FFT long convolution of packed segments, forward and backward, with the DFTs as
matrix products (``tl.dot``).

Layout: ``mixed`` and ``gate`` ``(B, T, D)`` packed segment after segment (segment ``s``
owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``), all contiguous; the filter ``spectrum``
``(F, D, 2)`` float32 holds (real, imaginary) of ``H_k`` for ``k < F``. Per segment of N rows,
batch row and channel, with ``x = mixed * sigmoid(gate)`` and ``L`` a power of two >= N:

    y[n] = (1/L) Re sum_k exp(2 pi i n k / L) H_k X_k,   X_k = sum_{m<N} exp(-2 pi i m k / L) x[m],

for n < N, where ``H_{L-k} = conj(H_k)`` gives the frequencies above L/2 and the imaginary
parts of ``H_0`` and ``H_{L/2}`` drop out (as in ``irfft``). The backward pass runs the same
transforms on ``dy``: ``dx`` is the inverse transform of ``DY conj(H)``, and the filter
gradient at ``k <= L/2`` is ``c_k / L * DY_k conj(X_k)`` summed over batch rows and segments
(``c_k = 1`` at 0 and L/2, else 2), written per (batch row, segment) and summed by the
launcher, so the result does not depend on scheduling.

Segments are launched by class: all segments of one FFT length L share a launch.
- ``L <= DENSE_MAX``: one program per (segment, channel block, batch row) holds the
  ``(L, BLOCK_C)`` tile and multiplies it by the ``L x L`` DFT matrix (padded to 16 rows).
- Larger L, ``L = COLS * ROWS`` (:func:`factors`; ``ROWS >= 16``): a Cooley-Tukey
  factorisation in three passes. With ``n = n1 + COLS n2`` and ``k = k2 + ROWS k1``,
  pass 1: ``A[n1, k2] = w^(n1 k2) sum_n2 W_ROWS[k2, n2] x[n1 + COLS n2]``,
  pass 2: ``X = W_COLS A`` along n1 gives ``X[k2 + ROWS k1]``; multiply by H (or form the
  filter gradient and ``DY conj(H)``); the inverse ``B[n1, k2] = w^(-n1 k2) conj(W_COLS) Y``,
  pass 3: ``y[n1 + COLS n2] = (1/L) Re sum_k2 conj(W_ROWS)[n2, k2] B[n1, k2]``,
  with ``w = exp(-2 pi i / L)``.
- ``L <= FUSED_MAX`` with both factors >= 16 (:func:`fused`: L = 256): one program per
  (segment, channel block of 8, batch row) runs the three passes in registers, with no
  buffer: it holds the signal tile ``(ROWS, BLOCK_C * COLS)`` (``[n2, c * COLS + n1]``), so
  pass 1 is one product with ``W_ROWS`` from the left; the same values read as ``(ROWS *
  BLOCK_C, COLS)`` (``[k2 * BLOCK_C + c, n1]``: a reshape in the same element order, no
  transposition) make pass 2 one complex product with ``W_COLS`` from the right (the DFT
  matrices are symmetric), and the inverse retraces both. The backward transforms dy and x in the same program.
- Longer L (and L = 128, whose COLS = 8 is below ``tl.dot``'s 16): one launch per pass,
  through a pass buffer (``(2, B, S, L, D)``: real and imaginary parts, in the products'
  operand type, since every pass reads its predecessor's output only as ``tl.dot``
  operands). Passes 1 and 3 run one program per n1 and loop over the ``ROWS x ROWS`` DFT
  matrix in blocks of ``BLOCK_K`` columns; pass 2 runs one program per k2 and holds the
  ``COLS x COLS`` one, padded to ``BLOCK_COLS >= 16`` rows.
The DFT matrices come from :func:`dft_matrix` (``(2, P, P)``: cos and -sin, zero-padded to P,
stored in the products' operand type, :func:`operand_dtype`); the twiddle factors
``w^(n1 k2)`` from :func:`twiddle_table` (float32, computed in float64 on the host, so no
kernel evaluates a sine).
Every matrix product takes its operands in ``DOT`` (:mod:`.operands`): for bf16 inputs on the
GPU the DFT matrices and the transforms enter the tensor cores rounded to bf16 (float32
accumulators; the pass buffers hold the bf16 operands, rounded to nearest even as the
products' own conversion would round them, so storing them as bf16 changes no result and
halves their traffic), for float32 inputs they stay float32 (TF32; float32 pass buffers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
import triton
import triton.language as tl

from .buffers import new_output
from .operands import dot_dtype

DENSE_MAX = 64
"""Longest FFT run as one dense DFT per program; longer ones use the three passes."""
FUSED_MAX = 256
"""Longest FFT whose three passes run in one program (:func:`fused`); longer ones go through
the pass buffer."""
BLOCK_K = 16
"""Columns of the ``ROWS x ROWS`` DFT matrix that passes 1 and 3 multiply at a time."""
TWO_PI = 2.0 * math.pi


@triton.jit
def _gated(MIXED, GATE, offsets, mask, GATED: tl.constexpr):
    """``mixed * sigmoid(gate)`` (or ``mixed`` alone) at ``offsets``, in float32, 0 outside ``mask``."""
    x = tl.load(MIXED + offsets, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        x = x * tl.sigmoid(tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32))
    return x


@triton.jit
def _filter(SPECTRUM, frequencies, channels, n_channels, mask, LENGTH: tl.constexpr):
    """(real, imaginary) of the filter at ``frequencies`` of an FFT of LENGTH and ``channels``
    (broadcast together, to the shape of the result), the upper half read as the conjugate of
    the lower half."""
    mirrored = frequencies > LENGTH // 2
    stored = tl.where(mirrored, LENGTH - frequencies, frequencies)
    offsets = (stored * n_channels + channels) * 2
    real = tl.load(SPECTRUM + offsets, mask=mask, other=0.0)
    imag = tl.load(SPECTRUM + offsets + 1, mask=mask, other=0.0)
    return real, tl.where(mirrored, -imag, imag)


@triton.jit
def _store_filter_gradient(
    PARTIAL,
    slot,
    frequencies,
    channels,
    n_channels,
    c_mask,
    gr,
    gi,
    xr,
    xi,
    LENGTH: tl.constexpr,
):
    """``c_k / L * G conj(X)`` at the ``frequencies <= L/2`` into the partial sum ``slot``
    (``(L/2 + 1, D, 2)`` floats per slot); ``frequencies``, ``channels`` and ``c_mask``
    broadcast to the shape of G and X."""
    weight = tl.where((frequencies == 0) | (frequencies == LENGTH // 2), 1.0, 2.0) / LENGTH
    offsets = ((slot * (LENGTH // 2 + 1) + frequencies) * n_channels + channels) * 2
    mask = (frequencies <= LENGTH // 2) & c_mask
    tl.store(PARTIAL + offsets, (gr * xr + gi * xi) * weight, mask=mask)
    tl.store(PARTIAL + offsets + 1, (gi * xr - gr * xi) * weight, mask=mask)


@triton.jit
def _store_input_gradients(DMIXED, DGATE, offsets, mask, dx, mixed, gate):
    """The gate's chain rule: ``dx * s`` and ``dx * mixed * s * (1 - s)`` at ``offsets``, with
    ``dx`` the gradient of the gated input and ``s = sigmoid(gate logits)``."""
    tl.store(DMIXED + offsets, (dx * gate).to(DMIXED.dtype.element_ty), mask=mask)
    tl.store(DGATE + offsets, (dx * mixed * gate * (1.0 - gate)).to(DGATE.dtype.element_ty), mask=mask)


@triton.jit
def _product(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` with the operands in DOT."""
    return tl.dot(a.to(DOT), b.to(DOT), acc)


@triton.jit
def _complex_matmul(ar, ai, br, bi, CONJUGATE: tl.constexpr, DOT: tl.constexpr):
    """``a @ b`` for complex ``a (M, K)`` and ``b (K, N)`` given as (real, imaginary) parts;
    ``conj(a) @ b`` when CONJUGATE."""
    zeros = tl.zeros([ar.shape[0], br.shape[1]], dtype=tl.float32)
    if CONJUGATE:
        ai = -ai
    real = _product(ar, br, _product(-ai, bi, zeros, DOT), DOT)
    imag = _product(ar, bi, _product(ai, br, zeros, DOT), DOT)
    return real, imag


@triton.jit
def _twiddle(real, imag, TWIDDLE, n1, k2, SIGN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``(real + i imag) * exp(SIGN * 2 pi i n1 k2 / (ROWS COLS))`` elementwise (``n1 < COLS``
    and ``k2 < ROWS`` broadcast), the factors read from TWIDDLE (:func:`twiddle_table`)."""
    at = k2 * COLS + n1
    cos = tl.load(TWIDDLE + at)
    sin = tl.load(TWIDDLE + ROWS * COLS + at) * SIGN
    return real * cos - imag * sin, real * sin + imag * cos


@triton.jit
def _segment(cu_seqlens, class_segments, index, n_segments):
    """(first packed row, length, total packed rows) of the class's segment ``index``."""
    segment = tl.load(class_segments + index)
    begin = tl.load(cu_seqlens + segment).to(tl.int64)
    length = tl.load(cu_seqlens + segment + 1) - begin
    total = tl.load(cu_seqlens + n_segments).to(tl.int64)
    return begin, length, total


@triton.jit
def _dense_program(
    DFT, cu_seqlens, class_segments, n_segments, n_channels, PADDED: tl.constexpr, BLOCK_C: tl.constexpr
):
    """What a dense-DFT program works on: its row ``b * n_class + segment`` of the
    per-segment partials; the rows 0..PADDED-1 of its segment; its channels and their mask;
    the offsets ``(PADDED, BLOCK_C)`` of its tile and their mask; the (real, imaginary)
    PADDED-point DFT matrix; a zero accumulator."""
    index = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    begin, length, total = _segment(cu_seqlens, class_segments, index, n_segments)
    rows = tl.arange(0, PADDED)
    c_mask = channels < n_channels
    offsets = ((b * total + begin + rows) * n_channels)[:, None] + channels[None, :]
    mask = (rows < length)[:, None] & c_mask[None, :]
    matrix = rows[:, None] * PADDED + rows[None, :]
    fr = tl.load(DFT + matrix)
    fi = tl.load(DFT + PADDED * PADDED + matrix)
    zeros = tl.zeros([PADDED, BLOCK_C], dtype=tl.float32)
    return b * tl.num_programs(0) + index, rows, channels, c_mask, offsets, mask, fr, fi, zeros


@triton.jit
def fftconv_dense_fwd_kernel(
    MIXED,
    GATE,
    SPECTRUM,
    DFT,
    Y,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    PADDED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """y of one segment and channel block: ``X = W x``, ``y = (1/L) Re(conj(W) (H X))``."""
    segment_row, rows, channels, c_mask, offsets, mask, fr, fi, zeros = _dense_program(
        DFT, cu_seqlens, class_segments, n_segments, n_channels, PADDED, BLOCK_C
    )
    x = _gated(MIXED, GATE, offsets, mask, True)
    xr = _product(fr, x, zeros, DOT)
    xi = _product(fi, x, zeros, DOT)
    hr, hi = _filter(
        SPECTRUM, rows[:, None], channels[None, :], n_channels, (rows < LENGTH)[:, None] & c_mask[None, :], LENGTH
    )
    y = _product(fr, xr * hr - xi * hi, _product(fi, xr * hi + xi * hr, zeros, DOT), DOT) / LENGTH
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def fftconv_dense_bwd_kernel(
    GRAD,
    MIXED,
    GATE,
    SPECTRUM,
    DFT,
    DMIXED,
    DGATE,
    DSPECTRUM_PARTIAL,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    PADDED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """Gradients of one segment and channel block: ``G = W dy`` and ``X = W x`` give the
    filter gradient's share; ``dx = (1/L) Re(conj(W) (conj(H) G))``, then the gate's chain rule."""
    segment_row, rows, channels, c_mask, offsets, mask, fr, fi, zeros = _dense_program(
        DFT, cu_seqlens, class_segments, n_segments, n_channels, PADDED, BLOCK_C
    )
    grad = tl.load(GRAD + offsets, mask=mask, other=0.0).to(tl.float32)
    mixed = tl.load(MIXED + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.sigmoid(tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32))
    gr = _product(fr, grad, zeros, DOT)
    gi = _product(fi, grad, zeros, DOT)
    xr = _product(fr, mixed * gate, zeros, DOT)
    xi = _product(fi, mixed * gate, zeros, DOT)
    _store_filter_gradient(
        DSPECTRUM_PARTIAL,
        segment_row,
        rows[:, None],
        channels[None, :],
        n_channels,
        c_mask[None, :],
        gr,
        gi,
        xr,
        xi,
        LENGTH,
    )
    hr, hi = _filter(
        SPECTRUM, rows[:, None], channels[None, :], n_channels, (rows < LENGTH)[:, None] & c_mask[None, :], LENGTH
    )
    dx = _product(fr, gr * hr + gi * hi, _product(fi, gi * hr - gr * hi, zeros, DOT), DOT) / LENGTH
    _store_input_gradients(DMIXED, DGATE, offsets, mask, dx, mixed, gate)


@triton.jit
def _dft(TABLE, SIZE: tl.constexpr):
    """(real, imaginary) ``(SIZE, SIZE)`` of a DFT matrix from :func:`dft_matrix`."""
    k = tl.arange(0, SIZE)
    matrix = k[:, None] * SIZE + k[None, :]
    return tl.load(TABLE + matrix), tl.load(TABLE + SIZE * SIZE + matrix)


@triton.jit
def _fused_program(
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """What a fused program works on: its row ``b * n_class + segment`` of the per-segment
    partials; the offset of its segment's first row (int64) and, from there, the offsets
    (int32) and mask of its signal tile ``(ROWS, BLOCK_C * COLS)``, whose ``[n2, c * COLS +
    n1]`` is row ``n1 + COLS n2`` of channel c; the frequency ``k2 + ROWS k1`` of each
    element ``[k2 * BLOCK_C + c, k1]`` of its spectrum tile ``(ROWS * BLOCK_C, COLS)``, with
    that element's channel and channel mask."""
    index = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    first = tl.program_id(1) * BLOCK_C
    begin, length, total = _segment(cu_seqlens, class_segments, index, n_segments)
    column = tl.arange(0, BLOCK_C * COLS)
    t = tl.arange(0, ROWS)[:, None] * COLS + (column % COLS)[None, :]
    channels = first + column // COLS
    tile = t * n_channels + channels[None, :]
    mask = (t < length) & (channels < n_channels)[None, :]
    spectral = tl.arange(0, ROWS * BLOCK_C)
    frequencies = (spectral // BLOCK_C)[:, None] + ROWS * tl.arange(0, COLS)[None, :]
    spectral_channels = (first + spectral % BLOCK_C)[:, None]
    return (
        b * tl.num_programs(0) + index,
        (b * total + begin) * n_channels,
        tile,
        mask,
        frequencies,
        spectral_channels,
        spectral_channels < n_channels,
    )


@triton.jit
def _fused_spectrum(
    x,
    DFT_ROWS,
    DFT_COLS,
    TWIDDLE,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """(real, imaginary) spectrum tile of the signal tile ``x`` (layouts of
    :func:`_fused_program`): pass 1 as one product from the left, the twiddle, pass 2 as one
    complex product from the right (the DFT matrices are symmetric)."""
    rows_r, rows_i = _dft(DFT_ROWS, ROWS)
    zeros = tl.zeros([ROWS, BLOCK_C * COLS], dtype=tl.float32)
    n1 = tl.arange(0, BLOCK_C * COLS) % COLS
    ar, ai = _twiddle(
        _product(rows_r, x, zeros, DOT),
        _product(rows_i, x, zeros, DOT),
        TWIDDLE,
        n1[None, :],
        tl.arange(0, ROWS)[:, None],
        -1.0,
        ROWS,
        COLS,
    )
    shape: tl.constexpr = (ROWS * BLOCK_C, COLS)
    cols_r, cols_i = _dft(DFT_COLS, COLS)
    return _complex_matmul(tl.reshape(ar, shape), tl.reshape(ai, shape), cols_r, cols_i, False, DOT)


@triton.jit
def _fused_inverse(
    yr,
    yi,
    DFT_ROWS,
    DFT_COLS,
    TWIDDLE,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """``(1/L) Re`` of the inverse transform of the spectrum tile ``(yr, yi)``, as a signal
    tile (layouts of :func:`_fused_program`): the inverse of pass 2, the twiddle, pass 3."""
    cols_r, cols_i = _dft(DFT_COLS, COLS)
    br, bi = _complex_matmul(yr, yi, cols_r, -cols_i, False, DOT)
    k2 = tl.arange(0, ROWS * BLOCK_C) // BLOCK_C
    br, bi = _twiddle(br, bi, TWIDDLE, tl.arange(0, COLS)[None, :], k2[:, None], 1.0, ROWS, COLS)
    shape: tl.constexpr = (ROWS, BLOCK_C * COLS)
    zeros = tl.zeros(shape, dtype=tl.float32)
    rows_r, rows_i = _dft(DFT_ROWS, ROWS)
    acc = _product(rows_i, tl.reshape(bi, shape), zeros, DOT)
    return _product(rows_r, tl.reshape(br, shape), acc, DOT) / LENGTH


@triton.jit
def fftconv_fused_fwd_kernel(
    MIXED,
    GATE,
    SPECTRUM,
    DFT_ROWS,
    DFT_COLS,
    TWIDDLE,
    Y,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """y of one segment and channel block, the three passes in registers."""
    segment_row, base, tile, mask, frequencies, channels, c_mask = _fused_program(
        cu_seqlens, class_segments, n_segments, n_channels, ROWS, COLS, BLOCK_C
    )
    x = _gated(MIXED + base, GATE + base, tile, mask, True)
    xr, xi = _fused_spectrum(x, DFT_ROWS, DFT_COLS, TWIDDLE, LENGTH, ROWS, COLS, BLOCK_C, DOT)
    hr, hi = _filter(SPECTRUM, frequencies, channels, n_channels, c_mask, LENGTH)
    y = _fused_inverse(
        xr * hr - xi * hi, xr * hi + xi * hr, DFT_ROWS, DFT_COLS, TWIDDLE, LENGTH, ROWS, COLS, BLOCK_C, DOT
    )
    tl.store(Y + base + tile, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def fftconv_fused_bwd_kernel(
    GRAD,
    MIXED,
    GATE,
    SPECTRUM,
    DFT_ROWS,
    DFT_COLS,
    TWIDDLE,
    DMIXED,
    DGATE,
    DSPECTRUM_PARTIAL,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """Gradients of one segment and channel block, the three passes in registers: the
    spectra of dy and x give the filter gradient's share; dx is the inverse transform of
    ``DY conj(H)``, then the gate's chain rule."""
    segment_row, base, tile, mask, frequencies, channels, c_mask = _fused_program(
        cu_seqlens, class_segments, n_segments, n_channels, ROWS, COLS, BLOCK_C
    )
    grad = tl.load(GRAD + base + tile, mask=mask, other=0.0).to(tl.float32)
    gr, gi = _fused_spectrum(grad, DFT_ROWS, DFT_COLS, TWIDDLE, LENGTH, ROWS, COLS, BLOCK_C, DOT)
    x = _gated(MIXED + base, GATE + base, tile, mask, True)
    xr, xi = _fused_spectrum(x, DFT_ROWS, DFT_COLS, TWIDDLE, LENGTH, ROWS, COLS, BLOCK_C, DOT)
    _store_filter_gradient(
        DSPECTRUM_PARTIAL, segment_row, frequencies, channels, n_channels, c_mask, gr, gi, xr, xi, LENGTH
    )
    hr, hi = _filter(SPECTRUM, frequencies, channels, n_channels, c_mask, LENGTH)
    dx = _fused_inverse(
        gr * hr + gi * hi, gi * hr - gr * hi, DFT_ROWS, DFT_COLS, TWIDDLE, LENGTH, ROWS, COLS, BLOCK_C, DOT
    )
    mixed = tl.load(MIXED + base + tile, mask=mask, other=0.0).to(tl.float32)
    gate = tl.sigmoid(tl.load(GATE + base + tile, mask=mask, other=0.0).to(tl.float32))
    _store_input_gradients(DMIXED + base, DGATE + base, tile, mask, dx, mixed, gate)


@triton.jit
def fftconv_rows_kernel(
    MIXED,
    GATE,
    DFT_ROWS,
    TWIDDLE,
    TRANSFORM,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GATED: tl.constexpr,
    DOT: tl.constexpr,
):
    """Pass 1 for one n1: ``A[n1, k2]`` for every k2 (x is ``mixed * sigmoid(gate)`` when
    GATED, else ``mixed``)."""
    index = tl.program_id(0) // COLS
    n1 = tl.program_id(0) % COLS
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    begin, length, total = _segment(cu_seqlens, class_segments, index, n_segments)
    c_mask = channels < n_channels
    k2 = tl.arange(0, ROWS)
    acc_r = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_i = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for start in range(0, tl.cdiv(tl.maximum(length - n1, 0), COLS), BLOCK_K):
        n2 = start + tl.arange(0, BLOCK_K)
        t = n1 + COLS * n2
        offsets = ((b * total + begin + t) * n_channels)[:, None] + channels[None, :]
        x = _gated(MIXED, GATE, offsets, (t < length)[:, None] & c_mask[None, :], GATED)
        matrix = k2[:, None] * ROWS + n2[None, :]
        acc_r = _product(tl.load(DFT_ROWS + matrix), x, acc_r, DOT)
        acc_i = _product(tl.load(DFT_ROWS + ROWS * ROWS + matrix), x, acc_i, DOT)
    ar, ai = _twiddle(acc_r, acc_i, TWIDDLE, n1, k2[:, None], -1.0, ROWS, COLS)
    n_class = tl.num_programs(0) // COLS
    half = tl.num_programs(2).to(tl.int64) * n_class * LENGTH * n_channels
    place = ((b * n_class + index) * LENGTH + n1 * ROWS + k2) * n_channels
    offsets = place[:, None] + channels[None, :]
    _store_column(TRANSFORM, offsets, half, c_mask[None, :], ar, ai)


@triton.jit
def _store_column(TRANSFORM, offsets, half, mask, real, imag):
    """``real`` and ``imag`` at ``offsets`` of a pass buffer whose halves are ``half`` apart, rounded
    to its dtype (the products' operand type; the next pass reads them only as ``tl.dot`` operands)."""
    tl.store(TRANSFORM + offsets, real.to(TRANSFORM.dtype.element_ty), mask=mask)
    tl.store(TRANSFORM + half + offsets, imag.to(TRANSFORM.dtype.element_ty), mask=mask)


@triton.jit
def _load_column(TRANSFORM, offsets, half, mask):
    """(real, imaginary) parts at ``offsets`` of a pass buffer whose halves are ``half`` apart."""
    return tl.load(TRANSFORM + offsets, mask=mask, other=0.0), tl.load(TRANSFORM + half + offsets, mask=mask, other=0.0)


@triton.jit
def _column_program(
    DFT_COLS,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """What a pass-2 program works on: its k2; the n1 of its column (``BLOCK_COLS`` of them:
    past COLS, the padding, where the zero rows of the padded DFT matrix make every product
    zero, so that the twiddle may take any factor there, ``n1 % COLS``'s); its channels and
    their mask; its row ``b * n_class + segment`` of the per-segment partials; the pass
    buffer's offsets ``(BLOCK_COLS, BLOCK_C)`` of its column, their mask and the distance to
    the imaginary half; the (real, imaginary) COLS-point DFT matrix."""
    index = tl.program_id(0) // ROWS
    k2 = tl.program_id(0) % ROWS
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    c_mask = channels < n_channels
    n1 = tl.arange(0, BLOCK_COLS)
    n_class = tl.num_programs(0) // ROWS
    half = tl.num_programs(2).to(tl.int64) * n_class * LENGTH * n_channels
    place = ((b * n_class + index) * LENGTH + n1 * ROWS + k2) * n_channels
    offsets = place[:, None] + channels[None, :]
    mask = c_mask[None, :] & (n1 < COLS)[:, None]
    matrix = n1[:, None] * BLOCK_COLS + n1[None, :]
    fr = tl.load(DFT_COLS + matrix)
    fi = tl.load(DFT_COLS + BLOCK_COLS * BLOCK_COLS + matrix)
    return k2, n1, channels, c_mask, b * n_class + index, offsets, mask, half, fr, fi


@triton.jit
def fftconv_columns_fwd_kernel(
    TRANSFORM,
    SPECTRUM,
    DFT_COLS,
    TWIDDLE,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """Pass 2 of the forward for one k2: transform along n1, multiply by H, transform back;
    the result replaces the column in TRANSFORM (each stored value depends, through the matrix
    products, on every value the program loaded)."""
    k2, n1, channels, c_mask, segment_row, offsets, mask, half, fr, fi = _column_program(
        DFT_COLS, n_channels, LENGTH, ROWS, COLS, BLOCK_COLS, BLOCK_C
    )
    ar, ai = _load_column(TRANSFORM, offsets, half, mask)
    xr, xi = _complex_matmul(fr, fi, ar, ai, False, DOT)
    hr, hi = _filter(SPECTRUM, (k2 + ROWS * n1)[:, None], channels[None, :], n_channels, mask, LENGTH)
    br, bi = _complex_matmul(fr, fi, xr * hr - xi * hi, xr * hi + xi * hr, True, DOT)
    br, bi = _twiddle(br, bi, TWIDDLE, (n1 % COLS)[:, None], k2, 1.0, ROWS, COLS)
    _store_column(TRANSFORM, offsets, half, mask, br, bi)


@triton.jit
def fftconv_columns_bwd_kernel(
    TRANSFORM,
    TRANSFORM_X,
    SPECTRUM,
    DFT_COLS,
    TWIDDLE,
    DSPECTRUM_PARTIAL,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT: tl.constexpr,
):
    """Pass 2 of the backward for one k2: transform both columns (of dy in TRANSFORM, of x in
    TRANSFORM_X) along n1, write the filter gradient, transform ``DY conj(H)`` back into TRANSFORM."""
    k2, n1, channels, c_mask, segment_row, offsets, mask, half, fr, fi = _column_program(
        DFT_COLS, n_channels, LENGTH, ROWS, COLS, BLOCK_COLS, BLOCK_C
    )
    ar, ai = _load_column(TRANSFORM, offsets, half, mask)
    gr, gi = _complex_matmul(fr, fi, ar, ai, False, DOT)
    ar, ai = _load_column(TRANSFORM_X, offsets, half, mask)
    xr, xi = _complex_matmul(fr, fi, ar, ai, False, DOT)
    frequencies = (k2 + ROWS * n1)[:, None]
    _store_filter_gradient(
        DSPECTRUM_PARTIAL,
        segment_row,
        frequencies,
        channels[None, :],
        n_channels,
        c_mask[None, :],
        gr,
        gi,
        xr,
        xi,
        LENGTH,
    )
    hr, hi = _filter(SPECTRUM, frequencies, channels[None, :], n_channels, mask, LENGTH)
    br, bi = _complex_matmul(fr, fi, gr * hr + gi * hi, gi * hr - gr * hi, True, DOT)
    br, bi = _twiddle(br, bi, TWIDDLE, (n1 % COLS)[:, None], k2, 1.0, ROWS, COLS)
    _store_column(TRANSFORM, offsets, half, mask, br, bi)


@triton.jit
def fftconv_inverse_rows_kernel(
    TRANSFORM,
    DFT_ROWS,
    MIXED,
    GATE,
    OUT,
    DGATE,
    cu_seqlens,
    class_segments,
    n_segments,
    n_channels,
    LENGTH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BACKWARD: tl.constexpr,
    DOT: tl.constexpr,
):
    """Pass 3 for one n1: the real inverse along k2, rows ``n1 + COLS n2 < N``. Forward: OUT
    is y. BACKWARD: the result is dx, and OUT, DGATE receive ``dx * s`` and
    ``dx * mixed * s * (1 - s)`` with ``s = sigmoid(gate)``."""
    index = tl.program_id(0) // COLS
    n1 = tl.program_id(0) % COLS
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    begin, length, total = _segment(cu_seqlens, class_segments, index, n_segments)
    c_mask = channels < n_channels
    n_class = tl.num_programs(0) // COLS
    half = tl.num_programs(2).to(tl.int64) * n_class * LENGTH * n_channels
    n2 = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_K):
        k2 = start + tl.arange(0, BLOCK_K)
        place = ((b * n_class + index) * LENGTH + n1 * ROWS + k2) * n_channels
        br, bi = _load_column(TRANSFORM, place[:, None] + channels[None, :], half, c_mask[None, :])
        matrix = n2[:, None] * ROWS + k2[None, :]
        acc = _product(tl.load(DFT_ROWS + matrix), br, acc, DOT)
        acc = _product(tl.load(DFT_ROWS + ROWS * ROWS + matrix), bi, acc, DOT)
    result = acc / LENGTH
    t = n1 + COLS * n2
    base = (b * total + begin) * n_channels
    tile = (t * n_channels)[:, None] + channels[None, :]
    mask = (t < length)[:, None] & c_mask[None, :]
    if BACKWARD:
        mixed = tl.load(MIXED + base + tile, mask=mask, other=0.0).to(tl.float32)
        gate = tl.sigmoid(tl.load(GATE + base + tile, mask=mask, other=0.0).to(tl.float32))
        _store_input_gradients(OUT + base, DGATE + base, tile, mask, result, mixed, gate)
    else:
        tl.store(OUT + base + tile, result.to(OUT.dtype.element_ty), mask=mask)


@cache
def dft_matrix(size: int, padded: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(2, padded, padded)`` in ``dtype``: ``cos`` and ``-sin`` of ``2 pi k n / size`` for
    ``k, n < size`` (the real and imaginary parts of the DFT matrix), zero elsewhere."""
    k = torch.arange(size, dtype=torch.float64)
    angle = (torch.outer(k, k) % size) * (TWO_PI / size)
    parts = torch.stack([torch.cos(angle), -torch.sin(angle)])
    parts = torch.where(parts.abs() < 1e-12, torch.zeros_like(parts), parts)
    matrix = torch.zeros(2, padded, padded, dtype=torch.float64)
    matrix[:, :size, :size] = parts
    return matrix.to(device=device, dtype=dtype)


def factors(length: int) -> tuple[int, int]:
    """(COLS, ROWS) with ``COLS * ROWS = length``, ROWS the larger when they differ."""
    rows = 1 << ((length.bit_length() - 1 + 1) // 2)
    return length // rows, rows


@cache
def twiddle_table(length: int, device: torch.device) -> torch.Tensor:
    """``(2, ROWS, COLS)`` float32, with ``(COLS, ROWS) = factors(length)``: ``cos`` and ``sin``
    of ``2 pi n1 k2 / length`` at ``[k2, n1]``."""
    cols, rows = factors(length)
    angle = (torch.outer(torch.arange(rows), torch.arange(cols)) % length).double() * (TWO_PI / length)
    return torch.stack([torch.cos(angle), torch.sin(angle)]).to(device=device, dtype=torch.float32)


def _factored(length: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """For an FFT of ``length`` above DENSE_MAX: the DFT matrices of passes 1 and 3 (``ROWS``)
    and of pass 2 (``COLS``, padded to 16), in ``dtype``; the twiddle factors
    (:func:`twiddle_table`); the kernels' ``LENGTH``, ``ROWS`` and ``COLS``."""
    cols, rows = factors(length)
    tables = dft_matrix(rows, rows, device, dtype), dft_matrix(cols, max(16, cols), device, dtype)
    return *tables, twiddle_table(length, device), dict(LENGTH=length, ROWS=rows, COLS=cols)


def fused(length: int) -> bool:
    """Whether an FFT of ``length`` above DENSE_MAX runs its three passes in one program: up to
    FUSED_MAX, where both :func:`factors` are at least 16 (``tl.dot``'s least dimension)."""
    return length <= FUSED_MAX and min(factors(length)) >= 16


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the matrix products' operands for inputs of ``dtype`` (bf16 where
    :func:`.operands.dot_dtype` is, else float32): the DFT matrices and the pass buffers are
    stored in it, so that every program reads half the bytes where the operands are bf16."""
    return torch.bfloat16 if dot_dtype(dtype) == tl.bfloat16 else torch.float32


def launch_config(kernel: str, length: int, n_channels: int) -> dict:
    """``BLOCK_C`` and ``num_warps`` of ``kernel`` (``"dense"``, ``"fused"``, ``"rows"`` for
    passes 1 and 3, ``"columns"`` for pass 2) at FFT length ``length``: the widest channel
    blocks (each program reads its whole DFT matrix, so wider blocks read it for more
    channels) whose sm_90 build keeps its tiles in registers: 64 channels in passes 1 and 3,
    32 in pass 2, with 8 warps from 32 DFT rows (pass 2: 64 columns) on; the fused kernels,
    which hold the whole transform, 8 channels (32 bytes of float32 a row) with 8 warps."""
    cols, rows = factors(length)
    widest = {"dense": 32, "rows": 64, "columns": 32, "fused": 8}[kernel]
    warps = 8 if kernel == "fused" or (kernel == "rows" and rows >= 32) or (kernel == "columns" and cols >= 64) else 4
    return dict(BLOCK_C=min(widest, max(16, triton.next_power_of_2(n_channels))), num_warps=warps)


def _classes(class_segments: torch.Tensor, class_lengths: Sequence[int], class_sizes: Sequence[int]):
    """(FFT length, segment ids, count) of each class, in order."""
    first = 0
    for length, size in zip(class_lengths, class_sizes):
        yield length, class_segments[first : first + size], size
        first += size


def _pass_buffer(batch: int, count: int, length: int, n_channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The three passes' buffer ``(2, B, count, L, D)`` in ``dtype``: real and imaginary parts."""
    return torch.empty(2, batch, count, length, n_channels, dtype=dtype, device=device)


def _grid(programs: int, config: dict, n_channels: int, batch: int) -> tuple[int, int, int]:
    return programs, triton.cdiv(n_channels, config["BLOCK_C"]), batch


def fftconv_fwd(
    mixed: torch.Tensor,
    gate: torch.Tensor,
    spectrum: torch.Tensor,
    cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor,
    class_lengths: list[int],
    class_sizes: list[int],
) -> torch.Tensor:
    """``y (B, T, D)``, the convolution of ``mixed * sigmoid(gate)`` (both ``(B, T, D)``) with
    the filter ``spectrum (F, D, 2)`` float32, per segment.

    ``class_segments`` lists segment ids grouped by FFT length: ``class_sizes[j]`` ids of
    length ``class_lengths[j]`` (a power of two >= 2 whose :func:`factors` keep the tiles in
    registers: up to 8192 on sm_90; ``F >= L/2 + 1``); segments in no class (length 0) have
    no rows.
    """
    batch, _, n_channels = mixed.shape
    n_segments = cu_seqlens.shape[0] - 1
    dot, operands = dot_dtype(mixed.dtype), operand_dtype(mixed.dtype)
    y = new_output(mixed, mixed.shape, mixed.dtype)
    for length, segments, count in _classes(class_segments, class_lengths, class_sizes):
        if length <= DENSE_MAX:
            config = launch_config("dense", length, n_channels)
            padded = max(16, length)
            fftconv_dense_fwd_kernel[_grid(count, config, n_channels, batch)](
                mixed,
                gate,
                spectrum,
                dft_matrix(length, padded, mixed.device, operands),
                y,
                cu_seqlens,
                segments,
                n_segments,
                n_channels,
                LENGTH=length,
                PADDED=padded,
                DOT=dot,
                **config,
            )
            continue
        table_rows, table_cols, twiddle, shape = _factored(length, mixed.device, operands)
        if fused(length):
            config = launch_config("fused", length, n_channels)
            fftconv_fused_fwd_kernel[_grid(count, config, n_channels, batch)](
                mixed,
                gate,
                spectrum,
                table_rows,
                table_cols,
                twiddle,
                y,
                cu_seqlens,
                segments,
                n_segments,
                n_channels,
                DOT=dot,
                **shape,
                **config,
            )
            continue
        cols, rows = shape["COLS"], shape["ROWS"]
        transform = _pass_buffer(batch, count, length, n_channels, operands, mixed.device)
        config = launch_config("rows", length, n_channels)
        fftconv_rows_kernel[_grid(count * cols, config, n_channels, batch)](
            mixed,
            gate,
            table_rows,
            twiddle,
            transform,
            cu_seqlens,
            segments,
            n_segments,
            n_channels,
            BLOCK_K=BLOCK_K,
            GATED=True,
            DOT=dot,
            **shape,
            **config,
        )
        columns = launch_config("columns", length, n_channels)
        fftconv_columns_fwd_kernel[_grid(count * rows, columns, n_channels, batch)](
            transform,
            spectrum,
            table_cols,
            twiddle,
            n_channels,
            BLOCK_COLS=table_cols.shape[1],
            DOT=dot,
            **shape,
            **columns,
        )
        fftconv_inverse_rows_kernel[_grid(count * cols, config, n_channels, batch)](
            transform,
            table_rows,
            mixed,
            gate,
            y,
            y,
            cu_seqlens,
            segments,
            n_segments,
            n_channels,
            BLOCK_K=BLOCK_K,
            BACKWARD=False,
            DOT=dot,
            **shape,
            **config,
        )
    return y


def fftconv_bwd(
    grad: torch.Tensor,
    mixed: torch.Tensor,
    gate: torch.Tensor,
    spectrum: torch.Tensor,
    cu_seqlens: torch.Tensor,
    class_segments: torch.Tensor,
    class_lengths: list[int],
    class_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d mixed, d gate, d spectrum ``(F, D, 2)`` float32) of :func:`fftconv_fwd`."""
    batch, _, n_channels = mixed.shape
    n_segments = cu_seqlens.shape[0] - 1
    dot, operands = dot_dtype(mixed.dtype), operand_dtype(mixed.dtype)
    d_mixed, d_gate = new_output(mixed, mixed.shape, mixed.dtype), new_output(gate, gate.shape, gate.dtype)
    d_spectrum = torch.zeros(spectrum.shape, dtype=torch.float32, device=spectrum.device)
    for length, segments, count in _classes(class_segments, class_lengths, class_sizes):
        partial = new_output(mixed, (batch, count, length // 2 + 1, n_channels, 2), torch.float32)
        if length <= DENSE_MAX:
            config = launch_config("dense", length, n_channels)
            padded = max(16, length)
            fftconv_dense_bwd_kernel[_grid(count, config, n_channels, batch)](
                grad,
                mixed,
                gate,
                spectrum,
                dft_matrix(length, padded, mixed.device, operands),
                d_mixed,
                d_gate,
                partial,
                cu_seqlens,
                segments,
                n_segments,
                n_channels,
                LENGTH=length,
                PADDED=padded,
                DOT=dot,
                **config,
            )
        elif fused(length):
            table_rows, table_cols, twiddle, shape = _factored(length, mixed.device, operands)
            config = launch_config("fused", length, n_channels)
            fftconv_fused_bwd_kernel[_grid(count, config, n_channels, batch)](
                grad,
                mixed,
                gate,
                spectrum,
                table_rows,
                table_cols,
                twiddle,
                d_mixed,
                d_gate,
                partial,
                cu_seqlens,
                segments,
                n_segments,
                n_channels,
                DOT=dot,
                **shape,
                **config,
            )
        else:
            table_rows, table_cols, twiddle, shape = _factored(length, mixed.device, operands)
            cols, rows = shape["COLS"], shape["ROWS"]
            signal, grad_signal = (
                _pass_buffer(batch, count, length, n_channels, operands, mixed.device) for _ in range(2)
            )
            config = launch_config("rows", length, n_channels)
            for source, target, gated in ((grad, grad_signal, False), (mixed, signal, True)):
                fftconv_rows_kernel[_grid(count * cols, config, n_channels, batch)](
                    source,
                    gate,
                    table_rows,
                    twiddle,
                    target,
                    cu_seqlens,
                    segments,
                    n_segments,
                    n_channels,
                    BLOCK_K=BLOCK_K,
                    GATED=gated,
                    DOT=dot,
                    **shape,
                    **config,
                )
            columns = launch_config("columns", length, n_channels)
            fftconv_columns_bwd_kernel[_grid(count * rows, columns, n_channels, batch)](
                grad_signal,
                signal,
                spectrum,
                table_cols,
                twiddle,
                partial,
                n_channels,
                BLOCK_COLS=table_cols.shape[1],
                DOT=dot,
                **shape,
                **columns,
            )
            fftconv_inverse_rows_kernel[_grid(count * cols, config, n_channels, batch)](
                grad_signal,
                table_rows,
                mixed,
                gate,
                d_mixed,
                d_gate,
                cu_seqlens,
                segments,
                n_segments,
                n_channels,
                BLOCK_K=BLOCK_K,
                BACKWARD=True,
                DOT=dot,
                **shape,
                **config,
            )
        d_spectrum[: length // 2 + 1] += partial.sum(dim=(0, 1))
    return d_mixed, d_gate, d_spectrum
