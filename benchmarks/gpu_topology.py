"""The topology paths for the GPU check: a full-attention backbone restricted to a canvas
topology, and the CogVideoX attention processor.

Usage: ``python benchmarks/gpu_topology.py OUT_DIR [--dry-run]``.

- Masks: the causal_temporal canvas (``canvases.py``) at 4096 and 16384 positions (T=16,
  16x16 and 32x32 grids), B=2, 8 heads of 64, bf16. Each size times compiled FlexAttention
  with the topology's block mask (block size 128, unread positions attending to themselves,
  so its pattern is the additive mask's), SDPA with the additive mask as a bool mask, and
  SDPA without a mask (the unrestricted backbone), forward and forward+backward, each with
  its first call (compilation included) apart; it records the block density and the
  largest difference between FlexAttention's and SDPA's outputs.
- Processor: the tiny CogVideoX of ``cogvideox_demo`` with the robot_manipulation
  topology set through :class:`CanvasAttnProcessor` on each backend, forward and backward;
  it records the largest difference between the two backends' outputs. Needs diffusers:
  without it the variant is recorded as failed with that reason.

Variants run with ``gpu_kernels.run_cases``: a failing one is recorded with its error and
the rest still run; OUT_DIR/topology.json is rewritten after every variant. ``--dry-run``
runs the same code on a CPU at toy sizes (FlexAttention forward only, since PyTorch's has
no CPU backward; the mask variant unfused); its timings mean nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from canvases import causal_temporal  # noqa: E402
from gpu_kernels import DEVICE, Case, first_call_ms, run_and_report, timed  # noqa: E402

HEADS, HEAD_DIM, BATCH = (8, 64, 2) if DEVICE == "cuda" else (2, 16, 1)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def timings(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool) -> dict[str, float | None]:
    """First-call and median milliseconds of ``forward`` (without autograd unless
    ``backward``) and, when ``backward``, of forward plus the gradients of ``leaves``."""
    if not backward:
        forward = torch.no_grad()(forward)
    grad = torch.randn_like(forward())
    result = {
        "fwd_first_call_ms": first_call_ms(forward),
        "fwd_ms": timed(forward),
        "fwd_bwd_first_call_ms": None,
        "fwd_bwd_ms": None,
    }
    if backward:
        step = lambda: torch.autograd.grad(forward(), leaves, grad)
        result.update(fwd_bwd_first_call_ms=first_call_ms(step), fwd_bwd_ms=timed(step))
    return result


def mask_case(variant: str, frames: int, grid: int) -> dict:
    """One attention over the causal_temporal canvas at ``frames`` x ``grid`` x ``grid``:
    ``variant`` is "flex_block_mask", "sdpa_additive_mask" or "sdpa_no_mask"."""
    from torch.nn.attention.flex_attention import flex_attention

    topology, layout = causal_temporal(T=frames, grid=grid)
    positions = layout.num_positions
    make = lambda: torch.randn(BATCH, HEADS, positions, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    q, k, v = make(), make(), make()
    result = {
        "variant": f"{variant}_P{positions}",
        "positions": positions,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": str(DTYPE),
    }
    reference = None
    if variant != "sdpa_no_mask":
        allowed = topology.to_additive_mask(layout, device=DEVICE) == 0
        reference = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        result["pairs_read"] = int(allowed.sum())
    if variant == "flex_block_mask":
        block_mask = topology.to_block_mask(layout, block_size=128, device=DEVICE, self_attend_unread=True)
        attend = torch.compile(flex_attention) if DEVICE == "cuda" else flex_attention
        inputs = (q, k, v) if DEVICE == "cuda" else (q.detach(), k.detach(), v.detach())
        forward = lambda: attend(*inputs, block_mask=block_mask)
        rows = -(-positions // 128)
        result["block_density"] = block_mask.kv_num_blocks.sum().item() / rows**2 + (
            block_mask.full_kv_num_blocks.sum().item() / rows**2 if block_mask.full_kv_num_blocks is not None else 0.0
        )
        with torch.no_grad():
            result["max_abs_diff_vs_sdpa_mask"] = (forward().float() - reference().float()).abs().max().item()
    elif variant == "sdpa_additive_mask":
        forward = reference
    else:
        forward = lambda: F.scaled_dot_product_attention(q, k, v)
    result.update(timings(forward, [q, k, v], backward=DEVICE == "cuda" or variant != "flex_block_mask"))
    return result


def processor_case() -> dict:
    """The tiny CogVideoX with the robot_manipulation topology in its attention, on each
    CanvasAttnProcessor backend (FlexAttention forward only on a CPU)."""
    from canvas_engineering.attn_processor import CanvasAttnProcessor
    from canvas_engineering.cogvideox_demo import TINY_COGVIDEOX, build, rotary_tables

    frames, height, width, text = 3, 8, 8, 6
    transformer, _, _, topology, layout = build(frames, height, width, loops=2)
    transformer.to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    latents = (
        torch.randn(2, frames, TINY_COGVIDEOX["in_channels"], height, width, generator=generator)
        .to(DEVICE)
        .requires_grad_(True)
    )
    prompt = torch.randn(2, text, TINY_COGVIDEOX["text_embed_dim"], generator=generator).to(DEVICE)
    timestep = torch.tensor([5, 600], device=DEVICE)
    rotary = tuple(t.to(DEVICE) for t in rotary_tables(TINY_COGVIDEOX, frames, height, width))
    result = {"variant": "cogvideox_processor", "video_tokens": layout.num_positions}
    outputs = {}
    for backend in ("sdpa", "flex"):
        transformer.set_attn_processor(CanvasAttnProcessor(topology, layout, backend=backend))
        forward = lambda: transformer(latents, prompt, timestep, image_rotary_emb=rotary, return_dict=False)[0]
        with torch.no_grad():
            outputs[backend] = forward().float()
        measured = timings(forward, [latents], backward=DEVICE == "cuda" or backend == "sdpa")
        result.update({f"{backend}_{key}": value for key, value in measured.items()})
    result["max_abs_diff_flex_vs_sdpa"] = (outputs["flex"] - outputs["sdpa"]).abs().max().item()
    return result


def cases() -> list[Case]:
    sizes = [(16, 16), (16, 32)] if DEVICE == "cuda" else [(2, 4)]
    variants = [
        (f"{variant}_T{frames}_grid{grid}", partial(mask_case, variant, frames, grid))
        for frames, grid in sizes
        for variant in ("flex_block_mask", "sdpa_additive_mask", "sdpa_no_mask")
    ]
    return variants + [("cogvideox_processor", processor_case)]


def print_table(report: dict) -> None:
    print(f"\n{'variant':<28}{'1st fwd ms':>11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'density':>9}{'max diff':>10}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['variant']:<28}FAILED: {r['error']}")
        elif r["variant"] == "cogvideox_processor":
            for backend in ("sdpa", "flex"):
                bwd = r[f"{backend}_fwd_bwd_ms"]
                print(
                    f"{'cogvideox_' + backend:<28}{r[f'{backend}_fwd_first_call_ms']:>11.1f}"
                    f"{r[f'{backend}_fwd_ms']:>10.3f}"
                    f"{'-' if bwd is None else f'{bwd:.3f}':>12}{'':>9}{r['max_abs_diff_flex_vs_sdpa']:>10.2e}"
                )
        else:
            bwd, diff = r["fwd_bwd_ms"], r.get("max_abs_diff_vs_sdpa_mask")
            print(
                f"{r['variant']:<28}{r['fwd_first_call_ms']:>11.1f}{r['fwd_ms']:>10.3f}"
                f"{'-' if bwd is None else f'{bwd:.3f}':>12}"
                f"{r.get('block_density', float('nan')):>9.3f}{'' if diff is None else f'{diff:.2e}':>10}"
            )


def main(out_dir: str) -> int:
    return run_and_report(out_dir, "topology.json", cases(), print_table)


if __name__ == "__main__":
    sys.exit(main(next(arg for arg in sys.argv[1:] if not arg.startswith("--"))))
