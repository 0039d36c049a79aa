"""Circular FFT convolution of packed segments with a frequency-domain filter."""

from __future__ import annotations

import torch

from canvas_engineering.ops.segments import SegmentIndex


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
        ``(B, Tq, D)``.
    """
    batches = []
    for bucket in index.segment_buckets:
        length = fft_length(bucket.queries.width)
        spectrum = torch.fft.rfft(bucket.queries.gather(x, zero_padding=True), n=length, dim=2)
        filtered = torch.fft.irfft(spectrum * response[: spectrum.shape[2]], n=length, dim=2)
        batches.append(filtered[:, :, : bucket.queries.width])
    return index.assemble_queries(batches)
