"""Kernel benchmarks for the GPU check: each Triton kernel against its anchor on the same work.

Usage: ``python benchmarks/gpu_kernels.py OUT_DIR [--dry-run]``. On a GPU it measures the
device's ceilings (device-to-device copy bandwidth, bf16 matrix rate), then each kernel
variant forward and forward+backward with ``triton.testing.do_bench`` (median), beside its
anchor (``scaled_dot_product_attention`` on the same work; FlexAttention's sliding window for
local attention where this torch has it; the torch.fft path for Hyena's convolution) and
beside the eager fallback, and prints a table with achieved TFLOP/s. The first call of each
variant (compilation and autotuning included) is timed apart from the medians. A variant
that fails is recorded with its error and the others still run; OUT_DIR/kernels.json is
rewritten after every variant, and the exit code is 1 when any failed. ``--dry-run`` runs
the same code on a CPU at toy sizes through the Triton interpreter (for CI); its timings
mean nothing.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from canvas_engineering.ops.backend import eager_ops, interpreted_triton  # noqa: E402
from canvas_engineering.ops.segment_attention import segment_attention  # noqa: E402
from canvas_engineering.ops.segments import SegmentIndex  # noqa: E402

DEVICE = "cpu" if DRY_RUN else "cuda"
Case = tuple[str, Callable[[], dict]]
"""A variant's name and the call that measures it."""


def timed(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` after one warm-up call: do_bench on a GPU, a few
    perf_counter runs on a CPU."""
    if DEVICE == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def first_call_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn``, synchronised: called first, it holds the kernels'
    compilation (and autotuning), which ``timed`` leaves out of its median."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def kernel_timings(forward: Callable[[], object], forward_backward: Callable[[], object]) -> dict[str, float]:
    """The kernels' first-call and median times, forward and forward+backward (the first
    forward+backward call compiles only the backward kernels)."""
    with kernel_context():
        return {
            "kernel_fwd_first_call_ms": first_call_ms(forward),
            "kernel_fwd_ms": timed(forward),
            "kernel_fwd_bwd_first_call_ms": first_call_ms(forward_backward),
            "kernel_fwd_bwd_ms": timed(forward_backward),
        }


def ceilings() -> dict[str, float]:
    """Measured device ceilings: copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s."""
    size = (1 << 28) if DEVICE == "cuda" else (1 << 20)
    source = torch.empty(size, dtype=torch.float32, device=DEVICE)
    target = torch.empty_like(source)
    copy_ms = timed(lambda: target.copy_(source))
    n = 8192 if DEVICE == "cuda" else 128
    a = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    matmul_ms = timed(lambda: a @ a)
    return {"copy_GBps": 2 * source.numel() * 4 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * n**3 / matmul_ms / 1e9}


def kernel_context():
    """Runs the kernels: compiled on a GPU, interpreted on CPU tensors in a dry run."""
    if DEVICE == "cuda":
        import contextlib

        return contextlib.nullcontext()
    return interpreted_triton()


def flex_sliding_window(q, k, v, window: int) -> Callable[[], torch.Tensor] | None:
    """FlexAttention with a sliding-window block mask on (B, H, N, D) tensors, if available."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if DEVICE != "cuda":
        return None
    n = q.shape[2]
    mask = create_block_mask(lambda b, h, i, j: (i - j).abs() <= window // 2, None, None, n, n, device=DEVICE)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=mask)


def shape_of(segments: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """A variant's shape fields in its JSON row."""
    dtype_name = str(dtype).replace("torch.", "")
    return {"segments": segments, "length": length, "heads": heads, "head_dim": head_dim, "dtype": dtype_name}


def measured_row(
    name: str,
    shape: dict,
    kernel: dict,
    eager_ms: float,
    anchor: str,
    anchor_ms: float,
    flops: float,
    moved: int | None = None,
) -> dict:
    """A variant's JSON row: its name and ``shape`` fields, the kernels' timings, the eager
    path's and the anchor's forward times, and the kernel forward's rates: TFLOP/s of
    ``flops`` and, given the bytes it must have ``moved``, GB/s."""
    kernel_ms = kernel["kernel_fwd_ms"]
    bandwidth = {} if moved is None else {"kernel_fwd_GBps": moved / kernel_ms / 1e6}
    return {
        "variant": name,
        **shape,
        **kernel,
        "eager_fwd_ms": eager_ms,
        "anchor": anchor,
        "anchor_fwd_ms": anchor_ms,
        **bandwidth,
        "kernel_fwd_TFLOPs": flops / kernel_ms / 1e9,
        "speedup_vs_anchor": anchor_ms / kernel_ms,
    }


def case(name: str, segments: int, length: int, heads: int, head_dim: int, dtype: torch.dtype, **mode) -> dict:
    """One variant: ``segments`` segments of ``length`` queries and keys each."""
    batch = 1
    index = SegmentIndex.build([length] * segments, list(range(segments)), [length] * segments).to(DEVICE)
    make = lambda: torch.randn(
        batch, segments * length, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True
    )
    q, k, v = make(), make(), make()
    scale = head_dim**-0.5
    grad = torch.randn_like(q)

    def ours():
        return segment_attention(q, k, v, index, scale, **mode)

    def backward_of(run):
        return lambda: torch.autograd.grad(run(), (q, k, v), grad)

    kernel = kernel_timings(ours, backward_of(ours))
    with eager_ops():
        eager_ms = timed(ours)
    dense = lambda t: (
        t.detach().view(batch, segments, length, heads, head_dim).flatten(0, 1).transpose(1, 2).requires_grad_(True)
    )
    qd, kd, vd = dense(q), dense(k), dense(v)
    anchor_name, anchor = "sdpa", (lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale))
    if mode.get("window"):
        flex = flex_sliding_window(qd, kd, vd, mode["window"])
        if flex is not None:
            anchor_name, anchor = "flex_sliding_window", flex
    anchor_ms = timed(anchor)
    pairs = segments * length * (min(length, mode["window"] + 1) if mode.get("window") else length)
    flops = 4 * batch * heads * head_dim * pairs
    shape = {**shape_of(segments, length, heads, head_dim, dtype), **mode}
    return measured_row(name, shape, kernel, eager_ms, anchor_name, anchor_ms, flops)


def scan_case(name: str, sequences: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The WKV scan over ``sequences`` key sets of ``length`` steps: achieved bandwidth
    (bytes the forward must move: k and v read, y and two float32 statistics written)
    against the copy ceiling, and the eager chunked scan beside it."""
    from canvas_engineering.ops.rwkv import segment_wkv

    index = SegmentIndex.build([length] * sequences, list(range(sequences)), [length] * sequences).to(DEVICE)
    make = lambda: torch.randn(1, sequences * length, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = make(), make()
    w = -torch.exp(torch.randn(heads, head_dim, device=DEVICE))
    u = torch.randn(heads, head_dim, device=DEVICE)
    run = lambda: segment_wkv(k, v, w, u, index)
    grad = torch.randn_like(k)
    kernel = kernel_timings(run, lambda: torch.autograd.grad(run(), (k, v), grad))
    with eager_ops():
        eager_ms = timed(run)
    moved = k.numel() * (3 * k.element_size() + 8)
    return measured_row(
        name, shape_of(sequences, length, heads, head_dim, dtype), kernel, eager_ms, "eager", eager_ms, 0.0, moved
    )


def selective_scan_case(name: str, sequences: int, length: int, channels: int, state: int, dtype: torch.dtype) -> dict:
    """The selective scan over ``sequences`` key sets of ``length`` steps: achieved bandwidth
    (x, dt, B, C read and y written, once) against the copy ceiling, the eager scan beside it."""
    from canvas_engineering.ops.selective_scan import segment_selective_scan

    index = SegmentIndex.build([length] * sequences, list(range(sequences)), [length] * sequences).to(DEVICE)
    rows = sequences * length
    make = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)
    x, dt = make(1, rows, channels), torch.rand(1, rows, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    B, C = make(1, rows, state), make(1, rows, state)
    A = -torch.arange(1, state + 1, device=DEVICE, dtype=torch.float32).repeat(channels, 1)
    D = torch.ones(channels, device=DEVICE)
    run = lambda: segment_selective_scan(x, dt, A, B, C, D, index)
    grad = torch.randn_like(x)
    kernel = kernel_timings(run, lambda: torch.autograd.grad(run(), (x, dt, B, C), grad))
    with eager_ops():
        eager_ms = timed(run)
    moved = rows * (3 * channels + 2 * state) * x.element_size()
    return measured_row(
        name, shape_of(sequences, length, 1, channels, dtype), kernel, eager_ms, "eager", eager_ms, 0.0, moved
    )


def linear_case(name: str, sequences: int, length: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Linear attention over ``sequences`` segments of ``length``: the kernels against the
    eager matmul form on the same work; achieved bandwidth (q, k, v read, out written)."""
    from canvas_engineering.ops.linear import segment_linear_attention

    index = SegmentIndex.build([length] * sequences, list(range(sequences)), [length] * sequences).to(DEVICE)
    make = lambda: torch.randn(1, sequences * length, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    q, k, v = make(), make(), make()
    run = lambda: segment_linear_attention(q, k, v, index, 1e-6)
    grad = torch.randn_like(q)
    kernel = kernel_timings(run, lambda: torch.autograd.grad(run(), (q, k, v), grad))
    with eager_ops():
        eager_ms = timed(run)
    moved = 4 * q.numel() * q.element_size()
    shape = shape_of(sequences, length, heads, head_dim, dtype)
    flops = 4 * q.numel() * head_dim
    return measured_row(name, shape, kernel, eager_ms, "eager matmul form", eager_ms, flops, moved)


def dft_flops(length: int) -> int:
    """Floating-point operations of the Hyena kernels' forward DFT matrix products for one
    segment and one channel at FFT length ``length`` (padding included)."""
    from canvas_engineering.kernels.fftconv import DENSE_MAX, factors

    if length <= DENSE_MAX:
        return 8 * max(16, length) ** 2
    cols, rows = factors(length)
    return 8 * rows * length + 16 * max(16, cols) ** 2 * rows


def hyena_case(name: str, sequences: int, length: int, channels: int, dtype: torch.dtype) -> dict:
    """Hyena's gated FFT convolution over ``sequences`` segments of ``length`` rows: the Triton
    kernels (DFTs as matrix products, gate fused) against the eager torch.fft path on the same
    work; achieved bandwidth (mixed and gate read, y written, once) and the rate of the
    kernels' DFT matrix products."""
    from canvas_engineering.ops.fftconv import fft_length, segment_gated_fft_conv

    index = SegmentIndex.build([length] * sequences, list(range(sequences)), [length] * sequences).to(DEVICE)
    rows = sequences * length
    make = lambda: torch.randn(1, rows, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    mixed, gate = make(), make()
    spectrum = (torch.randn(channels, fft_length(length) // 2 + 1, 2, device=DEVICE) * 0.02).requires_grad_(True)
    run = lambda: segment_gated_fft_conv(mixed, gate, torch.view_as_complex(spectrum).transpose(0, 1), index)
    grad = torch.randn_like(mixed)
    backward = lambda: torch.autograd.grad(run(), (mixed, gate, spectrum), grad)
    kernel = kernel_timings(run, backward)
    with eager_ops():
        eager_ms = timed(run)
        eager_bwd_ms = timed(backward)
    moved = 3 * mixed.numel() * mixed.element_size()
    flops = dft_flops(fft_length(length)) * sequences * channels
    row = measured_row(
        name, shape_of(sequences, length, 1, channels, dtype), kernel, eager_ms, "torch.fft", eager_ms, flops, moved
    )
    return {**row, "eager_fwd_bwd_ms": eager_bwd_ms}


def hyena_cases() -> list[Case]:
    """The gated FFT convolution at FFT lengths 256 to 8192 (float32, the eager path's dtype),
    ``2**16`` rows of 512 channels each (two toy lengths in a dry run)."""
    if DEVICE != "cuda":
        return [
            (f"hyena_L{length}", partial(hyena_case, f"hyena_L{length}", 1, length, 4, torch.float32))
            for length in (16, 128)
        ]
    return [
        (f"hyena_L{length}", partial(hyena_case, f"hyena_L{length}", (1 << 16) // length, length, 512, torch.float32))
        for length in (256, 1024, 4096, 8192)
    ]


def reference_cases() -> list[Case]:
    """On a GPU, the reference workloads of ``benchmarks/launch_report.py``, each named
    ``"<family> <workload>"`` as the report names its rows, so that its estimates and these
    measurements can be joined. A workload's batch of B is run as B sequences in one batch row
    (the same grids and work). None in a dry run."""
    if DEVICE != "cuda":
        return []
    bf16 = torch.bfloat16
    variants = []
    for head_dim in (64, 128):
        shape = f"N4096-M4096-B2-H8-d{head_dim}-bf16"
        variants += [
            partial(case, f"attention-dense {shape}", 2, 4096, 8, head_dim, bf16),
            partial(case, f"attention-local-w64 {shape}", 2, 4096, 8, head_dim, bf16, window=64),
            partial(case, f"attention-top-k-k8 {shape}", 2, 4096, 8, head_dim, bf16, top_k=8),
        ]
        for length in (4096, 16384):
            variants.append(
                partial(
                    linear_case,
                    f"linear-attention N{length}-M{length}-B2-H8-d{head_dim}-bf16",
                    2,
                    length,
                    8,
                    head_dim,
                    bf16,
                )
            )
    variants += [
        partial(scan_case, "wkv M4096-B2-H4-d64-bf16", 2, 4096, 4, 64, bf16),
        partial(scan_case, "wkv M16384-B2-H8-d64-bf16", 2, 16384, 8, 64, bf16),
        *(
            partial(selective_scan_case, f"selective-scan M4096-B2-D{channels}-N16-bf16", 2, 4096, channels, 16, bf16)
            for channels in (256, 512)
        ),
        *(
            partial(
                hyena_case,
                f"fftconv L{length}-S{(1 << 16) // length}-B1-D512-{name}",
                (1 << 16) // length,
                length,
                512,
                dtype,
            )
            for length in (64, 256, 1024, 4096, 8192)
            for name, dtype in (("fp32", torch.float32), ("bf16", bf16))
        ),
    ]
    return [(variant.args[0], variant) for variant in variants]


def cases() -> list[Case]:
    """Every variant, as (name, measure): nothing runs until ``measure`` is called."""
    length, many = (4096, 64) if DEVICE == "cuda" else (32, 2)
    heads, head_dim = (8, 64) if DEVICE == "cuda" else (2, 16)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    variants = [
        partial(case, "softmax_one_segment", 1, length, heads, head_dim, dtype),
        partial(case, "softmax_many_frames", many, length // many * 4, heads, head_dim, dtype),
        partial(
            case,
            "local_w64",
            1,
            length * 4 if DEVICE == "cuda" else length,
            heads,
            head_dim,
            dtype,
            window=64 if DEVICE == "cuda" else 4,
        ),
        partial(case, "top_k8", 1, length // 4 if DEVICE == "cuda" else length, heads, head_dim, dtype, top_k=8),
        partial(case, "sigmoid", 1, length, heads, head_dim, dtype, sigmoid=True),
        partial(
            scan_case,
            "rwkv_scan",
            many if DEVICE == "cuda" else 2,
            length * 4 if DEVICE == "cuda" else length,
            heads,
            head_dim,
            dtype,
        ),
        partial(
            linear_case,
            "linear",
            many if DEVICE == "cuda" else 2,
            length * 4 if DEVICE == "cuda" else length,
            heads,
            head_dim,
            dtype,
        ),
        partial(
            selective_scan_case,
            "mamba_scan",
            many if DEVICE == "cuda" else 2,
            length if DEVICE == "cuda" else 16,
            1024 if DEVICE == "cuda" else 8,
            16 if DEVICE == "cuda" else 4,
            dtype,
        ),
    ]
    return [(variant.args[0], variant) for variant in variants] + hyena_cases() + reference_cases()


def run_cases(variants: list[Case], report: dict, path: Path) -> bool:
    """Measures every variant in turn, whatever the others do: a variant that raises is
    recorded with its error and the next one runs. ``report`` is written to ``path`` after
    each variant, so a run cut off midway keeps every result before the cut. Returns
    whether all variants succeeded."""
    succeeded = True
    for name, measure in variants:
        start = time.perf_counter()
        try:
            result = measure()
        except Exception as error:  # noqa: BLE001 - recorded, and the run goes on
            traceback.print_exc()
            result = {"variant": name, "error": f"{type(error).__name__}: {error}"}
            succeeded = False
        result["elapsed_s"] = time.perf_counter() - start
        report["results"].append(result)
        path.write_text(json.dumps(report, indent=2))
        print(f"{'FAILED' if 'error' in result else 'measured'} {name} in {result['elapsed_s']:.1f} s", flush=True)
    return succeeded


def print_table(report: dict) -> None:
    print(
        f"\ndevice {report['device']}, torch {report['torch']}, triton {report['triton']}, "
        f"ceilings {report['ceilings']}"
    )
    measured = [r for r in report["results"] if "error" not in r]
    for r in measured:
        if "kernel_fwd_GBps" in r:
            share = r["kernel_fwd_GBps"] / report["ceilings"]["copy_GBps"]
            print(f"{r['variant']}: {r['kernel_fwd_GBps']:.1f} GB/s forward, {share:.0%} of the copy ceiling")
    print(
        f"{'variant':<22}{'1st fwd ms':>11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'eager ms':>10}"
        f"{'anchor':>22}{'anchor ms':>11}{'TFLOP/s':>9}{'x anchor':>9}"
    )
    for r in measured:
        print(
            f"{r['variant']:<22}{r['kernel_fwd_first_call_ms']:>11.1f}{r['kernel_fwd_ms']:>10.3f}{r['kernel_fwd_bwd_ms']:>12.3f}"
            f"{r['eager_fwd_ms']:>10.3f}{r['anchor']:>22}{r['anchor_fwd_ms']:>11.3f}{r['kernel_fwd_TFLOPs']:>9.2f}{r['speedup_vs_anchor']:>9.2f}"
        )
    for r in report["results"]:
        if "error" in r:
            print(f"{r['variant']:<22}FAILED: {r['error']}")


def run_and_report(out_dir: str, filename: str, variants: list[Case], table: Callable[[dict], None], **fields) -> int:
    """Measures ``variants`` into OUT_DIR/``filename`` (see :func:`run_cases`) under a header
    of the device, the versions and ``fields``, then prints ``table(report)``. Returns the
    exit code: 1 when any variant failed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton_version,
        "dry_run": DRY_RUN,
        **fields,
        "results": [],
    }
    succeeded = run_cases(variants, report, out / filename)
    table(report)
    return 0 if succeeded else 1


def main(out_dir: str) -> int:
    return run_and_report(out_dir, "kernels.json", cases(), print_table, ceilings=ceilings())


if __name__ == "__main__":
    sys.exit(main(next(arg for arg in sys.argv[1:] if not arg.startswith("--"))))
