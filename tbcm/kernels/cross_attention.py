"""Flash-style softmax attention for Sana's cross-attention, with the exact JVP in the same pass.

Per batch and head, with scores s = q k^T / sqrt(d) + bias (bias: a per-key additive mask,
0 to keep and e.g. -10000 for padded caption tokens, as diffusers builds it) and P = softmax(s):

    O = P V                                                       (forward, online softmax)
    tS = (tq k^T + q tk^T) / sqrt(d),  r = rowsum(P * tS),  A = P tV,  B = (P * tS) V
    tO = A + B - r * O                                            (JVP; softmax' = P*(tS - r))
    dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),  dQ = dS K / sqrt(d),  dK = dS^T Q / sqrt(d)

The forward walks the keys once keeping the running max m and sum l (online softmax); the
tangent pass keeps r, A and B beside the output accumulator, all rescaled by the same factor,
and finishes with tO = (A + B - r O) / l, never forming an N x N matrix (NVIDIA rCM's scheme).
The backward recomputes P from the saved logsumexp (FlashAttention-2's scheme). Lengths are
arbitrary and head dims need not be powers of two: tiles are padded and masked.
q is [B, Nq, H*d] and k, v are [B, Nk, H*d], the layout of diffusers' projections.
"""

import torch
import triton
import triton.language as tl

from tbcm.kernels.utils import call_on_plain_tensors, check_runnable, head_block, head_tile, max_over, sum_over

# (BLOCK_M queries, BLOCK_N keys, num_warps) per pass: the largest tiles that compile without register
# spills at head dims up to 128 on sm_90 (ptxas resource usage, tests/kernels/test_kernel_compiles.py).
# The tangent pass keeps three accumulators instead of one, hence its smaller tiles. Not timed on a GPU yet.
FORWARD_TILES = (64, 64, 8)
TANGENT_TILES = (32, 32, 8)
BACKWARD_TILES = (32, 32, 4)


@triton.jit
def _scores(q, k, bias_ptr, batch, key_start, n_keys, scale, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    # s = q k^T / sqrt(d) + bias, and -inf for keys past the end
    keys = key_start + tl.arange(0, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_BIAS:
        s += tl.load(bias_ptr + batch * n_keys + keys, mask=keys < n_keys, other=0.0)[None, :]
    return tl.where((keys < n_keys)[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, tq_ptr, tk_ptr, tv_ptr, out_ptr, tout_ptr, lse_ptr,
                    n_queries, n_keys, n_heads, head_dim, scale,
                    HAS_BIAS: tl.constexpr, TANGENT: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr,
                    HAS_TV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (query blocks, batch*head). Writes O and logsumexp, or O and tO when TANGENT.
    program = tl.program_id(1)
    batch, head = program // n_heads, program % n_heads
    q_start = tl.program_id(0) * BLOCK_M
    q_offsets, q_mask = head_tile(batch, head, q_start, n_queries, n_heads, head_dim, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if TANGENT:
        if HAS_TQ:
            tq = tl.load(tq_ptr + q_offsets, mask=q_mask, other=0.0)
        r = tl.full([BLOCK_M], 0.0, tl.float32)
        acc_a = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        acc_b = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for key_start in range(0, n_keys, BLOCK_N):
        kv_offsets, kv_mask = head_tile(batch, head, key_start, n_keys, n_heads, head_dim, BLOCK_N, BLOCK_D)
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = _scores(q, k, bias_ptr, batch, key_start, n_keys, scale, HAS_BIAS, BLOCK_N)
        new_max = tl.maximum(row_max, max_over(s, 1))
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows whose keys so far are all -inf
        alpha = tl.exp(row_max - finite_max)
        p = tl.exp(s - finite_max[:, None])
        row_sum = row_sum * alpha + sum_over(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        if TANGENT:
            ts = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
            if HAS_TQ:
                ts = tl.dot(tq, tl.trans(k), ts, input_precision="ieee")
            if HAS_TK:
                tk = tl.load(tk_ptr + kv_offsets, mask=kv_mask, other=0.0)
                ts = tl.dot(q, tl.trans(tk), ts, input_precision="ieee")
            p_ts = p * ts * scale
            r = r * alpha + sum_over(p_ts, 1)
            acc_b = tl.dot(p_ts.to(v.dtype), v, acc_b * alpha[:, None], input_precision="ieee")
            if HAS_TV:
                tv = tl.load(tv_ptr + kv_offsets, mask=kv_mask, other=0.0)
                acc_a = tl.dot(p.to(tv.dtype), tv, acc_a * alpha[:, None], input_precision="ieee")
        row_max = new_max
    out = acc / row_sum[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    rows = q_start + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + program * n_queries + rows, row_max + tl.log(row_sum), mask=rows < n_queries)
    if TANGENT:
        tout = (acc_a + acc_b - r[:, None] * out) / row_sum[:, None]
        tl.store(tout_ptr + q_offsets, tout.to(tout_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _probabilities_and_score_grads(q, k, v, dout, lse, delta, bias_ptr, batch, key_start, n_keys, scale,
                                   HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    # P = exp(s - logsumexp) and dS = P * (dO V^T - delta), delta = rowsum(dO * O)
    p = tl.exp(_scores(q, k, bias_ptr, batch, key_start, n_keys, scale, HAS_BIAS, BLOCK_N) - lse[:, None])
    ds = p * (tl.dot(dout, tl.trans(v), input_precision="ieee") - delta[:, None])
    return p, ds


@triton.jit
def _load_query_side(q_ptr, dout_ptr, lse_ptr, delta_ptr, program, q_start, n_queries, n_heads, head_dim,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    batch, head = program // n_heads, program % n_heads
    offsets, mask = head_tile(batch, head, q_start, n_queries, n_heads, head_dim, BLOCK_M, BLOCK_D)
    rows = q_start + tl.arange(0, BLOCK_M)
    row_mask = rows < n_queries
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0)
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + program * n_queries + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + program * n_queries + rows, mask=row_mask, other=0.0)
    return offsets, mask, q, dout, lse, delta


@triton.jit
def _backward_key_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                         n_queries, n_keys, n_heads, head_dim, scale,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (key blocks, batch*head): dK and dV, walking all query blocks.
    program = tl.program_id(1)
    batch, head = program // n_heads, program % n_heads
    key_start = tl.program_id(0) * BLOCK_N
    kv_offsets, kv_mask = head_tile(batch, head, key_start, n_keys, n_heads, head_dim, BLOCK_N, BLOCK_D)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for q_start in range(0, n_queries, BLOCK_M):
        _, _, q, dout, lse, delta = _load_query_side(
            q_ptr, dout_ptr, lse_ptr, delta_ptr, program, q_start, n_queries, n_heads, head_dim, BLOCK_M, BLOCK_D)
        p, ds = _probabilities_and_score_grads(
            q, k, v, dout, lse, delta, bias_ptr, batch, key_start, n_keys, scale, HAS_BIAS, BLOCK_N)
        dv = tl.dot(tl.trans(p.to(dout.dtype)), dout, dv, input_precision="ieee")
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision="ieee")
    tl.store(dk_ptr + kv_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_query_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
                           n_queries, n_keys, n_heads, head_dim, scale,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (query blocks, batch*head): dQ, walking all key blocks.
    program = tl.program_id(1)
    batch, head = program // n_heads, program % n_heads
    q_offsets, q_mask, q, dout, lse, delta = _load_query_side(
        q_ptr, dout_ptr, lse_ptr, delta_ptr, program, tl.program_id(0) * BLOCK_M, n_queries, n_heads, head_dim,
        BLOCK_M, BLOCK_D)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for key_start in range(0, n_keys, BLOCK_N):
        kv_offsets, kv_mask = head_tile(batch, head, key_start, n_keys, n_heads, head_dim, BLOCK_N, BLOCK_D)
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        _, ds = _probabilities_and_score_grads(
            q, k, v, dout, lse, delta, bias_ptr, batch, key_start, n_keys, scale, HAS_BIAS, BLOCK_N)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    tl.store(dq_ptr + q_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _forward_pass(q, k, v, key_bias, tq, tk, tv, heads):
    """(O, logsumexp [B, H, Nq] fp32, tO or None); tO is computed when any tangent is given."""
    check_runnable(q, k, v)
    batch, n_queries, width = q.shape
    head_dim = width // heads
    tangent = tq is not None or tk is not None or tv is not None
    out = torch.empty_like(q)
    tout = torch.empty_like(q) if tangent else None
    lse = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps = TANGENT_TILES if tangent else FORWARD_TILES
    _forward_kernel[(triton.cdiv(n_queries, block_m), batch * heads)](
        q, k, v, q if key_bias is None else key_bias, q if tq is None else tq, k if tk is None else tk,
        v if tv is None else tv, out, out if tout is None else tout, lse,
        n_queries, k.shape[1], heads, head_dim, head_dim ** -0.5,
        HAS_BIAS=key_bias is not None, TANGENT=tangent, HAS_TQ=tq is not None, HAS_TK=tk is not None,
        HAS_TV=tv is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(head_dim), num_warps=num_warps)
    return out, lse, tout


def _backward(q, k, v, key_bias, out, lse, dout, heads):
    batch, n_queries, width = q.shape
    head_dim = width // heads
    delta = (out.float() * dout.float()).view(batch, n_queries, heads, head_dim).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (q, k, v, q if key_bias is None else key_bias, dout, lse, delta)
    sizes = (n_queries, k.shape[1], heads, head_dim, head_dim ** -0.5)
    block_m, block_n, num_warps = BACKWARD_TILES
    blocks = dict(HAS_BIAS=key_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(head_dim),
                  num_warps=num_warps)
    _backward_key_kernel[(triton.cdiv(k.shape[1], block_n), batch * heads)](*args, dk, dv, *sizes, **blocks)
    _backward_query_kernel[(triton.cdiv(n_queries, block_m), batch * heads)](*args, dq, *sizes, **blocks)
    return dq, dk, dv


class SoftmaxAttentionFunction(torch.autograd.Function):
    """Softmax attention on contiguous q [B, Nq, H*d], k, v [B, Nk, H*d]; returns (O, logsumexp)."""

    @staticmethod
    def forward(q, k, v, key_bias, heads):
        out, lse, _ = _forward_pass(q, k, v, key_bias, None, None, None, heads)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        q, k, v, key_bias, ctx.heads = inputs
        out, lse = outputs
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, key_bias, out, lse)
        ctx.save_for_forward(q, k, v, key_bias)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, key_bias, out, lse = ctx.saved_tensors
        dq, dk, dv = call_on_plain_tensors(_backward, q, k, v, key_bias, out, lse, dout.contiguous(), ctx.heads)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tbias, _theads):
        q, k, v, key_bias = ctx.saved_tensors
        if tq is None and tk is None and tv is None:
            return torch.zeros_like(q), None
        tangents = (t if t is None else t.contiguous() for t in (tq, tk, tv))
        _, _, tout = call_on_plain_tensors(_forward_pass, q, k, v, key_bias, *tangents, ctx.heads)
        return tout, None


def _prepare(q, k, v, key_bias):
    """One dtype and contiguous memory for q, k, v; the bias as contiguous fp32 [B, Nk]."""
    q, k, v = (t.to(q.dtype).contiguous() for t in (q, k, v))
    if key_bias is not None:
        key_bias = key_bias.to(torch.float32).expand(q.shape[0], k.shape[1]).contiguous()
    return q, k, v, key_bias


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + key_bias) v per head, for q [B, Nq, H*d], k, v [B, Nk, H*d].

    key_bias is [B or 1, Nk] and added to every query's scores (a key-padding mask); it gets
    no gradient and no tangent. Differentiable by autograd and by torch.func.jvp.
    """
    q, k, v, key_bias = _prepare(q, k, v, key_bias)
    return SoftmaxAttentionFunction.apply(q, k, v, key_bias, heads)[0]


def softmax_attention_with_tangent(q, k, v, tq, tk, tv, heads: int, key_bias: torch.Tensor | None = None):
    """(O, tO) in one pass over the keys, for a caller propagating tangents layer by layer.

    Any of tq, tk, tv may be None (no tangent); the results are not differentiable.
    """
    q, k, v, key_bias = _prepare(q, k, v, key_bias)
    tq, tk, tv = (t if t is None else t.to(q.dtype).contiguous() for t in (tq, tk, tv))
    out, _, tout = _forward_pass(q, k, v, key_bias, tq, tk, tv, heads)
    return out, tout
