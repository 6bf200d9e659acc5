"""Sana's ReLU linear self-attention, fused, O(N) in tokens, with backward and exact JVP rules.

Per batch and head, phi = ReLU, q_m, k_n, v_n the d-vectors of query m, key n, value n
(diffusers' SanaLinearAttnProcessor2_0 writes S as [V;1] phi(K)^T; here its d x d part is
`state` and its last row `ksum`), all in fp32:

    state = sum_n phi(k_n) v_n^T,  ksum = sum_n phi(k_n)                         (key pass)
    out_m = num_m / den_m,  num_m = state^T phi(q_m),  den_m = ksum . phi(q_m) + eps   (query pass)

JVP (m_k = [k > 0], m_q = [q > 0]; derivation in docs/kernels.md):
    tstate = sum_n (m_k tk_n) v_n^T + phi(k_n) tv_n^T,  tksum = sum_n m_k tk_n
    tout_m = (tnum_m - out_m tden_m) / den_m,  tnum_m = tstate^T phi(q_m) + state^T (m_q tq_m),
    tden_m = tksum . phi(q_m) + ksum . (m_q tq_m)

Backward (dnum = dout / den, dden = -(dout . out) / den):
    dq = m_q (state dnum + ksum dden);  dstate = sum_m phi(q_m) dnum_m^T;  dksum = sum_m phi(q_m) dden_m
    dk = m_k (dstate v_n + dksum);  dv_n = dstate^T phi(k_n)

Every pass keeps d x d states per head and never an N x N matrix. q, k, v, out are [B, N, H*d]
(head h in columns h*d..h*d+d), the layout of diffusers' to_q/to_k/to_v outputs.
"""

import torch
import triton
import triton.language as tl

from tbcm.kernels.utils import call_on_plain_tensors, check_runnable, head_block, head_tile, sum_over, zeros_if_none

# 32-token tiles and 8 warps: no register spills in any of the four kernels at head dim 32 on sm_90
# (ptxas resource usage, tests/kernels/test_kernel_compiles.py); not tuned for speed on a GPU yet
BLOCK_TOKENS = 32
NUM_WARPS = 8


@triton.jit
def _state_offsets(program, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    return program * BLOCK_D * BLOCK_D + dims[:, None] * BLOCK_D + dims[None, :], program * BLOCK_D + dims


@triton.jit
def _key_pass_kernel(k_ptr, v_ptr, tk_ptr, tv_ptr, state_ptr, ksum_ptr, n_tokens, n_heads, head_dim,
                     TANGENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, head): reduce the keys into state and ksum (or their tangents).
    program = tl.program_id(0)
    batch, head = program // n_heads, program % n_heads
    state = tl.full([BLOCK_D, BLOCK_D], 0.0, tl.float32)
    ksum = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        offsets, mask = head_tile(batch, head, start, n_tokens, n_heads, head_dim, BLOCK_N, BLOCK_D)
        k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        phi_k = tl.maximum(k, 0.0)
        if TANGENT:
            tphi_k = tl.where(k > 0, tl.load(tk_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
            tv = tl.load(tv_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            state = tl.dot(tl.trans(tphi_k), v, state, input_precision="ieee")
            state = tl.dot(tl.trans(phi_k), tv, state, input_precision="ieee")
            ksum += sum_over(tphi_k, 0)
        else:
            state = tl.dot(tl.trans(phi_k), v, state, input_precision="ieee")
            ksum += sum_over(phi_k, 0)
    state_offsets, ksum_offsets = _state_offsets(program, BLOCK_D)
    tl.store(state_ptr + state_offsets, state)
    tl.store(ksum_ptr + ksum_offsets, ksum)


@triton.jit
def _load_states(state_ptr, ksum_ptr, program, BLOCK_D: tl.constexpr):
    state_offsets, ksum_offsets = _state_offsets(program, BLOCK_D)
    return tl.load(state_ptr + state_offsets), tl.load(ksum_ptr + ksum_offsets)


@triton.jit
def _attend(phi_q, state, ksum, eps):
    # out = num / den with num = phi(q) state, den = phi(q) . ksum + eps
    den = sum_over(phi_q * ksum[None, :], 1) + eps
    return tl.dot(phi_q, state, input_precision="ieee") / den[:, None], den


@triton.jit
def _query_pass_kernel(q_ptr, tq_ptr, state_ptr, ksum_ptr, tstate_ptr, tksum_ptr, out_ptr, n_tokens, n_heads,
                       head_dim, eps, TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (query blocks, batch*head): write out, or its tangent tout when TANGENT.
    program = tl.program_id(1)
    batch, head = program // n_heads, program % n_heads
    offsets, mask = head_tile(batch, head, tl.program_id(0) * BLOCK_M, n_tokens, n_heads, head_dim, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    phi_q = tl.maximum(q, 0.0)
    state, ksum = _load_states(state_ptr, ksum_ptr, program, BLOCK_D)
    out, den = _attend(phi_q, state, ksum, eps)
    if TANGENT:
        tstate, tksum = _load_states(tstate_ptr, tksum_ptr, program, BLOCK_D)
        tphi_q = tl.where(q > 0, tl.load(tq_ptr + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
        tnum = tl.dot(tphi_q, state, input_precision="ieee") + tl.dot(phi_q, tstate, input_precision="ieee")
        tden = sum_over(tphi_q * ksum[None, :], 1) + sum_over(phi_q * tksum[None, :], 1)
        out = (tnum - out * tden[:, None]) / den[:, None]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_query_kernel(q_ptr, dout_ptr, state_ptr, ksum_ptr, dq_ptr, dstate_ptr, dksum_ptr, n_tokens, n_heads,
                           head_dim, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch, head): dq for every query, and the reduced dstate, dksum.
    program = tl.program_id(0)
    batch, head = program // n_heads, program % n_heads
    state, ksum = _load_states(state_ptr, ksum_ptr, program, BLOCK_D)
    dstate = tl.full([BLOCK_D, BLOCK_D], 0.0, tl.float32)
    dksum = tl.full([BLOCK_D], 0.0, tl.float32)
    for start in range(0, n_tokens, BLOCK_M):
        offsets, mask = head_tile(batch, head, start, n_tokens, n_heads, head_dim, BLOCK_M, BLOCK_D)
        q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        phi_q = tl.maximum(q, 0.0)
        out, den = _attend(phi_q, state, ksum, eps)
        dnum = dout / den[:, None]
        dden = -sum_over(dout * out, 1) / den
        dphi_q = tl.dot(dnum, tl.trans(state), input_precision="ieee") + dden[:, None] * ksum[None, :]
        tl.store(dq_ptr + offsets, tl.where(q > 0, dphi_q, 0.0).to(dq_ptr.dtype.element_ty), mask=mask)
        dstate = tl.dot(tl.trans(phi_q), dnum, dstate, input_precision="ieee")
        dksum += sum_over(phi_q * dden[:, None], 0)
    state_offsets, ksum_offsets = _state_offsets(program, BLOCK_D)
    tl.store(dstate_ptr + state_offsets, dstate)
    tl.store(dksum_ptr + ksum_offsets, dksum)


@triton.jit
def _backward_key_kernel(k_ptr, v_ptr, dstate_ptr, dksum_ptr, dk_ptr, dv_ptr, n_tokens, n_heads, head_dim,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (key blocks, batch*head): dk and dv from the reduced dstate, dksum.
    program = tl.program_id(1)
    batch, head = program // n_heads, program % n_heads
    offsets, mask = head_tile(batch, head, tl.program_id(0) * BLOCK_N, n_tokens, n_heads, head_dim, BLOCK_N, BLOCK_D)
    k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dstate, dksum = _load_states(dstate_ptr, dksum_ptr, program, BLOCK_D)
    dphi_k = tl.dot(v, tl.trans(dstate), input_precision="ieee") + dksum[None, :]
    tl.store(dk_ptr + offsets, tl.where(k > 0, dphi_k, 0.0).to(dk_ptr.dtype.element_ty), mask=mask)
    dv = tl.dot(tl.maximum(k, 0.0), dstate, input_precision="ieee")
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _empty_states(q, heads):
    """fp32 [B*H, Dp, Dp] state and [B*H, Dp] ksum, Dp the padded head dim (padding stays zero)."""
    block_d = head_block(q.shape[2] // heads)
    state = torch.empty(q.shape[0] * heads, block_d, block_d, dtype=torch.float32, device=q.device)
    return state, torch.empty(q.shape[0] * heads, block_d, dtype=torch.float32, device=q.device)


def _key_pass(k, v, tk, tv, heads, tangent):
    state, ksum = _empty_states(k, heads)
    _key_pass_kernel[(k.shape[0] * heads,)](
        k, v, tk, tv, state, ksum, k.shape[1], heads, k.shape[2] // heads,
        TANGENT=tangent, BLOCK_N=BLOCK_TOKENS, BLOCK_D=state.shape[-1], num_warps=NUM_WARPS)
    return state, ksum


def _query_pass(q, tq, state, ksum, tstate, tksum, heads, eps, tangent):
    out = torch.empty_like(q)
    grid = (triton.cdiv(q.shape[1], BLOCK_TOKENS), q.shape[0] * heads)
    _query_pass_kernel[grid](
        q, tq, state, ksum, tstate, tksum, out, q.shape[1], heads, q.shape[2] // heads, eps,
        TANGENT=tangent, BLOCK_M=BLOCK_TOKENS, BLOCK_D=state.shape[-1], num_warps=NUM_WARPS)
    return out


def _forward(q, k, v, heads, eps):
    check_runnable(q, k, v)
    state, ksum = _key_pass(k, v, k, v, heads, tangent=False)
    return _query_pass(q, q, state, ksum, state, ksum, heads, eps, tangent=False), state, ksum


def _tangent(q, k, v, tq, tk, tv, state, ksum, heads, eps):
    tstate, tksum = _key_pass(k, v, tk, tv, heads, tangent=True)
    return _query_pass(q, tq, state, ksum, tstate, tksum, heads, eps, tangent=True)


def _backward(q, k, v, dout, state, ksum, heads, eps):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dstate, dksum = _empty_states(q, heads)
    head_dim, block_d = q.shape[2] // heads, state.shape[-1]
    _backward_query_kernel[(q.shape[0] * heads,)](
        q, dout, state, ksum, dq, dstate, dksum, q.shape[1], heads, head_dim, eps,
        BLOCK_M=BLOCK_TOKENS, BLOCK_D=block_d, num_warps=NUM_WARPS)
    _backward_key_kernel[(triton.cdiv(k.shape[1], BLOCK_TOKENS), k.shape[0] * heads)](
        k, v, dstate, dksum, dk, dv, k.shape[1], heads, head_dim, BLOCK_N=BLOCK_TOKENS, BLOCK_D=block_d,
        num_warps=NUM_WARPS)
    return dq, dk, dv


class LinearAttentionFunction(torch.autograd.Function):
    """ReLU linear attention on contiguous [B, N, H*d] q, k, v of one dtype; returns (out, state, ksum)."""

    @staticmethod
    def forward(q, k, v, heads, eps):
        return _forward(q, k, v, heads, eps)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        q, k, v, ctx.heads, ctx.eps = inputs
        _, state, ksum = outputs
        ctx.mark_non_differentiable(state, ksum)
        ctx.save_for_backward(q, k, v, state, ksum)
        ctx.save_for_forward(q, k, v, state, ksum)

    @staticmethod
    def backward(ctx, dout, _dstate, _dksum):
        q, k, v, state, ksum = ctx.saved_tensors
        dq, dk, dv = call_on_plain_tensors(_backward, q, k, v, dout.contiguous(), state, ksum, ctx.heads, ctx.eps)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _heads, _eps):
        q, k, v, state, ksum = ctx.saved_tensors
        tout = call_on_plain_tensors(
            _tangent, q, k, v, zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v), state, ksum,
            ctx.heads, ctx.eps)
        return tout, None, None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention of diffusers' SanaLinearAttnProcessor2_0 on [B, N, H*d] q, k, v.

    Accumulates in fp32 and returns q's dtype (the processor casts to the layer's dtype anyway).
    """
    dtype = q.dtype
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    return LinearAttentionFunction.apply(q, k, v, heads, eps)[0]
