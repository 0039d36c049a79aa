"""Meta and experimental types: disabled edges, fixed random patterns, expert routing."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from canvas_engineering.attention.base import ParameterFreeAttention, ProjectedAttention, SegmentAttention
from canvas_engineering.attention.dot_product import CrossAttention
from canvas_engineering.attention.validation import check_positive
from canvas_engineering.ops.segments import PerIndexCache, SegmentIndex


class NoneAttention(ParameterFreeAttention):
    """A declared but disabled edge: returns zeros shaped like the queries. No parameters."""

    complexity = "O(0)"
    description = "zeros"

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        return query_rows.new_zeros(query_rows.shape[0], index.n_queries, query_rows.shape[2])


def sample_key_subsets(n_rows: int, n_keys: int, n_chosen: int, generator: torch.Generator) -> torch.Tensor:
    """For each row, ``n_chosen`` distinct keys out of ``n_keys``, uniformly (Floyd's method).

    Runs in O(n_rows * n_chosen**2) time and O(n_rows * n_chosen) memory.

    Returns:
        ``(n_rows, n_chosen)`` int64, each row ascending.
    """
    chosen = torch.empty(n_rows, n_chosen, dtype=torch.long)
    for step, candidate_bound in enumerate(range(n_keys - n_chosen, n_keys)):
        draw = torch.randint(0, candidate_bound + 1, (n_rows,), generator=generator)
        taken = (chosen[:, :step] == draw.unsqueeze(1)).any(dim=1)
        chosen[:, step] = torch.where(taken, torch.full_like(draw, candidate_bound), draw)
    return chosen.sort(dim=1).values


def _mix_seed(seed: int, n_queries: int, n_keys: int) -> int:
    """A generator seed that depends on the module's seed and the (N, M) shape."""
    mask = (1 << 63) - 1
    return (seed * 0x9E3779B97F4A7C15 + n_queries * 0xBF58476D1CE4E5B9 + n_keys * 0x94D049BB133111EB) & mask


class RandomFixedAttention(ProjectedAttention):
    """Each query attends (softmax) to ``n_random`` keys chosen at random, fixed for good.

    The pattern for an (N, M) pair is a pure function of ``pattern_seed`` (a buffer, saved
    in the state_dict) and of N and M: it is the same on every call, on every device and
    after a reload, and is held as an ``(N, K)`` index table, never an N x M mask. When
    no seed is given, one is drawn from torch's global generator without advancing it.
    A state_dict without ``pattern_seed`` (as canvas-engineering 0.5.0 saves) loads and
    keeps the module's own seed.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        n_random: keys per query K (>= 1); min(K, M) are used.
        seed: the pattern seed, or None to draw one.
    """

    complexity = "O(NK)"
    description = "softmax over K keys per query, fixed by a stored seed"

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        dropout: float = 0.0,
        n_random: int = 8,
        seed: int | None = None,
    ):
        super().__init__(d_model, n_heads, dropout)
        check_positive("RandomFixedAttention", n_random=n_random)
        self.n_random = n_random
        if seed is None:
            with torch.random.fork_rng(devices=[]):
                seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("pattern_seed", torch.tensor(seed, dtype=torch.int64))
        self._patterns: dict[tuple[int, int], torch.Tensor] = {}
        self._row_tables = PerIndexCache()
        self._drawn_seed = int(self.pattern_seed)
        self._seed_stamp = self._stamp_of_seed()

    def _stamp_of_seed(self) -> tuple[torch.Tensor, int]:
        """(the ``pattern_seed`` tensor, its version counter): the stamp changes when the
        buffer is replaced or written in place, and reading it needs no device sync."""
        return self.pattern_seed, self.pattern_seed._version

    def _forget_patterns_of_another_seed(self) -> None:
        """Drop the drawn patterns when ``pattern_seed`` no longer holds the seed they were
        drawn from: after ``load_state_dict``, or after DistributedDataParallel broadcast
        rank 0's buffers into this rank's module in place. The seed's value is read (a
        device sync on CUDA) only when its stamp changed, not on every forward. A
        ``torch.compile`` trace uses the patterns current when it is traced."""
        if torch.compiler.is_compiling():
            return
        tensor, version = self._seed_stamp
        if self.pattern_seed is tensor and self.pattern_seed._version == version:
            return
        seed = int(self.pattern_seed)
        if seed != self._drawn_seed:
            self._patterns.clear()
            self._row_tables.clear()
            self._drawn_seed = seed
        self._seed_stamp = self._stamp_of_seed()

    def pattern(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """The keys each query reads: ``(N, min(n_random, M))`` int64, rows ascending."""
        self._forget_patterns_of_another_seed()
        if (n_queries, n_keys) not in self._patterns:
            generator = torch.Generator().manual_seed(_mix_seed(self._drawn_seed, n_queries, n_keys))
            self._patterns[(n_queries, n_keys)] = sample_key_subsets(
                n_queries, n_keys, min(self.n_random, n_keys), generator
            )
        return self._patterns[(n_queries, n_keys)].to(device)

    def _build_row_table(self, index: SegmentIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables :meth:`row_table` caches, built from the drawn patterns."""
        width = min(self.n_random, max([m for _, m in index.shapes] + [0]))
        tables, valids = [], []
        starts = index.keyset_offsets
        for (n, m), keyset in zip(index.shapes, index.keyset_of):
            chosen = self.pattern(n, m, torch.device("cpu"))
            tables.append(F.pad(chosen + starts[keyset], (0, width - chosen.shape[1])))
            valids.append(F.pad(torch.ones_like(chosen, dtype=torch.bool), (0, width - chosen.shape[1])))
        device = index.query_source.index.device
        return torch.cat(tables).to(device), torch.cat(valids).to(device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "pattern_seed" in missing_keys:
            missing_keys.remove(prefix + "pattern_seed")

    def row_table(self, index: SegmentIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed key row read by each packed query row and slot ``(Tq, K)``, slot validity
        ``(Tq, K)``) of ``index`` (built once per seed)."""
        self._forget_patterns_of_another_seed()
        return self._row_tables.get(index, lambda: self._build_row_table(index))

    def prepare(self, index: SegmentIndex) -> None:
        self.row_table(index)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SegmentIndex) -> torch.Tensor:
        table, valid = self.row_table(index)
        chosen = lambda t: torch.index_select(t, 1, table.flatten()).unflatten(1, table.shape)
        logits = torch.einsum("bthd,btkhd->bthk", q, chosen(k)) * self.scale
        logits = logits.masked_fill(~valid.unsqueeze(0).unsqueeze(2), float("-inf"))
        weights = self.dropout(F.softmax(logits, dim=-1))
        return torch.einsum("bthk,btkhd->bthd", weights, chosen(v))


class MixtureAttention(SegmentAttention):
    """Mixture of experts over key slices.

    dst is cut into ``n_experts`` consecutive slices of ``max(1, M // n_experts)`` keys
    (the last takes the rest; slices past the end are empty and give zeros). Each expert is
    a cross-attention over its slice; a learned router picks each query's
    ``top_k_experts`` experts and mixes their outputs with the softmax of their scores.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: dropout on attention weights.
        n_experts: number of experts (>= 1).
        top_k_experts: experts per query (>= 1; at most ``n_experts`` are used).
    """

    complexity = "O(NM)"
    description = "router picks top-k of n expert cross-attentions over dst slices"

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        dropout: float = 0.0,
        n_experts: int = 4,
        top_k_experts: int = 2,
    ):
        super().__init__()
        check_positive("MixtureAttention", n_experts=n_experts, top_k_experts=top_k_experts)
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k_experts = min(top_k_experts, n_experts)
        self.experts = nn.ModuleList([CrossAttention(d_model, n_heads, dropout) for _ in range(n_experts)])
        self.router = nn.Linear(d_model, n_experts)
        self._expert_indexes = PerIndexCache()

    def expert_slices(self, n_keys: int) -> list[tuple[int, int]]:
        """``[(start, end), ...]``: the key range of each expert."""
        width = max(1, n_keys // self.n_experts)
        starts = [e * width for e in range(self.n_experts)]
        ends = [min(s + width, n_keys) for s in starts[:-1]] + [n_keys]
        return list(zip(starts, ends))

    def _slice_indexes(self, index: SegmentIndex) -> list[SegmentIndex]:
        """Per expert: the index whose key sets are that expert's slice of each key set."""
        key_source = index.key_source.index.tolist()
        starts = index.keyset_offsets[:-1]
        slices = [self.expert_slices(m) for m in index.keyset_sizes]
        indexes = []
        for expert in range(self.n_experts):
            ranges = [(start + s[expert][0], start + max(s[expert])) for start, s in zip(starts, slices)]
            indexes.append(
                SegmentIndex.build(
                    index.query_lengths,
                    index.keyset_of,
                    [max(0, b - a) for a, b in ranges],
                    query_source=index.query_source.index.tolist(),
                    key_source=[key_source[row] for a, b in ranges for row in range(a, b)],
                ).to(index.query_source.index.device)
            )
        return indexes

    def expert_indexes(self, index: SegmentIndex) -> list[SegmentIndex]:
        """Each expert's index (built once)."""
        return self._expert_indexes.get(index, lambda: self._slice_indexes(index))

    def prepare(self, index: SegmentIndex) -> None:
        for expert, sub in zip(self.experts, self.expert_indexes(index)):
            expert.prepare(sub)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        scores, chosen = index.pack_queries(self.router(query_rows)).topk(self.top_k_experts, dim=-1)
        routing = scores.new_zeros(scores.shape[:-1] + (self.n_experts,))
        routing = routing.scatter(-1, chosen, F.softmax(scores, dim=-1))
        expert_indexes = self.expert_indexes(index)
        expert_outputs = torch.stack(
            [
                expert.forward_segments(query_rows, key_rows, value_rows, sub)
                for expert, sub in zip(self.experts, expert_indexes)
            ],
            dim=2,
        )
        return torch.einsum("bne,bned->bnd", routing, expert_outputs)
