"""Compiles every Triton kernel, in its main configurations, to sm_90 machine code on this
machine (Triton's bundled ptxas; no GPU needed), with the divisibility hints a launch gives
aligned pointers; the segment attention configurations are the launchers' own launches,
recorded on ``meta`` tensors (:func:`record`), compiled with every hint the JIT derives from
their arguments (strides too, :func:`launch_signature`). Run without TRITON_INTERPRET.
``benchmarks/launch_report.py`` uses the same helpers on the launchers' own arguments.

Usage: ``python compile_for_hopper.py`` prints one line per configuration, then how many
compiled with which Triton, and exits non-zero if any fails to compile.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from canvas_engineering.kernels import fftconv, linear_attention, selective_scan, wkv
from canvas_engineering.kernels import segment_attention as attention

STATISTICS = {
    "LSE",
    "TIED_THRESHOLD",
    "SELECTED_P",
    "SELECTED_DS",
    "DELTA",
    "W",
    "U",
    "INV_DEN",
    "BONUS_SHARE",
    "DW_PARTIAL",
    "DU_PARTIAL",
    "A",
    "DSKIP",
    "CHECKPOINTS",
    "SCRATCH",
    "DA_PARTIAL",
    "DBM_PARTIAL",
    "DC_PARTIAL",
    "DDSKIP_PARTIAL",
    "PART_NUMERATOR",
    "PART_DENOMINATOR",
    "PART_EXPONENT",
    "PART_ALPHA",
    "PART_BETA",
    "PART_LAGGED_ALPHA",
    "PART_LAGGED_BETA",
    "CHUNK_STATE",
    "CHUNK_DT",
    "CHUNK_ADJOINT",
    "GROUP_STATE",
    "GROUP_DT",
    "STATE",
    "NORMALISER",
    "STATE_PARTIAL",
    "NORMALISER_PARTIAL",
    "DSTATE",
    "DNORMALISER",
    "DSTATE_PARTIAL",
    "DNORMALISER_PARTIAL",
    "SPECTRUM",
    "TWIDDLE",
    "DSPECTRUM_PARTIAL",
}
INT_POINTERS = {
    "cu_seqlens_q",
    "cu_seqlens_k",
    "cu_seqlens",
    "block_segment",
    "block_start",
    "checkpoint_offsets",
    "segment_keyset",
    "class_segments",
    "selection",
    "entry_order",
    "entry_start",
    "tied_prefix",
    "keyset_segments",
    "cu_keyset_segments",
    "block_keyset",
}
FLOATS = {"scale", "eps"}
SHARED_MEMORY = 227 * 1024
"""Shared memory one program may use on an H100."""
TARGET = GPUTarget("cuda", 90, 32)
DIVISIBLE = [["tt.divisibility", 16]]
"""The hint the JIT attaches to a pointer (or integer) that is a multiple of 16 at launch."""
DOTS = {"bf16": tl.bfloat16, "fp16": tl.bfloat16, "fp32": tl.float32}
"""The ``tl.dot`` operand type a launcher chooses on the GPU for inputs of each type."""
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


def signature(kernel, data_type: str) -> dict:
    """Triton signature types for a kernel's arguments: data pointers in ``data_type``."""
    types = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
        elif name in STATISTICS:
            types[name] = "*fp32"
        elif name in INT_POINTERS:
            types[name] = "*i32"
        elif name in FLOATS:
            types[name] = "fp32"
        elif name.isupper():
            types[name] = f"*{data_type}"
        else:
            types[name] = "i32"
    return types


def pointer_hints(kernel, types: dict) -> dict:
    """Divisibility hints for every pointer argument: what the JIT gives a tensor whose data
    starts 16-byte aligned (every fresh allocation of the caching allocator)."""
    return {(i,): DIVISIBLE for i, param in enumerate(kernel.params) if types[param.name].startswith("*")}


def launch_signature(kernel, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, hints) the JIT derives from a launch's argument ``values`` (by
    name): tensors become typed pointers, hinted when 16-byte aligned; integers 1 become
    constants, others i32 (i64 past its range), hinted when multiples of 16; floats fp32."""
    types, constexprs, hints = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            types[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            types[param.name] = f"*{TYPES[value.dtype]}"
            if value.data_ptr() % 16 == 0:
                hints[(i,)] = DIVISIBLE
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                hints[(i,)] = DIVISIBLE
        else:
            types[param.name] = "fp32"
    return types, constexprs, hints


def compile_sm90(kernel, types: dict, constexprs: dict, hints: dict, num_warps: int = 4):
    """The kernel compiled to sm_90 machine code (Triton's bundled ptxas, no GPU)."""
    source = ASTSource(kernel, types, constexprs, hints)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    if compiled.metadata.shared > SHARED_MEMORY:
        raise ValueError(f"needs {compiled.metadata.shared} bytes of shared memory, more than {SHARED_MEMORY}")
    return compiled


def tensor_core_instruction(ptx: str) -> str:
    """The matrix instruction of a PTX listing: ``wgmma-bf16``, ``wgmma-tf32``,
    ``mma.sync-f16``, ... (the operand types of the first one found), or ``none``."""
    found = re.search(r"\bwgmma\.mma_async\S*?\.(bf16|f16|tf32|e4m3|e5m2|s8)\b", ptx)
    if found:
        return f"wgmma-{found.group(1)}"
    found = re.search(r"\bmma\.sync\S*?\.(bf16|f16|tf32|e4m3|e5m2|s8)\b", ptx)
    return f"mma.sync-{found.group(1)}" if found else "none"


def resources(compiled) -> dict:
    """Registers per thread and stack bytes per thread (spills) of a compiled kernel, read
    with Triton's bundled cuobjdump; shared memory per program; the tensor-core instruction."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return {
        "registers": registers,
        "spill_bytes": stack,
        "smem_bytes": compiled.metadata.shared,
        "mma": tensor_core_instruction(compiled.asm["ptx"]),
    }


def attention_tiles(kind: str, head_dim: int, data_type: str) -> tuple[dict, int]:
    """(constexprs, warps) the attention launchers give kernel ``kind`` on a GPU."""
    dtype = {name: dtype for dtype, name in TYPES.items()}[data_type]
    constexprs = attention.launch_arguments(kind, head_dim, attention.block_rows(head_dim, "cuda", dtype), dtype)
    return constexprs, constexprs.pop("num_warps")


@dataclass
class Launch:
    kernel: JITFunction
    grid: tuple
    values: dict
    num_warps: int


def record(run: Callable[[], object]) -> list[Launch]:
    """The launches ``run`` makes, recorded instead of executed (its tensors on ``meta``)."""
    launches: list[Launch] = []

    def capture(self, *args, grid, warmup, **kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        values = dict(zip([p.name for p in self.params], args))
        values.update(kwargs)
        launches.append(Launch(self, tuple(grid) + (1,) * (3 - len(grid)), values, num_warps))

    with mock.patch.object(JITFunction, "run", capture):
        run()
    return launches


def attention_runs(
    dtype: torch.dtype,
    length: int,
    head_dim: int,
    batch: int = 2,
    heads: int = 8,
    window: int = 0,
    sigmoid: bool = False,
    top_k: int = 0,
) -> tuple:
    """(forward, backward): the segment attention launchers on one segment of ``length``
    queries reading one key set of ``length`` keys, ``(batch, length, heads, head_dim)``
    tensors of ``dtype`` on ``meta`` (to run under :func:`record`); top-k when ``top_k``."""
    meta = torch.device("meta")
    block = attention.block_rows(head_dim, "cuda", dtype)
    q, k, v = (torch.empty(batch, length, heads, head_dim, dtype=dtype, device=meta) for _ in range(3))
    cu = torch.empty(2, dtype=torch.int32, device=meta)
    keyset = torch.empty(1, dtype=torch.int32, device=meta)
    keysets = (keyset, keyset, cu)
    blocks = tuple(torch.empty(math.ceil(length / block), dtype=torch.int32, device=meta) for _ in range(2))
    lse = torch.empty(batch, heads, length, device=meta)
    selection = torch.empty(batch, heads, length, attention.top_slots(top_k) + 2, dtype=torch.int32, device=meta)

    def forward():
        if top_k:
            attention.segment_topk_attention_fwd(q, k, v, cu, cu, keyset, *blocks, 0.125, block, top_k)
        else:
            attention.segment_attention_fwd(q, k, v, cu, cu, keyset, *blocks, 0.125, block, window, sigmoid)

    def backward():
        if top_k:
            attention.segment_topk_attention_bwd(
                q, q, k, v, q, lse, selection, cu, cu, *keysets, *blocks, *blocks, 0.125, block
            )
        else:
            attention.segment_attention_bwd(
                q, q, k, v, q, lse, cu, cu, *keysets, *blocks, *blocks, 0.125, block, window, sigmoid
            )

    return forward, backward


def attention_configs() -> list[Launch]:
    """The launches (forward and backward, N = M = 4096, B 2, H 8) of the dense kernels with a
    window (bf16, d 64), plain (bf16 and fp32, d 128) and with sigmoid weights (fp16, d 16);
    of the top-k kernels (k 8) at bf16 d 64 and 128, fp32 d 128."""
    variants = [
        (torch.bfloat16, 64, {"window": 8}),
        (torch.bfloat16, 128, {}),
        (torch.float32, 128, {}),
        (torch.float16, 16, {"sigmoid": True}),
        (torch.bfloat16, 64, {"top_k": 8}),
        (torch.bfloat16, 128, {"top_k": 8}),
        (torch.float32, 128, {"top_k": 8}),
    ]
    return [
        launch
        for dtype, head_dim, flags in variants
        for run in attention_runs(dtype, 4096, head_dim, **flags)
        for launch in record(run)
    ]


def wkv_configs():
    carry = {"CLAMP": wkv.KEY_CLAMP, "CARRY": wkv.CARRY_BLOCK}
    kernels = {
        wkv.wkv_fwd_state_kernel: carry,
        wkv.wkv_fwd_kernel: {**carry, "TILE": wkv.TILE},
        wkv.wkv_bwd_state_kernel: {**carry, "TILE": wkv.TILE},
        wkv.wkv_bwd_kernel: {**carry, "TILE": wkv.TILE},
    }
    for kernel, flags in kernels.items():
        for data_type, head_dim in (("bf16", 64), ("fp32", 128)):
            yield kernel, data_type, {"HEAD_DIM": head_dim, "BLOCK_D": wkv._channel_block(head_dim), **flags}, 1


def scan_configs():
    carry = {"CARRY": selective_scan.CARRY_BLOCK, "GROUP": selective_scan.GROUP}
    rows = {"ROWS": selective_scan.state_rows(selective_scan.CHUNK)}
    kernels = {
        selective_scan.selective_scan_fwd_state_kernel: rows,
        selective_scan.selective_scan_fwd_kernel: {**carry, **rows},
        selective_scan.selective_scan_bwd_state_kernel: rows,
        selective_scan.selective_scan_bwd_kernel: carry,
    }
    shape = {"BLOCK_D": 32, "BLOCK_N": 16, "CHUNK": selective_scan.CHUNK, "SEARCH": selective_scan.SEARCH_BLOCK}
    for kernel, flags in kernels.items():
        for data_type in ("bf16", "fp32"):
            yield kernel, data_type, {**shape, **flags}
    for forward in (True, False):
        yield selective_scan.selective_scan_group_kernel, "fp32", {**shape, **carry, "FORWARD": forward}


def linear_configs():
    """The four kernels at bf16 d 64 and d 128 and float32 d 128 (relu), with the launcher's
    rows per step and warps."""
    kernels = {
        linear_attention.linear_state_kernel: "state",
        linear_attention.linear_apply_kernel: "apply",
        linear_attention.linear_query_bwd_kernel: "query_bwd",
        linear_attention.linear_key_bwd_kernel: "key_bwd",
    }
    variants = ((torch.bfloat16, 64, False), (torch.bfloat16, 128, False), (torch.float32, 128, True))
    for kernel, kind in kernels.items():
        for dtype, head_dim, relu in variants:
            launch = linear_attention.launch_config(kind, dtype, head_dim, head_dim)
            yield (
                kernel,
                TYPES[dtype],
                {
                    "HEAD_DIM": head_dim,
                    "VALUE_DIM": head_dim,
                    "BLOCK_D": head_dim,
                    "BLOCK_E": head_dim,
                    "BLOCK": launch["BLOCK"],
                    "RELU": relu,
                    "DOT": DOTS[TYPES[dtype]],
                },
                launch["num_warps"],
            )


def fftconv_configs():
    """The dense kernels at L = 16 and 64; the fused kernels at L = 256; the three passes at
    L = 1024 and 8192 (both variants of the row passes at 8192), with the launchers' block sizes
    and warps for 1024 channels."""
    for data_type, length in (("bf16", 16), ("fp32", 64)):
        launch = fftconv.launch_config("dense", length, 1024)
        for kernel in (fftconv.fftconv_dense_fwd_kernel, fftconv.fftconv_dense_bwd_kernel):
            yield (
                kernel,
                data_type,
                {"LENGTH": length, "PADDED": max(16, length), "BLOCK_C": launch["BLOCK_C"], "DOT": DOTS[data_type]},
                launch["num_warps"],
            )
    cols, rows = fftconv.factors(256)
    launch = fftconv.launch_config("fused", 256, 1024)
    for data_type in ("bf16", "fp32"):
        for kernel in (fftconv.fftconv_fused_fwd_kernel, fftconv.fftconv_fused_bwd_kernel):
            yield (
                kernel,
                data_type,
                {"LENGTH": 256, "ROWS": rows, "COLS": cols, "BLOCK_C": launch["BLOCK_C"], "DOT": DOTS[data_type]},
                launch["num_warps"],
            )
    for data_type, length, flags in (("fp32", 1024, (True,)), ("bf16", 8192, (True, False))):
        cols, rows = fftconv.factors(length)
        shape = {"LENGTH": length, "ROWS": rows, "COLS": cols, "DOT": DOTS[data_type]}
        launch = fftconv.launch_config("rows", length, 1024)
        for flag in flags:
            passes = {"BLOCK_K": fftconv.BLOCK_K, "BLOCK_C": launch["BLOCK_C"]}
            yield fftconv.fftconv_rows_kernel, data_type, {**shape, **passes, "GATED": flag}, launch["num_warps"]
            yield (
                fftconv.fftconv_inverse_rows_kernel,
                data_type,
                {**shape, **passes, "BACKWARD": flag},
                launch["num_warps"],
            )
        launch = fftconv.launch_config("columns", length, 1024)
        for kernel in (fftconv.fftconv_columns_fwd_kernel, fftconv.fftconv_columns_bwd_kernel):
            yield (
                kernel,
                data_type,
                {**shape, "BLOCK_COLS": max(16, cols), "BLOCK_C": launch["BLOCK_C"]},
                launch["num_warps"],
            )


def all_configs() -> list:
    """Every configuration compiled (built on call, so that importing the helpers needs no kernel)."""
    return [*attention_configs(), *wkv_configs(), *scan_configs(), *linear_configs(), *fftconv_configs()]


def main() -> int:
    failures = 0
    configs = all_configs()
    for config in configs:
        if isinstance(config, Launch):
            kernel, warps = config.kernel, [config.num_warps]
            types, constexprs, hints = launch_signature(kernel, config.values)
            data_type = types[kernel.params[0].name][1:]
        else:
            kernel, data_type, constexprs, *warps = config
            types = signature(kernel, data_type)
            hints = pointer_hints(kernel, types)
        options = {"num_warps": warps[0]} if warps else {}
        label = f"{kernel.fn.__name__} {data_type} {constexprs}" + (f" num_warps={warps[0]}" if warps else "")
        try:
            compiled = compile_sm90(kernel, types, constexprs, hints, **options)
            used = resources(compiled)
            print(
                f"ok   {label}: {len(compiled.asm['cubin'])} bytes of sm_90 code, {used['registers']} registers, "
                f"{used['spill_bytes']} bytes stack, {used['smem_bytes']} bytes shared, {used['mma']}"
            )
        except Exception:
            failures += 1
            print(f"FAIL {label}\n{traceback.format_exc()}")
    print(
        f"{len(configs) - failures} of {len(configs)} configurations compiled for sm_90 "
        f"with triton {triton.__version__}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
