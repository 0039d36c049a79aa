"""The state-space and recurrence family: Mamba (selective scan), RWKV (decayed WKV
recurrence) and Hyena (gated FFT long convolutions)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from canvas_engineering.attention.base import SegmentAttention
from canvas_engineering.attention.validation import check_heads, check_positive
from canvas_engineering.ops.fftconv import fft_length, prepare_gated_fft_conv, segment_gated_fft_conv
from canvas_engineering.ops.rwkv import keys_read, prepare_wkv, segment_wkv
from canvas_engineering.ops.segment_attention import prepare_segment_attention, segment_attention
from canvas_engineering.ops.segments import PerIndexCache, RowSelection, SegmentIndex
from canvas_engineering.ops.selective_scan import prepare_selective_scan, segment_selective_scan


class MambaAttention(SegmentAttention):
    """Selective state-space model (S6) over dst, read out by the queries.

    The values go through ``in_proj`` into a scan input and a gate ``z``; ``x_proj`` gives
    the input-dependent step (through the rank-``dt_rank`` ``dt_proj`` and a softplus) and
    B, C; the scan output is gated by ``silu(z)``. Each query, layer-normalised, then
    attends (single head, scale ``d_model**-0.5``) over the gated scan outputs. Each key
    set is scanned once, whatever number of segments read it (the scan costs
    O(M * d_model * state_size)).

    Args:
        d_model: model width.
        n_heads: accepted for a uniform constructor; not used.
        dropout: accepted for a uniform constructor; not used.
        state_size: SSM state per channel (>= 1).
        dt_rank: rank of the step projection; 0 means ``max(1, d_model // 16)``.
    """

    complexity = "O(M) scan + O(NM) readout"
    description = "selective scan over dst, gated by silu(z), single-head softmax readout"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, state_size: int = 16, dt_rank: int = 0):
        super().__init__()
        check_positive("MambaAttention", d_model=d_model, state_size=state_size)
        if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 0:
            raise ValueError(f"MambaAttention: dt_rank must be an integer >= 0, got {dt_rank!r}")
        self.d_model = d_model
        self.state_size = state_size
        self.dt_rank = dt_rank or max(1, d_model // 16)
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.dt_proj = nn.Linear(self.dt_rank, d_model)
        self.x_proj = nn.Linear(d_model, self.dt_rank + 2 * state_size)
        A = torch.arange(1, state_size + 1, dtype=torch.float32).repeat(d_model, 1)
        self.register_buffer("A_log", torch.log(A))
        self.D = nn.Parameter(torch.ones(d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        x, z = self.in_proj(value_rows).chunk(2, dim=-1)
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        pack = index.pack_keys
        y = segment_selective_scan(pack(x), pack(dt), -torch.exp(self.A_log), pack(B), pack(C), self.D, index)
        context = (y * F.silu(pack(z))).unsqueeze(2)
        queries = index.pack_queries(self.norm(query_rows)).unsqueeze(2)
        readout = segment_attention(queries, context, context, index, self.d_model**-0.5)
        return self.out_proj(readout.squeeze(2))

    def prepare(self, index: SegmentIndex) -> None:
        prepare_selective_scan(index)
        prepare_segment_attention(index, self.d_model)


class RWKVAttention(SegmentAttention):
    """RWKV time mixing: the WKV recurrence over dst with a learned per-channel decay
    ``w = -exp(decay)`` and current-step bonus, gated by ``sigmoid(r)`` of the queries.
    Query i reads the recurrence at step i (the last step when i >= M). Each key set is
    scanned once, whatever number of segments read it, and only as far as anyone reads:
    keys and values are projected for those rows only.

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: accepted for a uniform constructor; not used.
    """

    complexity = "O(N) (a scan of min(N, M) steps)"
    description = (
        "WKV recurrence with per-channel decay and bonus, receptance gate; only the min(N, M) keys the queries "
        "read are projected"
    )

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        check_heads("RWKVAttention", d_model, n_heads)
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.r_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.decay = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.01 - 5.0)
        self.bonus = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        split = "b t (h d) -> b t h d"
        r = index.pack_queries(rearrange(self.r_proj(query_rows), split, h=self.n_heads))
        rows, scan_index = keys_read(index)
        k = scan_index.pack_keys(rearrange(self.k_proj(rows.take(key_rows)), split, h=self.n_heads))
        v = scan_index.pack_keys(rearrange(self.v_proj(rows.take(value_rows)), split, h=self.n_heads))
        wkv = segment_wkv(k, v, -torch.exp(self.decay), self.bonus, scan_index)
        return self.out_proj(rearrange(torch.sigmoid(r) * wkv, "b t h d -> b t (h d)"))

    def prepare(self, index: SegmentIndex) -> None:
        prepare_wkv(keys_read(index)[1])


class HyenaAttention(SegmentAttention):
    """Hyena operator: ``order`` rounds of (sigmoid gate, then a long circular convolution
    with a learned frequency-domain filter) over a value stream, all streams projected from
    dst (average-pooled to the query length when M != N).

    The convolution uses an FFT of length ``fft_length(N)`` (a power of two); the filters
    hold ``max_len // 2 + 1`` frequencies, so ``fft_length(N) // 2 <= max_len // 2`` is required.
    Gate and convolution run as one op (:func:`segment_gated_fft_conv`: the Triton kernels
    for FFTs up to 8192, torch.fft beyond).

    Args:
        d_model: model width.
        n_heads: accepted for a uniform constructor; not used.
        dropout: accepted for a uniform constructor; not used.
        order: number of gate-and-convolve rounds (>= 1).
        max_len: longest FFT the filters cover (>= 2).
    """

    complexity = "O(N log N)"
    description = "order rounds of sigmoid gate + FFT circular convolution"

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0, order: int = 2, max_len: int = 4096):
        super().__init__()
        check_positive("HyenaAttention", d_model=d_model, order=order, max_len=max_len)
        self.d_model = d_model
        self.order = order
        self.max_len = max_len
        self.in_proj = nn.Linear(d_model, d_model * (order + 1))
        self.out_proj = nn.Linear(d_model, d_model)
        self.filter_params = nn.ParameterList(
            [nn.Parameter(torch.randn(d_model, max_len // 2 + 1, 2) * 0.02) for _ in range(order)]
        )
        self.gates = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(order)])
        self._pooling = PerIndexCache()

    def _build_pooling(
        self, index: SegmentIndex
    ) -> tuple[RowSelection, int] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive average pooling of each key set to its segment's length: output i of a
        segment averages keys ``floor(i*M/N) .. ceil((i+1)*M/N) - 1``.

        When every segment with queries has M = k * N for one k, the windows are k
        consecutive keys each: this is (the key rows of those segments in turn, k), and the
        pooling a mean over each k rows (no scatter; the identity when k = 1). Otherwise
        (packed query row, packed key row, weight) triples."""
        starts = index.keyset_offsets
        ratios = {m // n if m % n == 0 else 0 for n, m in index.shapes if n}
        if len(ratios) <= 1 and 0 not in ratios:
            window = ratios.pop() if ratios else 1
            rows = RowSelection.of(
                [starts[k] + i for (n, m), k in zip(index.shapes, index.keyset_of) if n for i in range(m)]
            )
            return RowSelection(rows.index.to(index.query_segment.device), rows.start), window
        out_rows, key_rows, weights = [], [], []
        query_start = 0
        for (n, m), keyset in zip(index.shapes, index.keyset_of):
            outputs = torch.arange(n)
            first = torch.div(outputs * m, n, rounding_mode="floor")
            count = -torch.div(-(outputs + 1) * m, n, rounding_mode="floor") - first
            owner = torch.repeat_interleave(outputs, count)
            within = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
            out_rows.append(owner + query_start)
            key_rows.append(first[owner] + within + starts[keyset])
            weights.append(1.0 / count[owner].double())
            query_start += n
        device = index.query_source.index.device
        return torch.cat(out_rows).to(device), torch.cat(key_rows).to(device), torch.cat(weights).to(device)

    def pooling(
        self, index: SegmentIndex
    ) -> tuple[RowSelection, int] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pooling of ``index`` (built once; see :meth:`_build_pooling`)."""
        return self._pooling.get(index, lambda: self._build_pooling(index))

    def prepare(self, index: SegmentIndex) -> None:
        self.pooling(index)
        prepare_gated_fft_conv(index)

    def forward_segments(
        self, query_rows: torch.Tensor, key_rows: torch.Tensor, value_rows: torch.Tensor, index: SegmentIndex
    ) -> torch.Tensor:
        longest = max(index.query_lengths, default=0)
        if fft_length(longest) // 2 + 1 > self.max_len // 2 + 1:
            raise ValueError(
                f"HyenaAttention: {longest} queries need an FFT of length {fft_length(longest)}, longer than "
                f"max_len={self.max_len}; build the module with max_len >= {fft_length(longest)}"
            )
        if [shape for shape in index.shapes if shape[1] == 0 and shape[0] > 0]:
            raise ValueError("HyenaAttention: needs at least one key/value position, got 0")
        values = index.pack_keys(value_rows)
        pooling = self.pooling(index)
        if isinstance(pooling[0], RowSelection):
            rows, window = pooling
            pooled = rows.take(values)
            if window > 1:
                pooled = pooled.unflatten(1, (-1, window)).mean(dim=2)
        else:
            out_rows, pooled_rows, weights = pooling
            contributions = torch.index_select(values, 1, pooled_rows) * weights.to(values.dtype).view(1, -1, 1)
            pooled = values.new_zeros(values.shape[0], index.n_queries, values.shape[2]).index_add(
                1, out_rows, contributions
            )
        streams = self.in_proj(pooled).chunk(self.order + 1, dim=-1)
        mixed = streams[0]
        n_frequencies = fft_length(longest) // 2 + 1
        for i, frequencies in enumerate(self.filter_params):
            complex_parts = frequencies.to(torch.promote_types(frequencies.dtype, torch.float32))
            # Sliced after view_as_complex: the other order meets a CPU inductor bug (docs/notes.md).
            response = torch.view_as_complex(complex_parts.contiguous())[:, :n_frequencies].transpose(0, 1)
            mixed = segment_gated_fft_conv(mixed, self.gates[i](streams[i + 1]), response, index)
        return self.out_proj(mixed)
