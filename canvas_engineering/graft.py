"""Grafting looped blocks onto a pretrained transformer (canvas-engineering 0.5.0's
``graft_looped_blocks``, ``freeze_full`` and ``freeze_half``).

Grafting replaces every block of ``transformer.<block_attr>`` in place by a looped wrapper
around it (:class:`~canvas_engineering.cogvideox.LoopedCogVideoXBlock` for CogVideoX
blocks, :class:`~canvas_engineering.looped_block.LoopedBlockWrapper` for any other), then
freezes part of the model and creates an :class:`~canvas_engineering.action_heads.ActionHead`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn as nn

from canvas_engineering.action_heads import ActionHead
from canvas_engineering.cogvideox import LoopedCogVideoXBlock, block_width
from canvas_engineering.looped_block import LoopedBlockWrapper, positive_int

logger = logging.getLogger(__name__)

FREEZE_MODES = ("full", "half", "none")
GENERIC_INNER_DIM = 256
"""The width given to generic blocks that have no parameter named ``*weight*``."""

LOOP_PARAMETER_NAMES = ("loop_emb", "loop_emb_enc", "loop_gate")
"""``freeze_full`` keeps trainable every parameter whose name contains one of these."""

FROZEN_BY_HALF = ("patch_embed", "pos_embedding")
"""``freeze_half`` freezes every parameter whose name contains one of these."""


def graft_looped_blocks(
    transformer: nn.Module,
    max_loops: int = 3,
    block_attr: str = "transformer_blocks",
    wrapper_class: type[nn.Module] | None = None,
    inner_dim: int | None = None,
    action_dim: int = 7,
    latent_channels: int = 16,
    freeze: str = "full",
) -> tuple[list[nn.Module], ActionHead]:
    """Wrap each block of ``transformer.<block_attr>`` for looped execution, in place.

    Args:
        transformer: the model; ``getattr(transformer, block_attr)`` must be a non-empty
            ``nn.ModuleList`` (or another indexable, assignable sequence of modules).
        max_loops: most loop iterations per block (>= 1). Wrapped blocks start at 1 loop;
            raise it with ``block.set_loops(n)``.
        block_attr: name of the block list.
        wrapper_class: the wrapper; by default ``LoopedCogVideoXBlock`` when the first block's
            class name contains "CogVideoX", else ``LoopedBlockWrapper``. It is called as
            ``wrapper_class(block, block_idx=i, max_loops=max_loops, inner_dim=inner_dim)``,
            except that a ``LoopedBlockWrapper`` (sub)class gets ``embed_dim=inner_dim``.
        inner_dim: width of the loop embeddings. By default, for CogVideoX blocks, the
            first block's width (:func:`~canvas_engineering.cogvideox.block_width`, as
            ``detect_inner_dim`` reads it); for other blocks ``shape[0]`` of the first block's first
            parameter named ``*weight*`` (256 if none), which is the hidden width only for
            some blocks: a wrapper whose width differs from its hidden states raises a
            ValueError at forward that says to pass ``inner_dim``.
        action_dim: output size of the returned ActionHead.
        latent_channels: input channels of the returned ActionHead.
        freeze: "full" (:func:`freeze_full`), "half" (:func:`freeze_half`) or "none".

    Returns:
        ``(looped_blocks, action_head)``: the wrappers, in block order, and a fresh ActionHead.

    Raises:
        ValueError: for a missing or empty block list, ``max_loops < 1`` or an unknown
            ``freeze`` mode, before the model is changed.
    """
    max_loops = positive_int(max_loops, "graft_looped_blocks: max_loops")
    if freeze not in FREEZE_MODES:
        raise ValueError(f"graft_looped_blocks: freeze must be one of {list(FREEZE_MODES)}, got {freeze!r}")
    blocks = getattr(transformer, block_attr, None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        lists = [
            name for name, child in transformer.named_children() if isinstance(child, nn.ModuleList) and len(child)
        ]
        if not hasattr(transformer, block_attr):
            found = "no such attribute"
        else:
            found = (
                f"{'an empty ' if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else 'a '}{type(blocks).__name__}"
            )
        raise ValueError(
            f"graft_looped_blocks: expected a non-empty nn.ModuleList of blocks at "
            f"{type(transformer).__name__}.{block_attr}, found {found}; non-empty ModuleLists of this model: {lists}"
        )
    is_cogvideox = "CogVideoX" in type(blocks[0]).__name__
    if wrapper_class is None:
        wrapper_class = LoopedCogVideoXBlock if is_cogvideox else LoopedBlockWrapper
    if inner_dim is None:
        inner_dim = block_width(blocks[0]) if is_cogvideox else _first_weight_rows(blocks[0])
    width_keyword = (
        "embed_dim"
        if isinstance(wrapper_class, type) and issubclass(wrapper_class, LoopedBlockWrapper)
        else "inner_dim"
    )

    looped_blocks = []
    for index in range(len(blocks)):
        looped = wrapper_class(blocks[index], block_idx=index, max_loops=max_loops, **{width_keyword: inner_dim})
        blocks[index] = looped
        looped_blocks.append(looped)
    logger.info(
        "grafted %d blocks with %s (width %d, max_loops %d)", len(blocks), wrapper_class.__name__, inner_dim, max_loops
    )

    if freeze == "full":
        freeze_full(transformer)
    elif freeze == "half":
        freeze_half(transformer)
    return looped_blocks, ActionHead(latent_channels, action_dim)


def _first_weight_rows(block: nn.Module) -> int:
    """``shape[0]`` of ``block``'s first parameter whose name contains "weight", or 256."""
    for name, parameter in block.named_parameters():
        if "weight" in name:
            return parameter.shape[0]
    return GENERIC_INNER_DIM


def freeze_full(transformer: nn.Module) -> int:
    """Make the loop parameters (names containing ``loop_emb``, ``loop_emb_enc`` or
    ``loop_gate``) trainable and freeze every other parameter; returns how many scalars
    were frozen."""
    return _freeze_unless(transformer, lambda name: any(part in name for part in LOOP_PARAMETER_NAMES))


def freeze_half(transformer: nn.Module) -> int:
    """Freeze the patch and positional embeddings (names containing ``patch_embed`` or
    ``pos_embedding``) and make every other parameter trainable; returns how many scalars
    were frozen."""
    return _freeze_unless(transformer, lambda name: not any(part in name for part in FROZEN_BY_HALF))


def _freeze_unless(transformer: nn.Module, trainable: Callable[[str], bool]) -> int:
    """Set ``requires_grad`` of every parameter to ``trainable(name)``; returns the number
    of scalars frozen."""
    frozen = 0
    for name, parameter in transformer.named_parameters():
        keep = trainable(name)
        parameter.requires_grad_(keep)
        frozen += 0 if keep else parameter.numel()
    return frozen
