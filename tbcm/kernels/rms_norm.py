"""Fused RMSNorm with diffusers' numerics, an autograd backward and a forward-mode (JVP) rule.

Used for Sana's QK-norm "rms_norm_across_heads" (one RMSNorm over all heads of q or k) and for
the caption norm. Per row x of n values, with r = rsqrt(mean(x^2) + eps) and xhat = x * r:

    y  = xhat * w                                              (forward)
    ty = w * r * (tx - xhat * mean(xhat * tx)) + tw * xhat     (tangent)
    dx = r * (g - xhat * mean(xhat * g)),  g = w * dy          (input gradient)
    dw = sum over rows of dy * xhat                            (weight gradient)

diffusers computes xhat in fp32, casts it to the weight's dtype when that is fp16/bf16 and
then multiplies by w; without a weight, y is cast back to x's dtype. The kernels do the same.
r is recomputed by the tangent and backward kernels (the row is loaded anyway) rather than saved.
"""

import torch
import triton
import triton.language as tl
from torch import nn

from tbcm.kernels.utils import (
    call_on_plain_tensors, check_runnable, parallel_programs, row_settings, sum_over, zeros_if_none,
)


@triton.jit
def _normalize_row(x_ptr, row, n_cols, eps, BLOCK: tl.constexpr):
    """Load row `row` of a contiguous [rows, n_cols] tensor; return cols, mask, xhat, r."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(sum_over(x * x, 0) / n_cols + eps)
    return cols, mask, x * rstd, rstd


@triton.jit
def _rms_project(v, xhat, rstd, n_cols):
    # Jacobian of xhat = x * r applied to v: r * (v - xhat * mean(xhat * v))
    return rstd * (v - xhat * sum_over(xhat * v, 0) / n_cols)


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps,
                             HAS_WEIGHT: tl.constexpr, ROUND_TO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols, mask, y, _ = _normalize_row(x_ptr, row, n_cols, eps, BLOCK)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if ROUND_TO_WEIGHT:  # diffusers: xhat.to(weight.dtype) before the multiply
            y = y.to(w.dtype).to(tl.float32)
        y = y * w.to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_tangent_kernel(x_ptr, tx_ptr, w_ptr, tw_ptr, ty_ptr, n_cols, eps,
                             HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols, mask, xhat, rstd = _normalize_row(x_ptr, row, n_cols, eps, BLOCK)
    tx = tl.load(tx_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    ty = _rms_project(tx, xhat, rstd, n_cols)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tw = tl.load(tw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        ty = ty * w + tw * xhat
    tl.store(ty_ptr + row * n_cols + cols, ty.to(ty_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols, eps, rows_per_program,
                              HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    # Persistent programs: each walks its rows and keeps its share of dw in registers.
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else 1.0
    dw = tl.full([BLOCK], 0.0, tl.float32)
    first_row = program * rows_per_program
    for row in range(first_row, tl.minimum(first_row + rows_per_program, n_rows)):
        _, _, xhat, rstd = _normalize_row(x_ptr, row, n_cols, eps, BLOCK)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dx = _rms_project(dy * w, xhat, rstd, n_cols)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + program * n_cols + cols, dw, mask=mask)


def _output_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    # diffusers: a half-precision weight sets the dtype, an fp32 weight promotes, no weight keeps x's
    if weight is None:
        return x.dtype
    if weight.dtype in (torch.float16, torch.bfloat16):
        return weight.dtype
    return torch.promote_types(x.dtype, weight.dtype)


def _forward(x, weight, eps):
    check_runnable(x)
    y = torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device)
    block, num_warps = row_settings(x.shape[1])
    has_weight = weight is not None
    _rms_norm_forward_kernel[(x.shape[0],)](
        x, weight if has_weight else x, y, x.shape[1], eps,
        HAS_WEIGHT=has_weight, ROUND_TO_WEIGHT=has_weight and weight.dtype in (torch.float16, torch.bfloat16),
        BLOCK=block, num_warps=num_warps)
    return y


def _tangent(x, tx, weight, tw, eps):
    has_weight = weight is not None
    ty = torch.empty(x.shape, dtype=_output_dtype(x, weight), device=x.device)
    block, num_warps = row_settings(x.shape[1])
    _rms_norm_tangent_kernel[(x.shape[0],)](
        x, tx, weight if has_weight else x, tw if has_weight else x, ty, x.shape[1], eps,
        HAS_WEIGHT=has_weight, BLOCK=block, num_warps=num_warps)
    return ty


def _backward(x, weight, dy, eps):
    n_rows, n_cols = x.shape
    programs = min(n_rows, parallel_programs(x))
    dx = torch.empty_like(x)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    block, num_warps = row_settings(n_cols)
    _rms_norm_backward_kernel[(programs,)](
        x, weight if weight is not None else x, dy, dx, dw_partial,
        n_rows, n_cols, eps, triton.cdiv(n_rows, programs),
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype) if weight is not None else None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim of a contiguous 2-D x; works under autograd and torch.func.jvp."""

    @staticmethod
    def forward(x, weight, eps):
        return _forward(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ctx.eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = call_on_plain_tensors(_backward, x, weight, dy.contiguous(), ctx.eps)
        return dx, dw, None

    @staticmethod
    def jvp(ctx, tx, tw, _):
        x, weight = ctx.saved_tensors
        tw = None if weight is None else zeros_if_none(tw, weight)
        return call_on_plain_tensors(_tangent, x, zeros_if_none(tx, x), weight, tw, ctx.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape), as diffusers' RMSNorm computes it."""
    n_cols = x.shape[-1]
    y = RMSNormFunction.apply(x.contiguous().view(-1, n_cols), weight, eps)
    return y.view(*x.shape[:-1], n_cols)


class FusedRMSNorm(nn.Module):
    """Drop-in for diffusers' RMSNorm without bias; `weight` keeps its name so state dicts match."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.register_parameter("weight", nn.Parameter(torch.ones(dim)) if elementwise_affine else None)

    @classmethod
    def sharing_parameters_of(cls, norm: nn.Module) -> "FusedRMSNorm":
        """A fused norm that uses `norm`'s own weight Parameter (no copy: optimizers keep working)."""
        if getattr(norm, "bias", None) is not None:
            raise ValueError("FusedRMSNorm has no bias")
        fused = cls(norm.dim[-1], norm.eps, elementwise_affine=False)
        fused.weight = norm.weight
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, affine={self.weight is not None}"
