"""LayerNorm (no affine) fused with Sana's adaLN modulation, with backward and JVP rules.

x is [B, N, D]; scale and shift are per-sample, [B, 1, D] (or [1, 1, D]), broadcast over the
N tokens. Per row, with mu = mean(x), r = rsqrt(var(x) + eps), xhat = (x - mu) * r:

    y  = xhat * (1 + scale) + shift                                                (forward)
    ty = (1 + scale) * P(tx) + tscale * xhat + tshift                              (tangent)
    dx = P((1 + scale) * dy);  dscale = sum_tokens dy * xhat;  dshift = sum_tokens dy   (backward)

where P(v) = r * (v - mean(v) - xhat * mean(xhat * v)) is the Jacobian of xhat applied to v.
Everything is computed in fp32 and rounded once on store (PyTorch rounds LN, product and sum
separately in half precision, so half-precision results differ by about one ulp).
"""

import torch
import triton
import triton.language as tl

from tbcm.kernels.utils import (
    call_on_plain_tensors, check_runnable, parallel_programs, row_settings, sum_over, zeros_if_none,
)


@triton.jit
def _layer_normalize_row(x_ptr, row, n_cols, eps, BLOCK: tl.constexpr):
    """Load row `row` of a contiguous [rows, n_cols] tensor; return cols, mask, xhat, r."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    centered = tl.where(mask, x - sum_over(x, 0) / n_cols, 0.0)
    rstd = tl.rsqrt(sum_over(centered * centered, 0) / n_cols + eps)
    return cols, mask, centered * rstd, rstd


@triton.jit
def _layer_norm_project(v, xhat, rstd, n_cols):
    # Jacobian of xhat applied to v: P(v) = r * (v - mean(v) - xhat * mean(xhat * v))
    return rstd * (v - sum_over(v, 0) / n_cols - xhat * sum_over(xhat * v, 0) / n_cols)


@triton.jit
def _ln_modulate_forward_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, n_tokens, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sample = row // n_tokens
    cols, mask, xhat, _ = _layer_normalize_row(x_ptr, row, n_cols, eps, BLOCK)
    scale = tl.load(scale_ptr + sample * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + sample * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = xhat * (1.0 + scale) + shift
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_modulate_tangent_kernel(x_ptr, scale_ptr, tx_ptr, tscale_ptr, tshift_ptr, ty_ptr, n_tokens, n_cols, eps,
                                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sample_offsets = (row // n_tokens) * n_cols
    cols, mask, xhat, rstd = _layer_normalize_row(x_ptr, row, n_cols, eps, BLOCK)
    scale = tl.load(scale_ptr + sample_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    tscale = tl.load(tscale_ptr + sample_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    tshift = tl.load(tshift_ptr + sample_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    tx = tl.load(tx_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    ty = (1.0 + scale) * _layer_norm_project(tx, xhat, rstd, n_cols) + tscale * xhat + tshift
    tl.store(ty_ptr + row * n_cols + cols, ty.to(ty_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_modulate_backward_kernel(x_ptr, scale_ptr, dy_ptr, dx_ptr, dscale_partial_ptr, dshift_partial_ptr,
                                 n_tokens, n_cols, eps, tokens_per_program, BLOCK: tl.constexpr):
    # Grid (B, chunks): each program walks one chunk of one sample's tokens and keeps that
    # sample's partial dscale and dshift in registers; the host sums the chunks.
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(scale_ptr + sample * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dscale = tl.full([BLOCK], 0.0, tl.float32)
    dshift = tl.full([BLOCK], 0.0, tl.float32)
    first_token = chunk * tokens_per_program
    for token in range(first_token, tl.minimum(first_token + tokens_per_program, n_tokens)):
        row = sample * n_tokens + token
        _, _, xhat, rstd = _layer_normalize_row(x_ptr, row, n_cols, eps, BLOCK)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dx = _layer_norm_project(dy * (1.0 + scale), xhat, rstd, n_cols)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dscale += dy * xhat
        dshift += dy
    partial_offsets = (sample * tl.num_programs(1) + chunk) * n_cols + cols
    tl.store(dscale_partial_ptr + partial_offsets, dscale, mask=mask)
    tl.store(dshift_partial_ptr + partial_offsets, dshift, mask=mask)


def _forward(x, scale, shift, eps):
    check_runnable(x)
    n_samples, n_tokens, n_cols = x.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, scale.dtype), device=x.device)
    block, num_warps = row_settings(n_cols)
    _ln_modulate_forward_kernel[(n_samples * n_tokens,)](
        x, scale, shift, y, n_tokens, n_cols, eps, BLOCK=block, num_warps=num_warps)
    return y


def _tangent(x, scale, tx, tscale, tshift, eps, dtype):
    n_samples, n_tokens, n_cols = x.shape
    ty = torch.empty(x.shape, dtype=dtype, device=x.device)
    block, num_warps = row_settings(n_cols)
    _ln_modulate_tangent_kernel[(n_samples * n_tokens,)](
        x, scale, tx, tscale, tshift, ty, n_tokens, n_cols, eps, BLOCK=block, num_warps=num_warps)
    return ty


def _backward(x, scale, dy, eps):
    n_samples, n_tokens, n_cols = x.shape
    chunks = max(1, min(n_tokens, parallel_programs(x) // n_samples))
    dx = torch.empty_like(x)
    dscale_partial = torch.empty(n_samples, chunks, n_cols, dtype=torch.float32, device=x.device)
    dshift_partial = torch.empty_like(dscale_partial)
    block, num_warps = row_settings(n_cols)
    _ln_modulate_backward_kernel[(n_samples, chunks)](
        x, scale, dy, dx, dscale_partial, dshift_partial, n_tokens, n_cols, eps, triton.cdiv(n_tokens, chunks),
        BLOCK=block, num_warps=num_warps)
    return dx, dscale_partial.sum(1), dshift_partial.sum(1)


class LayerNormModulateFunction(torch.autograd.Function):
    """LN(x) * (1 + scale) + shift for contiguous x [B, N, D] and contiguous scale, shift [B, D]."""

    @staticmethod
    def forward(x, scale, shift, eps):
        return _forward(x, scale, shift, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, _, ctx.eps = inputs
        ctx.save_for_backward(x, scale)
        ctx.save_for_forward(x, scale)
        ctx.output_dtype = output.dtype

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, dscale, dshift = call_on_plain_tensors(_backward, x, scale, dy.contiguous(), ctx.eps)
        return dx, dscale.to(scale.dtype), dshift.to(scale.dtype), None

    @staticmethod
    def jvp(ctx, tx, tscale, tshift, _):
        x, scale = ctx.saved_tensors
        return call_on_plain_tensors(
            _tangent, x, scale, zeros_if_none(tx, x), zeros_if_none(tscale, scale), zeros_if_none(tshift, scale),
            ctx.eps, ctx.output_dtype)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x, no affine) * (1 + scale) + shift for x [B, N, D], scale and shift [B or 1, 1, D].

    The result has dtype promote(x, scale, shift), as the unfused PyTorch expression has.
    """
    n_samples, _, n_cols = x.shape
    dtype = torch.promote_types(scale.dtype, shift.dtype)
    scale, shift = (t.to(dtype).expand(n_samples, 1, n_cols).reshape(n_samples, n_cols).contiguous()
                    for t in (scale, shift))
    return LayerNormModulateFunction.apply(x.contiguous(), scale, shift, eps)
