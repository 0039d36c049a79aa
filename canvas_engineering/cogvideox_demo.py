"""A tiny CogVideoX with looped blocks and a canvas topology inside its attention, trained
for a few steps on a toy denoising target (random weights; nothing is downloaded).

Run with ``python -m canvas_engineering.cogvideox_demo`` (needs the ``cogvideox`` extra,
i.e. diffusers).
"""

from __future__ import annotations

import argparse
import time

import torch

TINY_COGVIDEOX: dict[str, object] = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=8,
    text_embed_dim=12,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=9,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=6,
    use_rotary_positional_embeddings=True,
)
"""A CogVideoXTransformer3DModel config of 35k parameters: width 32 (2 heads of 16),
2 blocks, 4 latent channels, 2 x 2 patches, 3D rotary embeddings. Latents of
``(B, 3, 4, 8, 8)`` give a token grid of 3 frames x 4 x 4 patches (48 video tokens)."""


def rotary_tables(config: dict[str, object], frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` tables, each ``(frames * rows * cols, head_dim)``, that diffusers'
    CogVideoX pipeline passes as ``image_rotary_emb`` for latents of ``frames`` x ``height``
    x ``width`` (token rows and columns are ``height / patch_size`` and ``width / patch_size``)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rows, cols = height // config["patch_size"], width // config["patch_size"]
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"],
        crops_coords=((0, 0), (rows, cols)),
        grid_size=(rows, cols),
        temporal_size=frames,
        device="cpu",
    )


def build(frames: int = 3, height: int = 8, width: int = 8, loops: int = 2, seed: int = 0):
    """The tiny CogVideoX (:data:`TINY_COGVIDEOX`, seed ``seed``) grafted with looped blocks
    (``loops`` iterations each, backbone frozen) and the robot_manipulation recipe's topology
    over its token grid set as every block's attention processor.

    Returns:
        ``(transformer, looped_blocks, action_head, topology, layout)``.
    """
    from diffusers import CogVideoXTransformer3DModel

    from canvas_engineering.attn_processor import CanvasAttnProcessor, token_grid
    from canvas_engineering.graft import graft_looped_blocks
    from canvas_engineering.recipes import robot_manipulation

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**TINY_COGVIDEOX)
    looped_blocks, action_head = graft_looped_blocks(
        transformer, max_loops=loops, latent_channels=TINY_COGVIDEOX["in_channels"], freeze="full"
    )
    for block in looped_blocks:
        block.set_loops(loops)
    grid_frames, rows, cols = token_grid(transformer.config, frames, height, width)
    if rows != cols:
        raise ValueError(f"the robot_manipulation recipe needs a square token grid, got {rows} x {cols}")
    inner_dim = TINY_COGVIDEOX["num_attention_heads"] * TINY_COGVIDEOX["attention_head_dim"]
    topology, layout = robot_manipulation(T=grid_frames, grid=rows, d_model=inner_dim)
    transformer.set_attn_processor(CanvasAttnProcessor(topology, layout))
    return transformer, looped_blocks, action_head, topology, layout


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> list:
    """Train the looped blocks and the action head for ``--steps`` steps on a toy denoising
    target (predict the noise of noisy latents, and a fixed action from the prediction);
    prints the loss, time and peak-memory growth of every step. Returns the losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--loops", type=int, default=2, help="loop iterations per block")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    args = parser.parse_args(argv)
    frames, height, width, text = 3, 8, 8, 6
    transformer, looped_blocks, action_head, topology, layout = build(frames, height, width, args.loops)
    print(
        f"tiny CogVideoX: {sum(p.numel() for p in transformer.parameters())} parameters, "
        f"{len(looped_blocks)} looped blocks x {args.loops} loops, "
        f"{sum(p.numel() for p in transformer.parameters() if p.requires_grad)} trainable + "
        f"{sum(p.numel() for p in action_head.parameters())} in the action head"
    )
    print(
        f"canvas: {layout.T} x {layout.spatial_shape[0]} x {layout.spatial_shape[1]} video tokens, "
        f"regions {list(layout.regions)}"
    )
    print(topology.summary())
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, frames, TINY_COGVIDEOX["in_channels"], height, width, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    prompt = torch.randn(args.batch, text, TINY_COGVIDEOX["text_embed_dim"], generator=generator)
    actions = torch.randn(args.batch, 7, generator=generator)
    timestep = torch.randint(0, 1000, (args.batch,), generator=generator)
    rotary = rotary_tables(TINY_COGVIDEOX, frames, height, width)
    trainable = [p for p in transformer.parameters() if p.requires_grad] + list(action_head.parameters())
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses, times = [], []
    print(
        f"before training: peak RSS {peak_rss_mib():.0f} MiB (the process so far: Python, torch, diffusers, the model)"
    )
    for step in range(args.steps):
        before, start = peak_rss_mib(), time.perf_counter()
        (prediction,) = transformer(
            0.7 * latents + 0.7 * noise, prompt, timestep, image_rotary_emb=rotary, return_dict=False
        )
        loss = torch.nn.functional.mse_loss(prediction, noise) + torch.nn.functional.mse_loss(
            action_head(prediction), actions
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        times.append(elapsed)
        print(
            f"step {step + 1}/{args.steps}: loss {loss.item():.4f}  ({elapsed * 1e3:.1f} ms forward+backward+step, "
            f"peak RSS {peak_rss_mib():.0f} MiB, +{peak_rss_mib() - before:.1f} MiB)"
        )
    if args.steps > 1:
        later = sorted(times[1:])
        print(
            f"steps 2-{args.steps}: median {later[len(later) // 2] * 1e3:.1f} ms, "
            f"fastest {later[0] * 1e3:.1f} ms per step"
        )
    return losses


if __name__ == "__main__":
    main()
