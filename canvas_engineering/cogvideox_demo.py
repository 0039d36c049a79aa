"""A tiny CogVideoX with looped blocks and a canvas topology inside its attention, trained
for a few steps on a toy denoising target (random weights; nothing is downloaded).

Run with ``python -m canvas_engineering.cogvideox_demo`` (needs the ``cogvideox`` extra,
i.e. diffusers).
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Tuple

import torch

TINY_COGVIDEOX: Dict[str, object] = dict(
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


def rotary_tables(config: Dict[str, object], frames: int, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
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
