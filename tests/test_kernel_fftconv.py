"""The gated FFT convolution: the Triton kernels (interpreter on CPU, compiled on CUDA) and the
eager torch.fft version against the FFT-free float64 oracle (outputs and the gradients of
mixed, gate logits and filter), the Hyena module through the kernels against the eager
module, and the custom op's registration."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_all_close, kernels, relative_error
from reference.convolution import gated_convolution_reference

from canvas_engineering import create_attention
from canvas_engineering.ops.backend import eager_ops
from canvas_engineering.ops.fftconv import fft_length, segment_gated_fft_conv
from canvas_engineering.ops.segments import SegmentIndex

QUERY_LENGTHS = [5, 1, 37, 0, 100, 3, 300, 64, 200, 2, 129]
"""FFT lengths 8, 2, 64, 128, 4, 512, 64, 256, 2, 256: the dense kernel (L <= 64), the fused
kernels (256, two segments, channel blocks of 8: 20 channels leave a partial block) and the
three passes (128: pass 2 padded to 16; 512: two BLOCK_K steps in passes 1 and 3), and an
empty segment."""
CHANNELS = 20


def data(dtype, lengths=QUERY_LENGTHS, channels=CHANNELS, seed=0):
    """(mixed, gate logits, filter ``(F, D, 2)``, output cotangent), F one above what the longest segment reads."""
    generator = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    frequencies = max(fft_length(n) for n in lengths) // 2 + 2
    mixed, gate = (torch.randn(2, rows, channels, generator=generator) for _ in range(2))
    spectrum = torch.randn(frequencies, channels, 2, generator=generator)
    grad = torch.randn(2, rows, channels, generator=generator)
    return [t.to(dtype) for t in (mixed, gate, spectrum, grad)]


def index_of(lengths):
    return SegmentIndex.build(lengths, list(range(len(lengths))), [max(n, 1) for n in lengths])


def oracle(mixed, gate, spectrum, grad, lengths=QUERY_LENGTHS):
    exact = [t.detach().double().requires_grad_(True) for t in (mixed, gate, spectrum)]
    expected = gated_convolution_reference(*exact, lengths)
    expected.backward(grad.double())
    return expected, [t.grad for t in exact]


def run(mixed, gate, spectrum, grad, lengths=QUERY_LENGTHS):
    """Output and (mixed, gate, filter) gradients of :func:`segment_gated_fft_conv` on DEVICE."""
    leaves = [t.detach().to(DEVICE, copy=True).requires_grad_(True) for t in (mixed, gate, spectrum)]
    out = segment_gated_fft_conv(leaves[0], leaves[1], torch.view_as_complex(leaves[2]), index_of(lengths).to(DEVICE))
    out.backward(grad.to(DEVICE))
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_the_oracle(dtype):
    pytest.importorskip("triton")
    mixed, gate, spectrum, grad = data(dtype)
    spectrum = spectrum.float()
    with kernels():
        out, grads = run(mixed, gate, spectrum, grad)
    expected, expected_grads = oracle(mixed, gate, spectrum, grad)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else (3e-3 if dtype == torch.float32 else 1e-2)
    for actual, reference in zip((out, *grads), (expected, *expected_grads)):
        assert relative_error(actual.cpu(), reference) < tolerance


def test_eager_matches_the_oracle():
    mixed, gate, spectrum, grad = data(torch.float64)
    with eager_ops():
        out, grads = run(mixed, gate, spectrum, grad)
    expected, expected_grads = oracle(mixed, gate, spectrum, grad)
    assert relative_error(out.cpu(), expected) < 1e-12
    for actual, reference in zip(grads, expected_grads):
        assert relative_error(actual.cpu(), reference) < 1e-12


@pytest.mark.parametrize(
    "check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["gradcheck", "gradgradcheck"]
)
def test_eager_gradcheck(check):
    """First and second derivatives of the eager version, filter included (its backward is
    written out; differentiated again, it runs autograd through the composite)."""
    lengths = [1, 6]
    mixed, gate, spectrum, _ = data(torch.float64, lengths, channels=1)
    index = index_of(lengths)
    inputs = [t.requires_grad_(True) for t in (mixed[:1], gate[:1], spectrum)]
    with eager_ops():
        assert check(lambda m, g, s: segment_gated_fft_conv(m, g, torch.view_as_complex(s), index), inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("n, m", [(11, 19), (19, 11), (150, 97)])
def test_module_kernels_match_eager(n, m):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    module = create_attention("hyena", d_model=16, order=2, max_len=256).to(DEVICE)
    inputs = [torch.randn(2, length, 16).to(DEVICE).requires_grad_(True) for length in (n, m, m)]
    cotangent = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    names = ["queries", "keys", "values"] + [name for name, _ in module.named_parameters()]

    def results():
        output = module(*inputs)
        grads = torch.autograd.grad(output, [*inputs, *module.parameters()], cotangent, allow_unused=True)
        return {"output": output, **dict(zip(names, grads))}

    with eager_ops():
        eager = results()
    with kernels():
        through_kernels = results()
    assert_all_close(through_kernels, eager, tolerance=1e-5 if DEVICE == "cpu" else 3e-3, zero_floor=1e-7)


@pytest.mark.gpu
def test_ffts_longer_than_the_kernels_run_eagerly():
    pytest.importorskip("triton")
    from canvas_engineering.ops.fftconv import MAX_KERNEL_LENGTH

    lengths = [MAX_KERNEL_LENGTH + 1, 2]
    mixed, gate, spectrum, _ = data(torch.float32, lengths, channels=1)
    index = index_of(lengths).to(DEVICE)
    args = [t.to(DEVICE) for t in (mixed, gate)] + [torch.view_as_complex(spectrum.to(DEVICE)), index]
    with kernels():
        through_kernels = segment_gated_fft_conv(*args)
    with eager_ops():
        eager = segment_gated_fft_conv(*args)
    assert torch.equal(through_kernels, eager)


def test_a_filter_too_short_is_refused():
    mixed, gate, spectrum, _ = data(torch.float32, [40], channels=2)
    with pytest.raises(ValueError, match="the filter needs 33 frequencies, got 32"):
        segment_gated_fft_conv(mixed, gate, torch.view_as_complex(spectrum[:32]), index_of([40]))


@pytest.mark.parametrize(
    "shapes", [[(4, 12)], [(3, 12), (2, 8)], [(5, 9)], [(9, 5)], [(4, 12), (3, 7)], [(6, 6), (0, 3)]]
)
def test_module_pools_as_adaptive_average_pooling(shapes):
    """Each segment's values reach the streams' projection pooled to its query length as
    ``F.adaptive_avg_pool1d`` pools them: a mean over every k rows when all segments have
    M = k * N, the weighted table otherwise."""
    module = create_attention("hyena", d_model=8, order=1, max_len=16).double()
    index = SegmentIndex.build([n for n, _ in shapes], list(range(len(shapes))), [m for _, m in shapes])
    values = torch.randn(2, index.n_keys, 8, dtype=torch.float64)
    seen = []
    module.in_proj.register_forward_hook(lambda _, args, __: seen.append(args[0]))
    module.forward_segments(torch.zeros(2, index.n_queries, 8, dtype=torch.float64), values, values, index)
    keyset_starts = [sum(m for _, m in shapes[:s]) for s in range(len(shapes))]
    expected = torch.cat(
        [
            torch.nn.functional.adaptive_avg_pool1d(values[:, start : start + m].transpose(1, 2), n).transpose(1, 2)
            for (n, m), start in zip(shapes, keyset_starts)
            if n
        ],
        dim=1,
    )
    assert relative_error(seen[0], expected) < 1e-14
