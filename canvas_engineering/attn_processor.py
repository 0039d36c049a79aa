"""A diffusers attention processor that makes a CogVideoX backbone honour a canvas topology.

CogVideoX attends over one joint sequence: its ``L`` text tokens, then its ``P`` video
tokens (latent frames x patch rows x patch columns, flattened in that order). With
:class:`CanvasAttnProcessor` set on the transformer, text tokens still read and are read by
every token, and video token ``i`` reads video token ``j`` only where the topology's
mask over the layout says so (``topology.to_additive_mask(layout)``: the pairs its
connections join, with each position that reads nothing reading itself). Everything else
(projections, the query and key norms, the rotary embedding of the video tokens, the
output projection) is what diffusers' ``CogVideoXAttnProcessor2_0`` computes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from canvas_engineering.canvas import CanvasLayout
from canvas_engineering.connectivity import CanvasTopology
from canvas_engineering.looped_block import positive_int
from canvas_engineering.masks import block_rows
from canvas_engineering.plan import resolve_connections

BACKENDS = ("flex", "sdpa")


def token_grid(config, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The ``(frames, rows, cols)`` token grid a CogVideoX transformer makes of latents of
    ``num_frames`` x ``height`` x ``width``: the canvas grid of a layout for
    :class:`CanvasAttnProcessor` (``CanvasLayout(T=frames, H=rows, W=cols, ...)``).

    Args:
        config: the transformer's config (``patch_size`` and ``patch_size_t`` are read).
        num_frames, height, width: the latents' frames and spatial size.
    """
    patch, patch_t = config.patch_size, config.patch_size_t
    frames = num_frames if patch_t is None else -(-num_frames // patch_t)
    return frames, height // patch, width // patch


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``x`` (``(B, heads, S, head_dim)``) with ``cos`` and ``sin``
    tables (``(S, head_dim)``): each channel pair ``(a, b)`` becomes
    ``(a cos - b sin, b cos + a sin)``, computed in float32 and returned in ``x``'s dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos.to(x.device) + turned.float() * sin.to(x.device)).to(x.dtype)


def block_table(counts: torch.Tensor | None, indices: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A BlockMask's ``(1, 1, rows)`` counts and ``(1, 1, rows, cols)`` indices as a dense
    ``(rows, cols)`` bool table of the blocks they list (all False when None)."""
    if counts is None:
        return torch.zeros(rows, rows, dtype=torch.bool)
    listed = torch.arange(indices.shape[-1], device=counts.device) < counts[0, 0, :, None]
    return torch.zeros(listed.shape, dtype=torch.bool, device=counts.device).scatter(1, indices[0, 0].long(), listed)


class CanvasAttnProcessor:
    """Attention processor for diffusers' CogVideoX ``Attention`` modules that restricts
    video-to-video attention to a canvas topology.

    Set it with ``transformer.set_attn_processor(CanvasAttnProcessor(topology, layout))``.
    The layout's grid must be the transformer's token grid (:func:`token_grid`):
    ``T`` latent frames (after temporal patching) by ``H`` patch rows by ``W`` patch
    columns; its ``d_model`` is not read. Connection types, weights and the dispatcher's
    averaging do not apply here: the topology only decides which pairs attend.

    Args:
        topology: the connections; every region they name must be in ``layout``.
        layout: the ``(T, H, W)`` canvas over the video tokens.
        block_size: FlexAttention block size (the flex backend).
        backend: "flex" (compiled FlexAttention with the topology's block mask, joined with
            the text tokens), "sdpa" (``scaled_dot_product_attention`` with the joint
            additive mask) or None: flex for CUDA tensors, sdpa otherwise. PyTorch's
            FlexAttention has no backward pass on CPU.

    Raises:
        TypeError: for a topology or layout of the wrong class.
        ValueError: for a layout without exactly two spatial axes, a connection naming a
            region the layout lacks, a bad block size or an unknown backend.
    """

    def __init__(
        self, topology: CanvasTopology, layout: CanvasLayout, block_size: int = 128, backend: str | None = None
    ) -> None:
        if not isinstance(topology, CanvasTopology):
            raise TypeError(f"CanvasAttnProcessor: topology must be a CanvasTopology, got {type(topology).__name__}")
        if not isinstance(layout, CanvasLayout):
            raise TypeError(f"CanvasAttnProcessor: layout must be a CanvasLayout, got {type(layout).__name__}")
        if layout.n_spatial_dims != 2:
            raise ValueError(
                f"CanvasAttnProcessor: expected a layout over (frames, patch rows, patch cols), "
                f"got spatial_shape {layout.spatial_shape}"
            )
        if backend not in BACKENDS + (None,):
            raise ValueError(f"CanvasAttnProcessor: backend must be one of {list(BACKENDS)} or None, got {backend!r}")
        resolve_connections(topology, layout, strict=True, check_types=False)
        self.topology = topology
        self.layout = layout
        self.block_size = positive_int(block_size, "CanvasAttnProcessor: block_size")
        self.backend = backend
        self._masks: dict[tuple, object] = {}

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One attention of a CogVideoX block.

        Args:
            attn: diffusers' ``Attention`` module (``to_q``, ``to_k``, ``to_v``, ``norm_q``,
                ``norm_k``, ``to_out``, ``heads``, ``is_cross_attention``).
            hidden_states: video tokens, ``(B, P, inner_dim)`` with ``P = layout.num_positions``.
            encoder_hidden_states: text tokens, ``(B, L, inner_dim)``.
            attention_mask: must be None (CogVideoX passes none).
            image_rotary_emb: ``(cos, sin)``, each ``(P, head_dim)``, or None.

        Returns:
            ``(hidden_states, encoder_hidden_states)``: ``(B, P, inner_dim)`` and ``(B, L, inner_dim)``.
        """
        if attention_mask is not None:
            raise ValueError(
                "CanvasAttnProcessor: attention_mask is not supported (the topology is the mask); got a tensor"
            )
        video = self.layout.num_positions
        if hidden_states.dim() != 3 or hidden_states.shape[1] != video:
            raise ValueError(
                f"CanvasAttnProcessor: expected hidden_states of shape (B, {video}, inner_dim) for the layout's "
                f"{self.layout.T} x {self.layout.spatial_shape[0]} x {self.layout.spatial_shape[1]} token grid, "
                f"got {tuple(hidden_states.shape)}"
            )
        text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (
            projection(joint).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :text], rotated(query[:, :, text:], *image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :text], rotated(key[:, :, text:], *image_rotary_emb)], dim=2)
        backend = self.backend or ("flex" if query.is_cuda else "sdpa")
        if backend == "sdpa":
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=self.joint_additive_mask(text, query)
            )
        else:
            attended = self.flex(query, key, value, text)
        attended = attn.to_out[1](attn.to_out[0](attended.transpose(1, 2).flatten(2)))
        return attended[:, text:], attended[:, :text]

    def joint_additive_mask(self, text: int, like: torch.Tensor) -> torch.Tensor:
        """``(L + P, L + P)``, ``like``'s dtype and device: 0 where the joint sequence
        ``[text, video]`` attends, ``-inf`` where it does not (only video-video pairs)."""
        cache_key = ("additive", text, like.device, like.dtype)
        if cache_key not in self._masks:
            video = self.topology.to_additive_mask(self.layout, device=like.device).to(like.dtype)
            mask = torch.zeros(text + video.shape[0], text + video.shape[0], dtype=like.dtype, device=like.device)
            mask[text:, text:] = video
            self._masks[cache_key] = mask
        return self._masks[cache_key]

    def joint_block_mask(self, text: int, device: torch.device):
        """The FlexAttention BlockMask of the joint sequence in the order ``[video, text]``
        (so that video blocks are the topology's blocks): the topology's block mask
        (``to_block_mask(..., self_attend_unread=True)``) over video-video pairs, every
        pair with a text token attended. A block is full when it is a whole block and
        every pair in it attends."""
        cache_key = ("block", text, device)
        if cache_key in self._masks:
            return self._masks[cache_key]
        size, video = self.block_size, self.layout.num_positions
        total = video + text
        topology_mask = self.topology.to_block_mask(self.layout, size, device=device, self_attend_unread=True)
        video_blocks, blocks = -(-video // size), -(-total // size)
        partial = block_table(topology_mask.kv_num_blocks, topology_mask.kv_indices, video_blocks)[:, :video_blocks]
        full = block_table(topology_mask.full_kv_num_blocks, topology_mask.full_kv_indices, video_blocks)[
            :, :video_blocks
        ]
        starts = torch.arange(blocks, device=device) * size
        holds_text, only_text, whole = starts + size > video, starts >= video, starts + size <= total
        touched = holds_text[:, None] | holds_text[None, :]
        touched[:video_blocks, :video_blocks] |= partial.to(device) | full.to(device)
        complete = only_text[:, None] | only_text[None, :]
        complete[:video_blocks, :video_blocks] |= full.to(device)
        complete &= whole[:, None] & whole[None, :]
        video_pairs = topology_mask.mask_mod

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            with_text = (q_idx >= video) | (kv_idx >= video)
            return with_text | video_pairs(b, h, q_idx.clamp(max=video - 1), kv_idx.clamp(max=video - 1))

        block_mask = BlockMask.from_kv_blocks(
            *block_rows(touched & ~complete),
            *block_rows(complete),
            BLOCK_SIZE=size,
            mask_mod=mask_mod,
            seq_lengths=(total, total),
        )
        self._masks[cache_key] = block_mask
        return block_mask

    def flex(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text: int) -> torch.Tensor:
        """Compiled FlexAttention over the joint sequence, run in the order ``[video, text]``
        with :meth:`joint_block_mask` and returned in the order ``[text, video]``;
        ``(B, heads, L + P, head_dim)`` each."""
        block_mask = self.joint_block_mask(text, query.device)
        attended = compiled_flex_attention()(
            rolled(query, text), rolled(key, text), rolled(value, text), block_mask=block_mask
        )
        return rolled(attended, self.layout.num_positions)


def rolled(x: torch.Tensor, first: int) -> torch.Tensor:
    """``x`` (``(B, heads, S, head_dim)``) with its first ``first`` tokens moved to the end."""
    return torch.cat([x[:, :, first:], x[:, :, :first]], dim=2)


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process."""
    return torch.compile(flex_attention, dynamic=False)
