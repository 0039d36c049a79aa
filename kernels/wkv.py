"""The RWKV WKV recurrence over packed sequences, forward and backward.

Layout: contiguous ``k, v (B, T, H, D)`` packed sequence after sequence (sequence ``s``
owns rows ``cu_seqlens[s] .. cu_seqlens[s+1]``); ``w, u (H, D)``.
Per channel, with ``e_t = exp(clamp(k_t, -10, 10))``, step t outputs

    y_t = (a_t + exp(u) e_t v_t) / (b_t + exp(u) e_t + eps),
    a_t = sum_{s<t} exp((t-1-s) w) e_s v_s,   b_t = sum_{s<t} exp((t-1-s) w) e_s.

The forward scan keeps (a, b) scaled by ``exp(-p)``, p the running maximum exponent (the
RWKV-4 kernel's trick), so no exponential overflows at any length. It also saves, per step,
``1 / (b_t + exp(u) e_t + eps)`` and ``exp(u) e_t / (...)`` for the backward pass, which
scans in reverse with four running adjoints (O(T * D) memory in all). Each program owns one
sequence, one (batch, head) and ``BLOCK_D`` channels, and walks its steps in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_output

KEY_CLAMP = 10.0


@triton.jit
def _channel_program(cu_seqlens, n_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program (grid: sequence, batch x head, channel block) works on: (b, h, its
    channels, their mask, the sequence's first packed row, its length)."""
    batch_head = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    begin = tl.load(cu_seqlens + tl.program_id(0)).to(tl.int64)
    length = tl.load(cu_seqlens + tl.program_id(0) + 1).to(tl.int64) - begin
    return (batch_head // n_heads).to(tl.int64), (batch_head % n_heads).to(tl.int64), channels, channels < HEAD_DIM, begin, length


@triton.jit
def wkv_fwd_kernel(
    K, V, W, U, Y, INV_DEN, BONUS_SHARE, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr,
):
    b, h, channels, c_mask, begin, length = _channel_program(cu_seqlens, n_heads, HEAD_DIM, BLOCK_D)
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    u = tl.load(U + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    base = b * stride_b + h * stride_h + channels
    numerator = tl.zeros([BLOCK_D], dtype=tl.float32)
    denominator = tl.zeros([BLOCK_D], dtype=tl.float32)
    exponent = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    offset = base + begin * stride_t
    for _ in range(0, length):
        k = tl.minimum(tl.maximum(tl.load(K + offset, mask=c_mask, other=0.0).to(tl.float32), -CLAMP), CLAMP)
        v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
        bonus = u + k
        top = tl.maximum(exponent, bonus)
        kept = tl.exp(exponent - top)
        fresh = tl.exp(bonus - top)
        scaled_den = kept * denominator + fresh + eps * tl.exp(-top)
        tl.store(Y + offset, ((kept * numerator + fresh * v) / scaled_den).to(Y.dtype.element_ty), mask=c_mask)
        tl.store(INV_DEN + offset, tl.exp(-top) / scaled_den, mask=c_mask)
        tl.store(BONUS_SHARE + offset, fresh / scaled_den, mask=c_mask)
        decayed = exponent + w
        top = tl.maximum(decayed, k)
        kept = tl.exp(decayed - top)
        fresh = tl.exp(k - top)
        numerator = kept * numerator + fresh * v
        denominator = kept * denominator + fresh
        exponent = top
        offset += stride_t


@triton.jit
def wkv_bwd_kernel(
    K, V, W, Y, INV_DEN, BONUS_SHARE, DY, DK, DV, DW_PARTIAL, DU_PARTIAL, cu_seqlens,
    stride_b, stride_t, stride_h, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CLAMP: tl.constexpr,
):
    """Reverse scan. With alpha_t = dy_t / den_t and beta_t = -dy_t y_t / den_t (the adjoints
    of a_t and b_t), the running sums A_s = sum_{t>s} alpha_t exp((t-1-s) w), B_s (the same
    for beta) and their lag-weighted versions C_s, E_s give dv_s, dk_s and dw."""
    b, h, channels, c_mask, begin, length = _channel_program(cu_seqlens, n_heads, HEAD_DIM, BLOCK_D)
    w = tl.load(W + h * HEAD_DIM + channels, mask=c_mask, other=0.0).to(tl.float32)
    decay = tl.exp(w)
    base = b * stride_b + h * stride_h + channels
    sum_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_alpha = tl.zeros([BLOCK_D], dtype=tl.float32)
    lagged_beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    offset = base + (begin + length - 1) * stride_t
    for _ in range(0, length):
        raw_k = tl.load(K + offset, mask=c_mask, other=0.0).to(tl.float32)
        k = tl.minimum(tl.maximum(raw_k, -CLAMP), CLAMP)
        v = tl.load(V + offset, mask=c_mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offset, mask=c_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offset, mask=c_mask, other=0.0).to(tl.float32)
        inv_den = tl.load(INV_DEN + offset, mask=c_mask, other=0.0)
        share = tl.load(BONUS_SHARE + offset, mask=c_mask, other=0.0)
        key_weight = tl.exp(k)
        direct = dy * share
        dv = direct + key_weight * sum_alpha
        dk = direct * (v - y) + key_weight * (v * sum_alpha + sum_beta)
        dk = tl.where((raw_k >= -CLAMP) & (raw_k <= CLAMP), dk, 0.0)
        tl.store(DV + offset, dv.to(DV.dtype.element_ty), mask=c_mask)
        tl.store(DK + offset, dk.to(DK.dtype.element_ty), mask=c_mask)
        du += direct * (v - y)
        dw += key_weight * (v * lagged_alpha + lagged_beta)
        alpha = dy * inv_den
        beta = -dy * y * inv_den
        lagged_alpha = decay * (lagged_alpha + sum_alpha)
        lagged_beta = decay * (lagged_beta + sum_beta)
        sum_alpha = alpha + decay * sum_alpha
        sum_beta = beta + decay * sum_beta
        offset -= stride_t
    partial = ((tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * HEAD_DIM).to(tl.int64)
    tl.store(DW_PARTIAL + partial + channels, dw, mask=c_mask)
    tl.store(DU_PARTIAL + partial + channels, du, mask=c_mask)


def _channel_block(head_dim: int) -> int:
    return min(64, triton.next_power_of_2(head_dim))


def wkv_fwd(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, cu_seqlens: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WKV at every step of every packed sequence.

    Args:
        k, v: contiguous ``(B, T, H, D)``.
        w, u: ``(H, D)`` log decay (negative) and bonus.
        cu_seqlens: ``(S + 1,)`` int32 sequence offsets.

    Returns:
        y ``(B, T, H, D)`` in v's dtype; and, float32, the inverse denominators and the bonus
        shares ``exp(u) e_t / den_t`` that :func:`wkv_bwd` needs.
    """
    if k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"wkv: k and v must be contiguous (B, T, H, D) of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, _, heads, head_dim = k.shape
    y = new_output(v, v.shape, v.dtype)
    inv_den = new_output(v, v.shape, torch.float32)
    share = new_output(v, v.shape, torch.float32)
    block = _channel_block(head_dim)
    grid = (cu_seqlens.shape[0] - 1, batch * heads, triton.cdiv(head_dim, block))
    if grid[0] and y.numel():
        wkv_fwd_kernel[grid](
            k, v, w.float().contiguous(), u.float().contiguous(), y, inv_den, share, cu_seqlens,
            k.stride(0), k.stride(1), k.stride(2), heads, eps,
            HEAD_DIM=head_dim, BLOCK_D=block, CLAMP=KEY_CLAMP,
        )
    return y, inv_den, share


def wkv_bwd(
    grad_y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
    inv_den: torch.Tensor, share: torch.Tensor, cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dk, dv, dw, du) of :func:`wkv_fwd`; dw and du are ``(H, D)`` float32."""
    batch, _, heads, head_dim = k.shape
    grad_y = grad_y.contiguous()
    if not (k.is_contiguous() and v.is_contiguous() and y.is_contiguous()):
        raise ValueError("wkv_bwd: k, v and y must be contiguous")
    dk = new_output(k, k.shape, k.dtype)
    dv = new_output(v, v.shape, v.dtype)
    sequences = cu_seqlens.shape[0] - 1
    dw_partial = torch.zeros(sequences, batch * heads, head_dim, dtype=torch.float32, device=k.device)
    du_partial = torch.zeros_like(dw_partial)
    block = _channel_block(head_dim)
    grid = (sequences, batch * heads, triton.cdiv(head_dim, block))
    if sequences and k.numel():
        wkv_bwd_kernel[grid](
            k, v, w.float().contiguous(), y, inv_den, share, grad_y, dk, dv, dw_partial, du_partial, cu_seqlens,
            k.stride(0), k.stride(1), k.stride(2), heads,
            HEAD_DIM=head_dim, BLOCK_D=block, CLAMP=KEY_CLAMP,
        )
    fold = lambda partial: partial.view(sequences, batch, heads, head_dim).sum(dim=(0, 1))  # noqa: E731
    return dk, dv, fold(dw_partial), fold(du_partial)
