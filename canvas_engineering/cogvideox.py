"""Looped execution of diffusers' ``CogVideoXBlock`` (canvas-engineering 0.5.0's
``LoopedCogVideoXBlock`` and ``detect_inner_dim``).

A CogVideoX block carries two streams, the video tokens and the text tokens:
``block(hidden_states, encoder_hidden_states, temb, image_rotary_emb=..., attention_kwargs=...)``
returns the new ``(hidden_states, encoder_hidden_states)``. The looped wrapper gives each
stream its own loop embeddings and blends both with the same gate (see
:mod:`canvas_engineering.looped_block`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from canvas_engineering.looped_block import LoopedBlock, positive_int

logger = logging.getLogger(__name__)

FALLBACK_INNER_DIM = 1920
"""What :func:`block_width` returns, with a warning, when the block shows no width."""


class LoopedCogVideoXBlock(LoopedBlock):
    """Run a CogVideoX block ``current_loops`` times.

    Iteration ``l`` feeds the block ``hidden_states + loop_emb[l]`` and
    ``encoder_hidden_states + loop_emb_enc[l]`` and blends both of its outputs into the
    running states with ``g = sigmoid(loop_gate[l])``: ``h = g * h_new + (1 - g) * h``.

    Args:
        original_block: the block (diffusers' ``CogVideoXBlock`` or one with its signature).
        block_idx: the block's index in the transformer.
        max_loops: most iterations (>= 1); ``loop_emb`` and ``loop_emb_enc`` are
            ``(max_loops, inner_dim)`` zeros, ``loop_gate`` is ``(max_loops, 1)`` zeros.
        inner_dim: width of both streams (``num_attention_heads * attention_head_dim``).
        use_gradient_checkpointing: recompute each iteration in the backward pass when more
            than one loop runs with gradients enabled (0.5.0 always does).

    Raises:
        ValueError: for ``max_loops < 1``; at forward, for streams not ending in
            ``inner_dim`` or a block that does not return two tensors of the streams' shapes.
    """

    loop_parameter_names = ("loop_emb", "loop_emb_enc", "loop_gate")

    def __init__(
        self,
        original_block: nn.Module,
        block_idx: int,
        max_loops: int,
        inner_dim: int,
        *,
        use_gradient_checkpointing: bool = True,
    ) -> None:
        super().__init__(original_block, block_idx, max_loops)
        self.inner_dim = positive_int(inner_dim, "LoopedCogVideoXBlock: inner_dim")
        self.use_gradient_checkpointing = use_gradient_checkpointing
        self.loop_emb = nn.Parameter(torch.zeros(self.max_loops, self.inner_dim))
        self.loop_emb_enc = nn.Parameter(torch.zeros(self.max_loops, self.inner_dim))
        self.loop_gate = nn.Parameter(torch.zeros(self.max_loops, 1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Looped block call.

        Args:
            hidden_states: video tokens, ``(B, N, inner_dim)``.
            encoder_hidden_states: text tokens, ``(B, L, inner_dim)``.
            temb: the timestep embedding, ``(B, time_embed_dim)``, passed to the block as is.
            image_rotary_emb: the rotary ``(cos, sin)`` tables, each ``(N, head_dim)``, or None.
            attention_kwargs: passed to the block when given (diffusers' transformer passes it
                positionally under its own gradient checkpointing).
            **kwargs: passed to the block unchanged.

        Returns:
            ``(hidden_states, encoder_hidden_states)``, shapes as given.
        """
        self.check_width(hidden_states, self.loop_emb, "hidden_states")
        self.check_width(encoder_hidden_states, self.loop_emb_enc, "encoder_hidden_states")
        if attention_kwargs is not None:
            kwargs["attention_kwargs"] = attention_kwargs

        def block(h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.original(h, e, temb, image_rotary_emb=image_rotary_emb, **kwargs)
            output = tuple(output) if isinstance(output, (tuple, list)) else (output,)
            self.check_returned(output, (h, e), "(hidden_states, encoder_hidden_states)")
            return output

        return self.run_loops(
            (hidden_states, encoder_hidden_states),
            (self.loop_emb, self.loop_emb_enc),
            block,
            self.use_gradient_checkpointing,
        )


def detect_inner_dim(transformer: nn.Module) -> int:
    """The width of a CogVideoX transformer's blocks, read from its first block by
    :func:`block_width`.

    Raises:
        ValueError: when ``transformer`` has no ``transformer_blocks`` or they are empty.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(
            f"detect_inner_dim: {type(transformer).__name__} has no attribute 'transformer_blocks'; "
            f"expected a CogVideoX transformer"
        )
    if len(blocks) == 0:
        raise ValueError(f"detect_inner_dim: {type(transformer).__name__}.transformer_blocks is empty")
    return block_width(blocks[0])


def block_width(block: nn.Module) -> int:
    """A CogVideoX block's width: the first entry of ``norm1.normalized_shape``, else the
    length of ``norm1.weight``, else ``attn1.to_q.in_features``; 1920 (CogVideoX-2b's
    width) with a warning when it has none of them."""
    norm = getattr(block, "norm1", None)
    for value in (getattr(norm, "normalized_shape", None), getattr(norm, "weight", None)):
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    to_q = getattr(getattr(block, "attn1", None), "to_q", None)
    if isinstance(getattr(to_q, "in_features", None), int):
        return to_q.in_features
    logger.warning(
        "block_width: %s shows no width (norm1 or attn1.to_q); using %d", type(block).__name__, FALLBACK_INNER_DIM
    )
    return FALLBACK_INNER_DIM
