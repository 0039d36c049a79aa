"""The state-space and recurrence family: Mamba (selective scan), RWKV (decayed WKV
recurrence) and Hyena (gated FFT long convolutions)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from canvas_engineering.attention.dot_product import softmax_attention
from canvas_engineering.attention.validation import check_heads, check_positive, check_qkv


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """The S6 recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, h_0 = 0.

    Args:
        x, dt: ``(batch, L, channels)``.
        A: ``(channels, state)``, negative.
        B, C: ``(batch, L, state)``.
        D: ``(channels,)``.

    Returns:
        y: ``(batch, L, channels)``.
    """
    state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        step = dt[:, t].unsqueeze(-1)
        state = torch.exp(step * A) * state + step * B[:, t].unsqueeze(1) * x[:, t].unsqueeze(-1)
        outputs.append((state * C[:, t].unsqueeze(1)).sum(dim=-1) + D * x[:, t])
    return torch.stack(outputs, dim=1) if outputs else torch.zeros_like(x)


def wkv_scan(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, n_queries: int, eps: float = 1e-6
) -> torch.Tensor:
    """The RWKV WKV recurrence, read at the first ``n_queries`` steps.

    With ``e_t = exp(clamp(k_t, -10, 10))``, output t is
    ``(sum_{s<t} exp((t-1-s) w) e_s v_s + exp(u) e_t v_t) / (sum_{s<t} exp((t-1-s) w) e_s + exp(u) e_t + eps)``
    for t < min(N, M); outputs past M repeat the last one (zeros when M = 0).

    Args:
        k, v: ``(B, H, M, d)``.
        w: ``(H, d)`` log decay per step (negative).
        u: ``(H, d)`` bonus of the current step.
        n_queries: N, the number of outputs.

    Returns:
        ``(B, H, N, d)``.
    """
    k = k.clamp(-10.0, 10.0)
    decay = torch.exp(w)
    numerator = torch.zeros_like(v[:, :, 0])
    denominator = torch.zeros_like(v[:, :, 0])
    outputs = []
    for t in range(min(n_queries, k.shape[2])):
        current = torch.exp(u + k[:, :, t])
        outputs.append((numerator + current * v[:, :, t]) / (denominator + current + eps))
        key_weight = torch.exp(k[:, :, t])
        numerator = numerator * decay + key_weight * v[:, :, t]
        denominator = denominator * decay + key_weight
    if not outputs:
        return v.new_zeros(v.shape[:2] + (n_queries, v.shape[3]))
    wkv = torch.stack(outputs, dim=2)
    return torch.cat([wkv, wkv[:, :, -1:].expand(-1, -1, n_queries - wkv.shape[2], -1)], dim=2)


class MambaAttention(nn.Module):
    """Selective state-space model (S6) over dst, read out by the queries.

    The values go through ``in_proj`` into a scan input and a gate ``z``; ``x_proj`` gives
    the input-dependent step (through the rank-``dt_rank`` ``dt_proj`` and a softplus) and
    B, C; the scan output is gated by ``silu(z)``. Each query, layer-normalised, then
    attends (single head, scale ``d_model**-0.5``) over the gated scan outputs.
    O(M * d_model * state_size) for the scan, O(N * M) for the readout.

    Args:
        d_model: model width.
        n_heads: accepted for a uniform constructor; not used.
        dropout: accepted for a uniform constructor; not used.
        state_size: SSM state per channel (>= 1).
        dt_rank: rank of the step projection; 0 means ``max(1, d_model // 16)``.
    """

    def __init__(
        self, d_model: int, n_heads: int = 4, dropout: float = 0.0, state_size: int = 16, dt_rank: int = 0
    ):
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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        check_qkv("MambaAttention", queries, keys, values, self.d_model)
        x, z = self.in_proj(values).chunk(2, dim=-1)
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        context = selective_scan(x, dt, -torch.exp(self.A_log), B, C, self.D) * F.silu(z)
        readout = softmax_attention(
            self.norm(queries).unsqueeze(1), context.unsqueeze(1), context.unsqueeze(1), self.d_model**-0.5
        )
        return self.out_proj(readout.squeeze(1))


class RWKVAttention(nn.Module):
    """RWKV time mixing: the WKV recurrence over dst with a learned per-channel decay
    ``w = -exp(decay)`` and current-step bonus, gated by ``sigmoid(r)`` of the queries.
    Query i reads the recurrence at step i (the last step when i >= M). O(M).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        dropout: accepted for a uniform constructor; not used.
    """

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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        check_qkv("RWKVAttention", queries, keys, values, self.d_model)
        split = "b n (h d) -> b h n d"
        r = rearrange(self.r_proj(queries), split, h=self.n_heads)
        k = rearrange(self.k_proj(keys), split, h=self.n_heads)
        v = rearrange(self.v_proj(values), split, h=self.n_heads)
        wkv = wkv_scan(k, v, -torch.exp(self.decay), self.bonus, n_queries=r.shape[2])
        return self.out_proj(rearrange(torch.sigmoid(r) * wkv, "b h n d -> b n (h d)"))


def fft_length(n: int) -> int:
    """The FFT length for a sequence of n: the next power of two >= max(n, 2)."""
    return 1 << max(1, (n - 1).bit_length())


class HyenaAttention(nn.Module):
    """Hyena operator: ``order`` rounds of (sigmoid gate, then a long circular convolution
    with a learned frequency-domain filter) over a value stream, all streams projected from
    dst (average-pooled to the query length when M != N). O(N log N).

    The convolution uses an FFT of length ``fft_length(N)`` (a power of two); the filters
    hold ``max_len // 2 + 1`` frequencies, so ``fft_length(N) // 2 <= max_len // 2`` is required.

    Args:
        d_model: model width.
        n_heads: accepted for a uniform constructor; not used.
        dropout: accepted for a uniform constructor; not used.
        order: number of gate-and-convolve rounds (>= 1).
        max_len: longest FFT the filters cover (>= 2).
    """

    def __init__(
        self, d_model: int, n_heads: int = 4, dropout: float = 0.0, order: int = 2, max_len: int = 4096
    ):
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

    def _fft_conv(self, x: torch.Tensor, filter_index: int) -> torch.Tensor:
        """Circular convolution of ``x (B, N, d_model)`` with filter ``filter_index``, truncated to N."""
        n = x.shape[1]
        spectrum = torch.fft.rfft(x, n=fft_length(n), dim=1)
        frequencies = self.filter_params[filter_index][:, : spectrum.shape[1]]
        response = torch.view_as_complex(frequencies.contiguous()).transpose(0, 1)
        return torch.fft.irfft(spectrum * response, n=fft_length(n), dim=1)[:, :n]

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """queries ``(B, N, d_model)``, keys/values ``(B, M, d_model)`` -> ``(B, N, d_model)``."""
        check_qkv("HyenaAttention", queries, keys, values, self.d_model)
        n = queries.shape[1]
        if fft_length(n) // 2 + 1 > self.max_len // 2 + 1:
            raise ValueError(
                f"HyenaAttention: {n} queries need an FFT of length {fft_length(n)}, longer than "
                f"max_len={self.max_len}; build the module with max_len >= {fft_length(n)}"
            )
        if values.shape[1] == 0:
            raise ValueError("HyenaAttention: needs at least one key/value position, got 0")
        pooled = values if values.shape[1] == n else F.adaptive_avg_pool1d(values.transpose(1, 2), n).transpose(1, 2)
        streams = rearrange(self.in_proj(pooled), "b n (s d) -> s b n d", s=self.order + 1)
        mixed = streams[0]
        for i in range(self.order):
            mixed = self._fft_conv(mixed * torch.sigmoid(self.gates[i](streams[i + 1])), i)
        return self.out_proj(mixed)
