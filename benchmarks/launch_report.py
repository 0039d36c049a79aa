"""What every Triton kernel's launch looks like on an H100, without a GPU: an estimate.

Usage: ``python benchmarks/launch_report.py [--json PATH] [--only SUBSTRING]``

For each kernel family and its reference workloads, the launchers run on ``meta`` tensors
with their launches recorded instead of executed (grid, arguments, warps). Each recorded
launch is compiled for sm_90 with the signature, constants and divisibility hints the JIT
derives from those arguments (``tests/compile_for_hopper.py``), and the report gives per
(kernel, workload): programs in the grid, registers and stack (spill) bytes per thread,
shared memory per program, programs resident per SM, the tensor-core instruction in the
PTX, the global-memory bytes and FLOPs counted from the algorithm each kernel runs (its
inputs and outputs once, plus the scratch and partial sums it writes and reads back), and an
estimated time.

The estimated time is a model, not a measurement, on an H100 SXM (132 SMs, 3.0 TB/s,
990 TFLOP/s bf16/fp16 tensor cores, 495 TF32, 67 fp32 without tensor cores):
``max(floor / fill, waves * serial_steps * 0.4 us)``, where ``floor`` (``floor_us``) is the roofline time
``max(bytes / bandwidth, flops / rate of its instruction)``, ``fill = min(1, programs / 264)``
(two programs per SM hide latency), ``serial_steps`` the longest chain of dependent loop
steps in one program that each wait on a global load (the scans), 0.4 us such a wait, and
``waves`` the number of rounds of resident programs the grid needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from compile_for_hopper import Launch, attention_runs, compile_sm90, launch_signature, record, resources  # noqa: E402

SMS = 132
BANDWIDTH = 3.0e12
RATES = {"bf16": 990e12, "f16": 990e12, "tf32": 495e12, "none": 67e12}
LOAD_WAIT_US = 0.4
REGISTERS_PER_SM, THREADS_PER_SM, PROGRAMS_PER_SM, SHARED_PER_SM = 65536, 2048, 32, 228 * 1024
META = torch.device("meta")
BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Cost:
    """What one launch must do, counted from the algorithm."""

    hbm_bytes: float
    flops: float
    serial_steps: int = 0


def resident_per_sm(registers: int, num_warps: int, smem: int) -> int:
    """Programs one SM holds at once: limited by registers (allocated per warp in units of
    256), threads, shared memory (1 KB reserved per program) and 32 programs."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps
    by_threads = THREADS_PER_SM // (32 * num_warps)
    by_shared = SHARED_PER_SM // (smem + 1024) if smem else PROGRAMS_PER_SM
    return max(0, min(by_registers, by_threads, by_shared, PROGRAMS_PER_SM))


def floor_us(cost: Cost, mma: str) -> float:
    """The roofline time: bytes at the bandwidth or FLOPs at the rate of ``mma``."""
    return max(cost.hbm_bytes / BANDWIDTH, cost.flops / RATES[mma.split("-")[-1]]) * 1e6


def estimate_us(cost: Cost, programs: int, resident: int, mma: str) -> float:
    """The model of the module docstring, in microseconds."""
    floor = floor_us(cost, mma)
    fill = min(1.0, programs / (2 * SMS))
    waves = math.ceil(programs / (SMS * max(1, resident)))
    return max(floor / fill, waves * cost.serial_steps * LOAD_WAIT_US)


_compiled: dict[str, dict] = {}


def describe(launch: Launch) -> dict:
    types, constexprs, hints = launch_signature(launch.kernel, launch.values)
    key = repr((launch.kernel.fn.__name__, types, constexprs, sorted(hints), launch.num_warps))
    if key not in _compiled:
        _compiled[key] = resources(compile_sm90(launch.kernel, types, constexprs, hints, launch.num_warps))
    return _compiled[key]


def rows_for(family: str, workload: str, phases: list[tuple]) -> list[dict]:
    """One row per launch of each phase ``(name, run, costs)``: what the compile says and
    what ``costs`` says the algorithm needs (by kernel name: a Cost, or a list of one per
    launch of that kernel in the phase). Kernels whose name does not say fwd or bwd are
    labelled with their phase."""
    rows = []
    for phase, run, costs in phases:
        seen: dict[str, int] = {}
        for launch in record(run):
            name = launch.kernel.fn.__name__
            cost = costs[name] if isinstance(costs[name], Cost) else costs[name][seen.get(name, 0)]
            seen[name] = seen.get(name, 0) + 1
            label = f"{family}/{name}" if ("fwd" in name or "bwd" in name) else f"{family}/{name}[{phase}]"
            rows.append(row(label, workload, launch, cost))
    return rows


def row(label: str, workload: str, launch: Launch, cost: Cost) -> dict:
    used = describe(launch)
    programs = math.prod(launch.grid)
    resident = resident_per_sm(used["registers"], launch.num_warps, used["smem_bytes"])
    return {
        "kernel": label,
        "workload": workload,
        "programs": programs,
        "registers": used["registers"],
        "spill_bytes": used["spill_bytes"],
        "smem_bytes": used["smem_bytes"],
        "resident_per_sm": resident,
        "mma": used["mma"],
        "hbm_bytes": int(cost.hbm_bytes),
        "flops": int(cost.flops),
        "floor_us": round(floor_us(cost, used["mma"]), 2),
        "est_us": round(estimate_us(cost, programs, resident, used["mma"]), 2),
    }


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.empty(len(lengths) + 1, dtype=torch.int32, device=META)


def block_table(length: int, block: int) -> tuple:
    n = math.ceil(length / block)
    return torch.empty(n, dtype=torch.int32, device=META), torch.empty(n, dtype=torch.int32, device=META)


def attention_rows(
    variant: str,
    length: int,
    head_dim: int,
    batch: int = 2,
    heads: int = 8,
    dtype=torch.bfloat16,
    window: int = 64,
    top_k: int = 8,
) -> list[dict]:
    """Segment attention on one segment of ``length`` queries and keys: dense, local (a
    window of ``window``) or top-k."""
    from canvas_engineering.kernels import segment_attention as kernels

    block = kernels.block_rows(head_dim, "cuda", dtype)
    window_arg = window if variant == "local" else 0
    pairs = batch * heads * length * (min(length, window + 1) if variant == "local" else length)
    tensor = batch * length * heads * head_dim * BYTES[dtype]
    statistics = batch * heads * length * 4
    top = kernels.top_slots(top_k)
    forward, backward = attention_runs(
        dtype, length, head_dim, batch, heads, window=window_arg, top_k=top_k if variant == "top-k" else 0
    )

    kept = batch * heads * length * top
    gathered = kept * head_dim * BYTES[dtype]
    entry_bytes = kept * 4
    costs = {
        "segment_attention_fwd_kernel": Cost(4 * tensor + 2 * statistics, 4 * pairs * head_dim),
        "segment_attention_bwd_dkdv_kernel": Cost(6 * tensor + 3 * statistics, 8 * pairs * head_dim),
        "segment_attention_bwd_dq_kernel": Cost(5 * tensor + 3 * statistics, 6 * pairs * head_dim),
        "segment_topk_fwd_kernel": Cost(
            3 * tensor + gathered + 2 * statistics + entry_bytes, 2 * pairs * head_dim + 2 * kept * head_dim
        ),
        "segment_topk_bwd_dq_kernel": Cost(
            3 * tensor + 2 * gathered + 4 * statistics + 3 * entry_bytes, 6 * kept * head_dim
        ),
        "segment_topk_bwd_tied_kernel": Cost(2 * statistics, 0),
        "segment_topk_bwd_dkdv_kernel": Cost(
            2 * tensor + 2 * gathered + 4 * entry_bytes + 2 * statistics, 4 * kept * head_dim * block
        ),
    }
    name = f"attention-{variant}" + (
        f"-w{window}" if variant == "local" else f"-k{top_k}" if variant == "top-k" else ""
    )
    return rows_for(
        name,
        f"N{length}-M{length}-B{batch}-H{heads}-d{head_dim}-{SHORT[dtype]}",
        [("fwd", forward, costs), ("bwd", backward, costs)],
    )


def wkv_rows(length: int, batch: int, heads: int, head_dim: int, dtype=torch.bfloat16) -> list[dict]:
    """The RWKV WKV scan over one sequence of ``length`` steps. A part's own sums are one
    vectorised reduction over its steps, ``CARRY_BLOCK`` rows per load: ``steps / CARRY_BLOCK``
    waits; the forward's walk and the backward's adjoint walk load ``TILE`` steps at a time:
    ``steps / TILE`` waits. The backward recomputes each step's sums from its part's: the steps
    it re-reads for that (on average ``(TILE - 1) / 2 + steps / (2 TILE)`` per step, from the
    part's few kilobytes of k and v) are counted as FLOPs, not as global-memory bytes, and its
    reverse walk as one wait per step."""
    from canvas_engineering.kernels import wkv

    k, v = (torch.empty(batch, length, heads, head_dim, dtype=dtype, device=META) for _ in range(2))
    w = torch.empty(heads, head_dim, device=META)
    cu = offsets([length])

    part_state = torch.empty(wkv.part_state_shape(k, cu), device=META)
    run = lambda: wkv.wkv_fwd(k, v, w, w, cu)
    backward = lambda: wkv.wkv_bwd(k, k, v, w, w, part_state, cu)

    elements = batch * length * heads * head_dim
    size = BYTES[dtype]
    n_parts = wkv._parts(1, length, batch * heads, math.ceil(head_dim / wkv._channel_block(head_dim)))
    steps = math.ceil(length / n_parts)
    part_bytes = n_parts * batch * heads * head_dim * 4
    carried = part_bytes * (n_parts - 1) / 2
    recomputed_steps = (wkv.TILE - 1) / 2 + steps / (2 * wkv.TILE)
    costs = {
        "wkv_fwd_state_kernel": Cost(
            2 * elements * size + 3 * part_bytes, 12 * elements, math.ceil(steps / wkv.CARRY_BLOCK)
        ),
        "wkv_fwd_kernel": Cost(3 * elements * size + 3 * carried, 16 * elements, math.ceil(steps / wkv.TILE)),
        "wkv_bwd_state_kernel": Cost(
            3 * elements * size + 3 * carried + 4 * part_bytes, 26 * elements, math.ceil(steps / wkv.TILE)
        ),
        "wkv_bwd_kernel": Cost(
            5 * elements * size + 2 * part_bytes + 7 * carried, (30 + 8 * recomputed_steps) * elements, steps
        ),
    }
    return rows_for(
        "wkv",
        f"M{length}-B{batch}-H{heads}-d{head_dim}-{SHORT[dtype]}",
        [("fwd", run, costs), ("bwd", backward, costs)],
    )


def selective_scan_rows(length: int, batch: int, channels: int, state: int, dtype=torch.bfloat16) -> list[dict]:
    """The S6 selective scan over one sequence of ``length`` steps. A chunk's own state (and
    adjoint) is one vectorised reduction over its steps, ``state_rows`` rows per load; the
    forward's walk loads as many steps at a time."""
    from canvas_engineering.kernels import selective_scan

    x, dt = (torch.empty(batch, length, channels, dtype=dtype, device=META) for _ in range(2))
    bm, c = (torch.empty(batch, length, state, dtype=dtype, device=META) for _ in range(2))
    a = torch.empty(channels, state, device=META)
    skip = torch.empty(channels, device=META)
    cu = offsets([length])
    n_chunks = math.ceil(length / selective_scan.CHUNK)
    chunk_offsets = torch.empty(2, dtype=torch.int32, device=META)

    checkpoints = torch.empty(batch, n_chunks, channels, state, device=META)
    run = lambda: selective_scan.selective_scan_fwd(x, dt, a, bm, c, skip, cu, chunk_offsets, n_chunks)
    backward = lambda: selective_scan.selective_scan_bwd(x, x, dt, a, bm, c, skip, checkpoints, cu, chunk_offsets)

    size = BYTES[dtype]
    rows = batch * length
    states = rows * channels * state
    chunk_bytes = batch * n_chunks * channels * state * 4
    group = selective_scan.GROUP
    carried = chunk_bytes * ((min(group, n_chunks) - 1) / 2 + (math.ceil(n_chunks / group) - 1) / 2)
    channel_blocks = math.ceil(channels / 32)
    groups = selective_scan.block_groups(n_chunks, batch, channel_blocks)
    items = n_chunks * batch * groups
    walks = math.ceil(items / min(selective_scan.WORKERS, items)) * math.ceil(channel_blocks / groups)
    chunk = selective_scan.CHUNK
    state_waits = chunk // selective_scan.state_rows(chunk)
    costs = {
        "selective_scan_fwd_state_kernel": Cost(
            rows * (2 * channels + state) * size + chunk_bytes, 6 * states, state_waits
        ),
        "selective_scan_group_kernel": Cost(chunk_bytes * (1 + 1 / group), 4 * batch * n_chunks * channels * state),
        "selective_scan_fwd_kernel": Cost(
            rows * (3 * channels + 2 * state) * size + carried + 2 * chunk_bytes, 6 * states, state_waits
        ),
        "selective_scan_bwd_state_kernel": Cost(
            rows * (2 * channels + state) * size + chunk_bytes, 6 * states, state_waits
        ),
        "selective_scan_bwd_kernel": Cost(
            rows * (7 * channels + 3 * state) * size
            + 2 * groups * rows * state * 4
            + carried
            + 3 * chunk_bytes
            + 2 * states * 4,
            14 * states,
            2 * chunk * walks,
        ),
    }
    return rows_for(
        "selective-scan",
        f"M{length}-B{batch}-D{channels}-N{state}-{SHORT[dtype]}",
        [("fwd", run, costs), ("bwd", backward, costs)],
    )


def linear_rows(length: int, head_dim: int, batch: int = 2, heads: int = 8, dtype=torch.bfloat16) -> list[dict]:
    """Linear attention on one segment of ``length`` queries reading one key set of ``length``."""
    from canvas_engineering.kernels import linear_attention

    q, k, v = (torch.empty(batch, length, heads, head_dim, dtype=dtype, device=META) for _ in range(3))
    cu = offsets([length])
    keyset = torch.empty(1, dtype=torch.int32, device=META)
    blocks = block_table(length, linear_attention.BLOCK_ROWS)

    padded = max(16, head_dim)
    state = torch.empty(batch, heads, 1, padded, padded, device=META)
    normaliser = torch.empty(batch, heads, 1, padded, device=META)
    run = lambda: linear_attention.linear_attention_fwd(q, k, v, cu, cu, keyset, *blocks, 1e-6)
    backward = lambda: linear_attention.linear_attention_bwd(
        q, q, k, v, q, state, normaliser, cu, cu, keyset, *blocks, 1e-6
    )

    tensor = batch * length * heads * head_dim * BYTES[dtype]
    state_bytes = batch * heads * head_dim * (head_dim + 1) * 4
    products = 2 * batch * heads * length * head_dim * head_dim
    partials = linear_attention.parts(1, batch * heads) * state_bytes
    costs = {
        "linear_state_kernel": Cost(2 * tensor + partials, products),
        "linear_apply_kernel": Cost(2 * tensor + state_bytes, products),
        "linear_query_bwd_kernel": Cost(4 * tensor + state_bytes + partials, 2 * products),
        "linear_key_bwd_kernel": Cost(4 * tensor + state_bytes, 2 * products),
    }
    return rows_for(
        "linear-attention",
        f"N{length}-M{length}-B{batch}-H{heads}-d{head_dim}-{SHORT[dtype]}",
        [("fwd", run, costs), ("bwd", backward, costs)],
    )


def fftconv_rows(length: int, channels: int = 512, rows: int = 1 << 16, dtype=torch.float32) -> list[dict]:
    """Hyena's gated FFT convolution: ``rows // length`` segments of ``length`` rows (a power
    of two: the FFT length too), one batch row. The backward kernels that hold the whole
    transform (dense, fused) read mixed and gate again for the gate's chain rule, from the
    program's own tile of a few kilobytes, counted once (an L2 hit)."""
    from canvas_engineering.kernels import fftconv

    segments = rows // length
    fft = length
    mixed, gate = (torch.empty(1, rows, channels, dtype=dtype, device=META) for _ in range(2))
    spectrum = torch.empty(fft // 2 + 1, channels, 2, device=META)
    cu = offsets([length] * segments)
    classes = torch.empty(segments, dtype=torch.int32, device=META)

    run = lambda: fftconv.fftconv_fwd(mixed, gate, spectrum, cu, classes, [fft], [segments])
    backward = lambda: fftconv.fftconv_bwd(mixed, mixed, gate, spectrum, cu, classes, [fft], [segments])

    size = BYTES[dtype]
    elements = rows * channels
    spectral = segments * fft * channels * 2 * BYTES[fftconv.operand_dtype(dtype)]
    cols, fft_rows = fftconv.factors(fft)
    row_flops = 4 * fft_rows * fft * segments * channels
    column_flops = 8 * max(16, cols) ** 2 * fft_rows * segments * channels
    dense_flops = 8 * max(16, fft) ** 2 * segments * channels
    filter_bytes = segments * (fft // 2 + 1) * channels * 8
    forward_costs = {
        "fftconv_dense_fwd_kernel": Cost(3 * elements * size, dense_flops),
        "fftconv_fused_fwd_kernel": Cost(3 * elements * size, 2 * row_flops + 2 * column_flops),
        "fftconv_rows_kernel": Cost(2 * elements * size + spectral, row_flops),
        "fftconv_columns_fwd_kernel": Cost(2 * spectral, 2 * column_flops),
        "fftconv_inverse_rows_kernel": Cost(spectral + elements * size, row_flops),
    }
    backward_costs = {
        "fftconv_dense_bwd_kernel": Cost(5 * elements * size + filter_bytes, 2 * dense_flops),
        "fftconv_fused_bwd_kernel": Cost(5 * elements * size + filter_bytes, 3 * row_flops + 3 * column_flops),
        "fftconv_rows_kernel": [Cost(elements * size + spectral, row_flops), forward_costs["fftconv_rows_kernel"]],
        "fftconv_columns_bwd_kernel": Cost(3 * spectral + filter_bytes, 3 * column_flops),
        "fftconv_inverse_rows_kernel": Cost(spectral + 4 * elements * size, row_flops),
    }
    workload = f"L{length}-S{segments}-B1-D{channels}-{SHORT[dtype]}"
    rows = rows_for("fftconv", workload, [("fwd", run, forward_costs), ("bwd", backward, backward_costs)])
    return rows + [torch_fft_row(workload, elements, size, length, phase) for phase in ("fwd", "bwd")]


def torch_fft_row(workload: str, elements: int, size: int, length: int, phase: str) -> dict:
    """The anchor's floor: the eager forward or backward through ``torch.fft``, its inputs
    and outputs once and each intermediate as a pass over float32 data; 2.5 L log2 L FLOPs per
    real transform of L points, two transforms. Forward: reads mixed and gate, writes y; the
    gated input, rfft, the product with the filter, irfft and the cast each write or read
    float32: 3 * size + 32 bytes per element. Backward: reads dy, mixed and gate, writes both
    gradients; rfft of dy (writes 4), the product with conj(H) (8), irfft (8), the gate's two
    products (reading dx, then d mixed: 8), the filter gradient (reading DY and the saved
    spectrum: 8): 5 * size + 36 bytes per element. Its est_us is that floor."""
    hbm = elements * ((3 * size + 32) if phase == "fwd" else (5 * size + 36))
    flops = 2 * 2.5 * math.log2(length) * elements
    floor = max(hbm / BANDWIDTH, flops / RATES["none"]) * 1e6
    return {
        "kernel": f"fftconv/torch.fft[eager {phase}, floor only]",
        "workload": workload,
        "programs": None,
        "registers": None,
        "spill_bytes": None,
        "smem_bytes": None,
        "resident_per_sm": None,
        "mma": "none",
        "hbm_bytes": hbm,
        "flops": int(flops),
        "floor_us": round(floor, 2),
        "est_us": round(floor, 2),
    }


def workloads() -> list[tuple]:
    """Every reference workload: (label, the function giving its rows)."""
    jobs = []
    for length in (4096, 16384):
        for head_dim in (64, 128):
            shape = f"N{length}-d{head_dim}"
            for variant in ("dense", "local", "top-k"):
                jobs.append(
                    (f"attention-{variant} {shape}", lambda v=variant, n=length, d=head_dim: attention_rows(v, n, d))
                )
                if length == 4096:
                    jobs.append(
                        (
                            f"attention-{variant} {shape}-fp32",
                            lambda v=variant, n=length, d=head_dim: attention_rows(v, n, d, dtype=torch.float32),
                        )
                    )
            jobs.append((f"linear-attention {shape}", lambda n=length, d=head_dim: linear_rows(n, d)))
    jobs.append(("wkv M4096-H4", lambda: wkv_rows(4096, 2, 4, 64)))
    jobs.append(("wkv M16384-H8", lambda: wkv_rows(16384, 2, 8, 64)))
    for channels in (256, 512):
        jobs.append((f"selective-scan D{channels}", lambda d=channels: selective_scan_rows(4096, 2, d, 16)))
    for length in (64, 256, 1024, 4096, 8192):
        for dtype in (torch.float32, torch.bfloat16):
            jobs.append((f"fftconv L{length}-{SHORT[dtype]}", lambda n=length, t=dtype: fftconv_rows(n, dtype=t)))
    return jobs


COLUMNS = (
    "kernel",
    "workload",
    "programs",
    "registers",
    "spill_bytes",
    "smem_bytes",
    "resident_per_sm",
    "mma",
    "hbm_bytes",
    "flops",
    "floor_us",
    "est_us",
)


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows (est_us: the estimate of the module docstring)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("-" if row[c] is None else str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def report(only: list[str] | None = None) -> list[dict]:
    """The rows of every workload whose label contains one of ``only`` (all when None)."""
    return [row for label, job in workloads() if not only or any(part in label for part in only) for row in job()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as a JSON list here")
    parser.add_argument(
        "--only",
        action="append",
        help="run only the workloads whose label (family and shape, e.g. 'wkv M4096') contains this (repeatable)",
    )
    args = parser.parse_args(argv)
    rows = report(args.only)
    print("Estimates from sm_90 compiles and counted work; no GPU ran (see the module docstring).")
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
