"""The topology as one mask over the whole canvas, for backbones that run a single attention.

:class:`MaskTables` holds a topology's mask compressed by *position classes*. The compiled
segments (:func:`canvas_engineering.plan.compile_segments`) each join a set of query
positions to a set of key positions with a weight. Positions that lie in exactly the same
query sets form one query class (they read the same keys with the same weights), and
likewise for key sets and key classes. A ``(Cq, Ck)`` table holds the weight with which a
query class reads a key class: the largest weight of the segments joining them. The dense
``(P, P)`` masks are that table gathered by the two ``(P,)`` class vectors; the FlexAttention
block mask is derived from the classes each block of positions holds, and its ``mask_mod``
looks the classes up, so no ``(P, P)`` tensor is made for it.

The number of classes depends on the regions and frames, not on the grid's resolution: the
query sets are region boxes at one frame or at all frames, so a query class is a cell of the
arrangement of those boxes (at most ``T * (2R + 1)**d`` of them for R regions on d spatial
axes), and likewise for keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from canvas_engineering.canvas import CanvasLayout, as_integer
from canvas_engineering.connectivity import CanvasTopology, MaskSpec
from canvas_engineering.ops.segments import moved_to
from canvas_engineering.plan import compile_segments, resolve_connections

__all__ = ["MaskSpec", "MaskTables", "position_classes"]

BITS = 63
"""Set memberships packed per int64 word (bits 0..62, so that every word is >= 0)."""

PRODUCT_CHUNK = 1 << 22
"""Largest number of elements one broadcast product of :func:`max_product` holds."""


def position_classes(sets: Sequence[tuple[int, ...]], num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the positions ``0 .. P-1`` by the sets that hold them.

    Args:
        sets: U non-empty sets of flat canvas positions (each without repeats).
        num_positions: P.

    Returns:
        ``(classes, members)``: ``(P,)`` long, the class of each position (positions held
        by exactly the same sets share one; classes are numbered from 0 without gaps), and
        ``(C, U)`` bool, which sets hold the positions of each class.
    """
    words = max(1, -(-len(sets) // BITS))
    lengths = [len(s) for s in sets]
    starts = torch.tensor(list(itertools.accumulate(lengths[:-1])), dtype=torch.long)
    set_ids = torch.zeros(sum(lengths), dtype=torch.long).index_fill_(0, starts, 1).cumsum(0)
    positions = torch.tensor(list(itertools.chain.from_iterable(sets)), dtype=torch.long)
    packed = torch.zeros(words, num_positions, dtype=torch.long)
    packed.index_put_((set_ids // BITS, positions), torch.ones_like(set_ids) << (set_ids % BITS), accumulate=True)
    # Refine the classes word by word: a position's class after a word is its pair
    # (class before, value of the word), renumbered.
    classes = torch.zeros(num_positions, dtype=torch.long)
    for word in packed:
        values, inverse = torch.unique(word, return_inverse=True)
        _, classes = torch.unique(classes * len(values) + inverse, return_inverse=True)
    # The first position of each class stands for it.
    first = torch.full((int(classes.max()) + 1,), num_positions).scatter_reduce(
        0, classes, torch.arange(num_positions), "amin"
    )
    bits = (packed[:, first].T.unsqueeze(-1) >> torch.arange(BITS)) & 1
    return classes, bits.reshape(len(first), words * BITS)[:, : len(sets)].bool()


def max_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out[x, z] = max_y left[x, y] * right[y, z]`` for non-negative ``(X, Y)`` and ``(Y, Z)``
    (0 when Y = 0), broadcast over row chunks of at most :data:`PRODUCT_CHUNK` elements."""
    rows, inner, columns = left.shape[0], left.shape[1], right.shape[1]
    if inner == 0:
        return left.new_zeros(rows, columns)
    step = max(1, PRODUCT_CHUNK // max(1, inner * columns))
    return torch.cat(
        [(left[i : i + step, :, None] * right).amax(1) for i in range(0, rows, step)] or [left.new_zeros(0, columns)]
    )


def block_rows(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(n, n)`` bool block table as BlockMask rows: ``(1, 1, n)`` int32 counts per row,
    and ``(1, 1, n, n)`` int32 column indices, each row's chosen columns first, ascending."""
    counts = blocks.sum(1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def checked_block_size(block_size: object) -> int:
    """``block_size`` as an int, or ValueError when it is not a positive integer."""
    size = as_integer(block_size)
    if size is None or size < 1:
        raise ValueError(f"to_block_mask: block_size must be a positive integer, got {block_size!r}")
    return size


@dataclass(eq=False)
class MaskTables:
    """A topology's mask over a canvas of P positions, by position class.

    Attributes:
        query_class: ``(P,)`` long, each position's class as a query.
        key_class: ``(P,)`` long, each position's class as a key.
        weight: ``(Cq, Ck)`` float64, the weight with which a query class reads a key class
            (the largest over the segments joining them; 0 where none does).
    """

    query_class: torch.Tensor
    key_class: torch.Tensor
    weight: torch.Tensor

    @staticmethod
    def build(topology: CanvasTopology, layout: CanvasLayout, strict: bool = True) -> MaskTables:
        """The tables of ``topology`` on ``layout``, from its compiled segments (every
        connection with its own frame offsets and fill; the attention types are not read).

        Raises:
            ValueError: for a connection naming a region the layout lacks; with ``strict``
                False, a warning, and the connection is left out.
        """
        connections, _ = resolve_connections(topology, layout, strict, check_types=False)
        segments, _ = compile_segments(connections, layout)
        query_sets: dict[tuple[int, ...], int] = {}
        key_sets: dict[tuple[int, ...], int] = {}
        pairs = torch.tensor(
            [
                (
                    query_sets.setdefault(s.query_positions, len(query_sets)),
                    key_sets.setdefault(s.key_positions, len(key_sets)),
                )
                for s in segments
            ],
            dtype=torch.long,
        ).reshape(-1, 2)
        weights = torch.tensor([s.weight for s in segments], dtype=torch.float64)
        query_class, query_members = position_classes(list(query_sets), layout.num_positions)
        key_class, key_members = position_classes(list(key_sets), layout.num_positions)
        pair_weight = (
            torch.zeros(len(query_sets) * len(key_sets), dtype=torch.float64)
            .scatter_reduce(0, pairs[:, 0] * len(key_sets) + pairs[:, 1], weights, "amax")
            .view(len(query_sets), len(key_sets))
        )
        weight = max_product(query_members.double(), max_product(pair_weight, key_members.double().T))
        return MaskTables(query_class, key_class, weight)

    def to(self, device: str | torch.device) -> MaskTables:
        """A copy with every tensor on ``device``."""
        return moved_to(self, torch.device(device))

    def values(self) -> torch.Tensor:
        """``(Cq, Ck)``: the weight table in torch's default dtype, the mask's values."""
        return self.weight.to(torch.get_default_dtype())

    def expand(self, table: torch.Tensor) -> torch.Tensor:
        """A ``(Cq, Ck)`` class table gathered into its ``(P, P)`` position table."""
        return table.index_select(0, self.query_class).index_select(1, self.key_class)

    def unread(self) -> torch.Tensor:
        """``(P,)`` bool: the positions that read no position (their mask row is all 0)."""
        return ~(self.values() > 0).any(1)[self.query_class]

    def weight_mask(self) -> torch.Tensor:
        """``(P, P)``, default dtype: the weight with which position i reads position j."""
        return self.expand(self.values())

    def additive_mask(self) -> torch.Tensor:
        """``(P, P)``, default dtype: 0.0 where position i reads j, ``-inf`` elsewhere, and
        0.0 on the diagonal of the positions that read nothing."""
        values = self.values()
        mask = self.expand(torch.zeros_like(values).masked_fill(values <= 0, float("-inf")))
        idle = self.unread().nonzero().squeeze(1)
        mask[idle, idle] = 0.0
        return mask

    def block_mask(self, block_size: int, self_attend_unread: bool = False) -> BlockMask:
        """The FlexAttention BlockMask of the mask's pattern (``values > 0``; with
        ``self_attend_unread``, plus the diagonal of the positions that read nothing).

        A block of ``block_size`` query rows and ``block_size`` key columns is skipped when
        no pair in it is read, full when it is a whole block (not the short last one) and
        every pair in it is read, and partial otherwise: counted from the classes each block
        holds, ``(blocks, Cq) @ (Cq, Ck) @ (Ck, blocks)``. Memory: ``O(blocks**2 + P)``.

        Raises:
            ValueError: for a block_size that is not a positive integer.
        """
        size = checked_block_size(block_size)
        num_positions = self.query_class.shape[0]
        device = self.weight.device
        blocks = -(-num_positions // size)
        block = torch.arange(num_positions, device=device) // size
        read = self.values() > 0
        query_present = torch.zeros(blocks, read.shape[0], dtype=torch.float64, device=device)
        query_present[block, self.query_class] = 1.0
        key_present = torch.zeros(blocks, read.shape[1], dtype=torch.float64, device=device)
        key_present[block, self.key_class] = 1.0
        touched = query_present @ read.double() @ key_present.T > 0
        missed = query_present @ (~read).double() @ key_present.T > 0
        whole = torch.bincount(block, minlength=blocks) == size
        full = touched & ~missed & whole[:, None] & whole[None, :]
        unread = self.unread() & self_attend_unread
        touched[block[unread], block[unread]] = True
        query_class, key_class = self.query_class, self.key_class

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return read[query_class[q_idx], key_class[kv_idx]] | (unread[q_idx] & (q_idx == kv_idx))

        return BlockMask.from_kv_blocks(
            *block_rows(touched & ~full),
            *block_rows(full),
            BLOCK_SIZE=size,
            mask_mod=mask_mod,
            seq_lengths=(num_positions, num_positions),
        )

    def score_mod(self) -> Callable:
        """A FlexAttention ``score_mod`` adding the log of the mask's value to each pair's
        score (0 where the value is 0: those pairs are the block mask's to exclude)."""
        values = self.values()
        log_weight = torch.where(values > 0, values.log(), 0.0)
        query_class, key_class = self.query_class, self.key_class

        def score_mod(
            score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return score + log_weight[query_class[q_idx], key_class[kv_idx]]

        return score_mod

    def explain(self, block_size: int) -> str:
        """The read pairs and the block density of :meth:`block_mask` at ``block_size``."""
        block_mask = self.block_mask(block_size)
        num_positions = self.query_class.shape[0]
        read = (self.values() > 0).double()
        query_counts = torch.bincount(self.query_class, minlength=read.shape[0]).double()
        key_counts = torch.bincount(self.key_class, minlength=read.shape[1]).double()
        pairs = int(query_counts @ read @ key_counts)
        blocks = block_mask.kv_indices.shape[-1]
        partial, full = int(block_mask.kv_num_blocks.sum()), int(block_mask.full_kv_num_blocks.sum())
        return "\n".join(
            [
                f"topology mask: {num_positions} positions, {read.shape[0]} query classes, {read.shape[1]} key classes",
                f"  read pairs: {pairs} of {num_positions**2} ({100 * pairs / num_positions**2:.2f}%); "
                f"{int(self.unread().sum())} positions read nothing",
                f"  block mask (block_size {checked_block_size(block_size)}): {blocks} x {blocks} blocks, "
                f"{partial} partial + {full} full = {partial + full} computed, "
                f"block density {(partial + full) / blocks**2:.4f}",
            ]
        )
