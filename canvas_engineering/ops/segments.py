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

import weakref
from dataclasses import dataclass, fields, replace
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch


def length_class(n: int) -> int:
    """The bucket a length falls in: the next power of two >= n (0 for 0)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def _moved(obj, device: torch.device):
    """A copy of a dataclass with every tensor (and nested dataclass) on ``device``."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, list) and value and hasattr(value[0], "__dataclass_fields__"):
            changes[f.name] = [_moved(item, device) for item in value]
        elif hasattr(value, "__dataclass_fields__"):
            changes[f.name] = _moved(value, device)
    return replace(obj, **changes)


@dataclass(eq=False)
class PaddedRows:
    """Packed rows of several sequences laid out as a padded ``(n, L)`` batch.

    Attributes:
        rows: ``(n, L)`` packed row of each slot (0 in padding slots).
        valid: ``(n, L)`` bool, False in padding slots.
        lengths: ``(n,)`` true length of each sequence.
        flat_valid: ``(n_valid,)`` positions of the valid slots in the flattened ``n * L``.
        valid_rows: ``(n_valid,)`` the packed rows of those slots.
        padded: whether any slot is padding.
    """

    rows: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    flat_valid: torch.Tensor
    valid_rows: torch.Tensor
    padded: bool

    @staticmethod
    def build(starts: Sequence[int], lengths: Sequence[int]) -> "PaddedRows":
        """Sequences ``i`` covering packed rows ``starts[i] .. starts[i] + lengths[i] - 1``."""
        width = max(lengths, default=0)
        offsets = torch.arange(width)
        length_tensor = torch.tensor(list(lengths), dtype=torch.long).reshape(-1)
        valid = offsets.unsqueeze(0) < length_tensor.unsqueeze(1)
        rows = torch.where(valid, torch.tensor(list(starts), dtype=torch.long).reshape(-1, 1) + offsets, 0)
        flat_valid = valid.flatten().nonzero().flatten()
        return PaddedRows(rows, valid, length_tensor, flat_valid, rows.flatten()[flat_valid], bool((~valid).any()))

    def gather(self, packed: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """``packed (B, T, *f)`` to ``(B, n, L, *f)``; padding slots hold row 0, or zeros."""
        batch = packed[:, self.rows]
        if zero_padding and self.padded:
            mask = self.valid.reshape(self.valid.shape + (1,) * (packed.dim() - 2))
            batch = batch * mask.to(batch.dtype)
        return batch

    def scatter(self, target: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Write the valid slots of ``batch (B, n, L, *f)`` into the rows of ``target (B, T, *f)``."""
        flat = batch.flatten(1, 2)
        if self.padded:
            flat = flat[:, self.flat_valid]
        return target.index_copy(1, self.valid_rows, flat.to(target.dtype))


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
        query_source: ``(Tq,)`` row of the op's query input behind each packed query row.
        key_source: ``(Tk,)`` row of the op's key/value input behind each packed key row.
        query_segment: ``(Tq,)`` segment of each packed query row.
        query_offset: ``(Tq,)`` position of the row within its segment.
        query_key_start: ``(Tq,)`` first packed key row of the row's key set.
        query_key_length: ``(Tq,)`` length of the row's key set.
        key_keyset: ``(Tk,)`` key set of each packed key row.
        segment_keyset: ``(S,)`` key set each segment reads.
        keyset_start: ``(S_k,)`` first packed key row of each key set; keyset_length: lengths.
        segment_buckets: padded batches of segments, by (length class of N, of M).
        keyset_buckets: padded batches of key sets, by length class.
        shapes: per segment ``(N_s, M_s)``; keyset_of: per segment its key set;
        keyset_sizes: per key set its length (Python values, for building derived indexes).
        n_queries: Tq; n_keys: Tk.
    """

    query_source: torch.Tensor
    key_source: torch.Tensor
    query_segment: torch.Tensor
    query_offset: torch.Tensor
    query_key_start: torch.Tensor
    query_key_length: torch.Tensor
    key_keyset: torch.Tensor
    segment_keyset: torch.Tensor
    keyset_start: torch.Tensor
    keyset_length: torch.Tensor
    segment_buckets: List[SegmentBucket]
    keyset_buckets: List[KeysetBucket]
    shapes: Tuple[Tuple[int, int], ...]
    keyset_of: Tuple[int, ...]
    keyset_sizes: Tuple[int, ...]
    n_queries: int
    n_keys: int

    @staticmethod
    def build(
        query_lengths: Sequence[int],
        keyset_of: Sequence[int],
        keyset_lengths: Sequence[int],
        query_source: Optional[Sequence[int]] = None,
        key_source: Optional[Sequence[int]] = None,
    ) -> "SegmentIndex":
        """Index segments ``s`` of ``query_lengths[s]`` queries reading key set
        ``keyset_of[s]`` of ``keyset_lengths[k]`` keys. ``query_source``/``key_source``
        (default: the identity) map packed rows to rows of the op's inputs."""
        query_starts = [sum(query_lengths[:s]) for s in range(len(query_lengths))]
        keyset_starts = [sum(keyset_lengths[:k]) for k in range(len(keyset_lengths))]
        n_queries, n_keys = sum(query_lengths), sum(keyset_lengths)
        segment_of_row = [s for s, n in enumerate(query_lengths) for _ in range(n)]
        offset_of_row = [i for n in query_lengths for i in range(n)]
        shapes = tuple((n, keyset_lengths[k]) for n, k in zip(query_lengths, keyset_of))
        classes: dict = {}
        for s, (n, m) in enumerate(shapes):
            classes.setdefault((length_class(n), length_class(m)), []).append(s)
        segment_buckets = [
            SegmentBucket(
                torch.tensor(members, dtype=torch.long),
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
                torch.tensor(members, dtype=torch.long),
                PaddedRows.build([keyset_starts[k] for k in members], [keyset_lengths[k] for k in members]),
            )
            for members in keyset_classes.values()
        ]
        long = lambda values: torch.tensor(list(values), dtype=torch.long).reshape(-1)  # noqa: E731
        return SegmentIndex(
            query_source=long(range(n_queries) if query_source is None else query_source),
            key_source=long(range(n_keys) if key_source is None else key_source),
            query_segment=long(segment_of_row),
            query_offset=long(offset_of_row),
            query_key_start=long(keyset_starts[keyset_of[s]] for s in segment_of_row),
            query_key_length=long(keyset_lengths[keyset_of[s]] for s in segment_of_row),
            key_keyset=long(k for k, m in enumerate(keyset_lengths) for _ in range(m)),
            segment_keyset=long(keyset_of),
            keyset_start=long(keyset_starts),
            keyset_length=long(keyset_lengths),
            segment_buckets=segment_buckets,
            keyset_buckets=keyset_buckets,
            shapes=shapes,
            keyset_of=tuple(keyset_of),
            keyset_sizes=tuple(keyset_lengths),
            n_queries=n_queries,
            n_keys=n_keys,
        )

    def to(self, device: torch.device) -> "SegmentIndex":
        """A copy with every tensor on ``device``."""
        return _moved(self, torch.device(device))

    def broadcast_keysets(self, per_keyset: torch.Tensor) -> torch.Tensor:
        """Per-key-set values ``(B, S_k, *f)`` repeated for each packed query row: ``(B, Tq, *f)``."""
        return per_keyset[:, self.segment_keyset[self.query_segment]]


T = TypeVar("T")


class PerIndexCache:
    """Values a module derives from a :class:`SegmentIndex`, computed once per index.

    Indexes are held weakly, and the cache pickles (and deep-copies) as empty.
    """

    def __init__(self) -> None:
        self._values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, index: SegmentIndex, build: Callable[[], T]) -> T:
        """The cached value for ``index``, built by ``build()`` the first time."""
        if index not in self._values:
            self._values[index] = build()
        return self._values[index]

    def clear(self) -> None:
        """Forget every value (e.g. after the module's state changed)."""
        self._values = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> "PerIndexCache":
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
