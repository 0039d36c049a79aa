"""Packed segments: the index every grouped attention op runs on.

A group of segments is held flash-attention "varlen" style. Queries are packed segment
after segment (``Tq`` rows in all); keys are packed per *key set*, so that segments reading
the same dst rows share one key range (``Tk`` rows in all). Eager ops that need dense
batches use *buckets*: segments (or key sets) whose lengths round up to the same power of
two are padded to a common length and run as one batch, so a group costs a number of
launches bounded by the number of distinct length classes, not by its number of segments.

Everything here is built once (at plan time, or once per (N, M) for a single edge) and
moved to a device once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import torch


def length_class(n: int) -> int:
    """The bucket a length falls in: the next power of two >= n (0 for 0)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def offsets(lengths: Iterable[int]) -> tuple[int, ...]:
    """``(0, l_0, l_0 + l_1, ..., sum of all)``: where each of the runs of ``lengths`` laid end
    to end starts, then where the last ends (``len(lengths) + 1`` values)."""
    return tuple(itertools.accumulate(lengths, initial=0))


def moved_to(obj, device: torch.device):
    """A copy of a dataclass with every tensor (and nested dataclass) on ``device``."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
            changes[f.name] = [moved_to(item, device) for item in value]
        elif hasattr(value, "__dataclass_fields__"):
            changes[f.name] = moved_to(value, device)
    return replace(obj, **changes)


def _long(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long).reshape(-1)


@dataclass(eq=False)
class RowSelection:
    """Rows to take along dim 1 of a tensor: ``index``, or the range ``start .. start + len``
    when the index is one (then taking them is a view, not a copy)."""

    index: torch.Tensor
    start: int | None

    @staticmethod
    def of(rows: Sequence[int]) -> RowSelection:
        rows = list(rows)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        return RowSelection(_long(rows), (rows[0] if rows else 0) if contiguous else None)

    def __len__(self) -> int:
        return self.index.shape[0]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor[:, rows]``."""
        if self.start is not None:
            return tensor[:, self.start : self.start + len(self)]
        return torch.index_select(tensor, 1, self.index)


@dataclass(eq=False)
class PaddedRows:
    """Packed rows of several sequences laid out as a padded ``(count, width)`` batch.

    Attributes:
        slots: the packed row behind each slot of the flattened ``count * width`` batch
            (row 0 in padding slots).
        valid: ``(count, width)`` bool, False in padding slots.
        lengths: ``(count,)`` true length of each sequence.
        flat_valid: ``(n_valid,)`` positions of the valid slots in the flattened batch.
        valid_rows: the packed rows of the valid slots, in slot order (Python).
        count, width: the batch shape; padded: whether any slot is padding.
    """

    slots: RowSelection
    valid: torch.Tensor
    lengths: torch.Tensor
    flat_valid: torch.Tensor
    valid_rows: tuple[int, ...]
    count: int
    width: int
    padded: bool

    @staticmethod
    def build(starts: Sequence[int], lengths: Sequence[int]) -> PaddedRows:
        """Sequences ``i`` covering packed rows ``starts[i] .. starts[i] + lengths[i] - 1``."""
        width = max(lengths, default=0)
        slots = [start + i if i < length else 0 for start, length in zip(starts, lengths) for i in range(width)]
        valid = [i < length for length in lengths for i in range(width)]
        valid_rows = tuple(row for row, ok in zip(slots, valid) if ok)
        return PaddedRows(
            slots=RowSelection.of(slots),
            valid=torch.tensor(valid, dtype=torch.bool).reshape(len(lengths), width),
            lengths=_long(lengths),
            flat_valid=_long(i for i, ok in enumerate(valid) if ok),
            valid_rows=valid_rows,
            count=len(lengths),
            width=width,
            padded=not all(valid),
        )

    def gather(self, packed: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """``packed (B, T, *f)`` to ``(B, count, width, *f)``; padding slots hold row 0, or zeros."""
        batch = self.slots.take(packed).unflatten(1, (self.count, self.width))
        if zero_padding and self.padded:
            mask = self.valid.reshape(self.valid.shape + (1,) * (packed.dim() - 2))
            batch = batch * mask.to(batch.dtype)
        return batch

    def valid_part(self, batch: torch.Tensor) -> torch.Tensor:
        """The valid slots of ``batch (B, count, width, *f)``: ``(B, n_valid, *f)``."""
        flat = batch.flatten(1, 2)
        return flat[:, self.flat_valid] if self.padded else flat


def _assembly(buckets_rows: Sequence[tuple[int, ...]], total: int) -> RowSelection:
    """Where each packed row sits in the concatenation of the buckets' valid rows."""
    position = [0] * total
    for place, row in enumerate(row for rows in buckets_rows for row in rows):
        position[row] = place
    return RowSelection.of(position)


@dataclass(eq=False)
class SegmentBucket:
    """Segments padded together: ``members`` are segment ids; ``queries`` index packed
    query rows and ``keys`` packed key rows (the key set of each member)."""

    members: torch.Tensor
    queries: PaddedRows
    keys: PaddedRows


@dataclass(eq=False)
class KeysetBucket:
    """Key sets padded together: ``members`` are key-set ids, ``keys`` their packed rows."""

    members: torch.Tensor
    keys: PaddedRows


@dataclass(eq=False)
class SegmentIndex:
    """A group of segments over packed rows.

    Attributes:
        query_source: the row of the op's query input behind each packed query row.
        key_source: the row of the op's key/value input behind each packed key row.
        query_segment: ``(Tq,)`` segment of each packed query row.
        query_offset: ``(Tq,)`` position of the row within its segment.
        query_key_start: ``(Tq,)`` first packed key row of the row's key set.
        query_key_length: ``(Tq,)`` length of the row's key set.
        key_keyset: ``(Tk,)`` key set of each packed key row.
        segment_keyset: ``(S,)`` key set each segment reads.
        keyset_start: ``(S_k,)`` first packed key row of each key set; keyset_length: lengths.
        segment_buckets: padded batches of segments, by (length class of N, of M).
        keyset_buckets: padded batches of key sets, by length class.
        query_assembly, key_assembly: packed rows from the concatenated valid rows of the
            segment (key set) buckets, in bucket order.
        shapes: per segment ``(N_s, M_s)``; keyset_of: per segment its key set;
        keyset_sizes: per key set its length (Python values, for building derived indexes).
        n_queries: Tq; n_keys: Tk.
        derived: what :class:`PerIndexCache` instances derived from this index, by cache key
            (device-specific: :meth:`to` starts it empty; not pickled).
    """

    query_source: RowSelection
    key_source: RowSelection
    query_segment: torch.Tensor
    query_offset: torch.Tensor
    query_key_start: torch.Tensor
    query_key_length: torch.Tensor
    key_keyset: torch.Tensor
    segment_keyset: torch.Tensor
    keyset_start: torch.Tensor
    keyset_length: torch.Tensor
    segment_buckets: list[SegmentBucket]
    keyset_buckets: list[KeysetBucket]
    query_assembly: RowSelection
    key_assembly: RowSelection
    shapes: tuple[tuple[int, int], ...]
    keyset_of: tuple[int, ...]
    keyset_sizes: tuple[int, ...]
    n_queries: int
    n_keys: int
    derived: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def build(
        query_lengths: Sequence[int],
        keyset_of: Sequence[int],
        keyset_lengths: Sequence[int],
        query_source: Sequence[int] | None = None,
        key_source: Sequence[int] | None = None,
    ) -> SegmentIndex:
        """Index segments ``s`` of ``query_lengths[s]`` queries reading key set
        ``keyset_of[s]`` of ``keyset_lengths[k]`` keys. ``query_source``/``key_source``
        (default: the identity) map packed rows to rows of the op's inputs."""
        query_starts = offsets(query_lengths)[:-1]
        keyset_starts = offsets(keyset_lengths)[:-1]
        n_queries, n_keys = sum(query_lengths), sum(keyset_lengths)
        segment_of_row = [s for s, n in enumerate(query_lengths) for _ in range(n)]
        shapes = tuple((n, keyset_lengths[k]) for n, k in zip(query_lengths, keyset_of))
        classes: dict = {}
        for s, (n, m) in enumerate(shapes):
            classes.setdefault((length_class(n), length_class(m)), []).append(s)
        segment_buckets = [
            SegmentBucket(
                _long(members),
                PaddedRows.build([query_starts[s] for s in members], [shapes[s][0] for s in members]),
                PaddedRows.build([keyset_starts[keyset_of[s]] for s in members], [shapes[s][1] for s in members]),
            )
            for members in classes.values()
        ]
        keyset_classes: dict = {}
        for k, m in enumerate(keyset_lengths):
            keyset_classes.setdefault(length_class(m), []).append(k)
        keyset_buckets = [
            KeysetBucket(
                _long(members),
                PaddedRows.build([keyset_starts[k] for k in members], [keyset_lengths[k] for k in members]),
            )
            for members in keyset_classes.values()
        ]
        return SegmentIndex(
            query_source=RowSelection.of(range(n_queries) if query_source is None else query_source),
            key_source=RowSelection.of(range(n_keys) if key_source is None else key_source),
            query_segment=_long(segment_of_row),
            query_offset=_long(i for n in query_lengths for i in range(n)),
            query_key_start=_long(keyset_starts[keyset_of[s]] for s in segment_of_row),
            query_key_length=_long(keyset_lengths[keyset_of[s]] for s in segment_of_row),
            key_keyset=_long(k for k, m in enumerate(keyset_lengths) for _ in range(m)),
            segment_keyset=_long(keyset_of),
            keyset_start=_long(keyset_starts),
            keyset_length=_long(keyset_lengths),
            segment_buckets=segment_buckets,
            keyset_buckets=keyset_buckets,
            query_assembly=_assembly([b.queries.valid_rows for b in segment_buckets], n_queries),
            key_assembly=_assembly([b.keys.valid_rows for b in keyset_buckets], n_keys),
            shapes=shapes,
            keyset_of=tuple(keyset_of),
            keyset_sizes=tuple(keyset_lengths),
            n_queries=n_queries,
            n_keys=n_keys,
        )

    def to(self, device: torch.device) -> SegmentIndex:
        """A copy with every tensor on ``device`` (and nothing derived yet)."""
        return replace(moved_to(self, torch.device(device)), derived={})

    def __getstate__(self) -> dict:
        return {**self.__dict__, "derived": {}}

    @property
    def query_lengths(self) -> tuple[int, ...]:
        """Per segment its number of queries N (``S`` values)."""
        return tuple(n for n, _ in self.shapes)

    @property
    def query_offsets(self) -> tuple[int, ...]:
        """``S + 1`` values: segment s owns packed query rows ``query_offsets[s]`` to
        ``query_offsets[s + 1] - 1``."""
        return offsets(self.query_lengths)

    @property
    def keyset_offsets(self) -> tuple[int, ...]:
        """``S_k + 1`` values: key set k owns packed key rows ``keyset_offsets[k]`` to
        ``keyset_offsets[k + 1] - 1``."""
        return offsets(self.keyset_sizes)

    def int32_table(self, values: Iterable[int]) -> torch.Tensor:
        """``values`` as a kernel table: ``(len(values),)`` int32 on the index's device."""
        return torch.tensor(list(values), dtype=torch.int32, device=self.query_segment.device)

    def block_table(self, lengths: Sequence[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sequence of each block, the block's first row within it) for the blocks of
        ``block`` rows that cover sequences of ``lengths`` in turn: two ``(n_blocks,)`` int32
        tables on the index's device."""
        pairs = [(s, start) for s, n in enumerate(lengths) for start in range(0, n, block)]
        return self.int32_table(p[0] for p in pairs), self.int32_table(p[1] for p in pairs)

    def pack_queries(self, query_input: torch.Tensor) -> torch.Tensor:
        """Rows of the op's query input ``(B, Rq, *f)`` in packed order: ``(B, Tq, *f)``."""
        return self.query_source.take(query_input)

    def pack_keys(self, key_input: torch.Tensor) -> torch.Tensor:
        """Rows of the op's key/value input ``(B, Rk, *f)`` in packed order: ``(B, Tk, *f)``."""
        return self.key_source.take(key_input)

    def assemble_queries(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per segment bucket, its padded result ``(B, count, width, *f)``, to ``(B, Tq, *f)``."""
        parts = [bucket.queries.valid_part(batch) for bucket, batch in zip(self.segment_buckets, batches)]
        return self.query_assembly.take(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def assemble_keys(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per key-set bucket, its padded result ``(B, count, width, *f)``, to ``(B, Tk, *f)``."""
        parts = [bucket.keys.valid_part(batch) for bucket, batch in zip(self.keyset_buckets, batches)]
        return self.key_assembly.take(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def broadcast_keysets(self, per_keyset: torch.Tensor) -> torch.Tensor:
        """Per-key-set values ``(B, S_k, *f)`` repeated for each packed query row: ``(B, Tq, *f)``."""
        return torch.index_select(per_keyset, 1, self.segment_keyset[self.query_segment])


T = TypeVar("T")


class PerIndexCache:
    """Values a module derives from a :class:`SegmentIndex`, computed once per index.

    The values live on the index (``index.derived``, under this cache's key), so they go
    when the index goes, and a compiled forward that looks one up depends on that index
    only, not on which other indexes exist. The cache pickles (and deep-copies) as a new,
    empty one.
    """

    _keys = itertools.count()

    def __init__(self) -> None:
        self._key = next(PerIndexCache._keys)

    def get(self, index: SegmentIndex, build: Callable[[], T]) -> T:
        """The cached value for ``index``, built by ``build()`` the first time."""
        if self._key not in index.derived:
            index.derived[self._key] = build()
        return index.derived[self._key]

    def clear(self) -> None:
        """Forget every value (e.g. after the module's state changed): later lookups use a
        new key, and the old values go with their indexes."""
        self._key = next(PerIndexCache._keys)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> PerIndexCache:
        return PerIndexCache()


_single_by_device: dict = {}


def single_segment(n_queries: int, n_keys: int, device: torch.device) -> SegmentIndex:
    """The index of one segment: all ``n_queries`` queries read all ``n_keys`` keys (cached)."""
    key = (n_queries, n_keys, torch.device(device))
    if key not in _single_by_device:
        if len(_single_by_device) > 256:
            _single_by_device.clear()
        _single_by_device[key] = SegmentIndex.build([n_queries], [0], [n_keys]).to(device)
    return _single_by_device[key]
