"""Plain-PyTorch versions of what each kernel computes, as diffusers computes it.

The tests compare the kernels against these (and torch.func.jvp of these), and the benchmark
times the kernels against them. Softmax attention goes through F.scaled_dot_product_attention:
run it under sdpa_kernel(SDPBackend.MATH) for torch.func.jvp, which the fused backends lack.
"""

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm itself, with `weight` passed in (None: elementwise_affine=False)."""
    norm = RMSNorm(x.shape[-1], eps=eps, elementwise_affine=weight is not None)
    return torch.func.functional_call(norm, {} if weight is None else {"weight": weight}, (x,))


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SanaTransformerBlock's LayerNorm (no affine) followed by x * (1 + scale) + shift."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, eps: float = 1e-15) -> torch.Tensor:
    """SanaLinearAttnProcessor2_0's core on [B, N, H*d]: ReLU, fp32, V padded with ones, num / (den + eps)."""
    q = F.relu(q.transpose(1, 2).unflatten(1, (heads, -1))).float()
    k = F.relu(k.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)).float()
    v = F.pad(v.transpose(1, 2).unflatten(1, (heads, -1)).float(), (0, 0, 0, 1), value=1.0)
    out = (v @ k) @ q
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).flatten(1, 2).transpose(1, 2)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """SanaAttnProcessor2_0's core on q [B, Nq, H*d], k, v [B, Nk, H*d] with a [B, Nk] additive key bias."""
    batch, n_queries, width = q.shape
    q, k, v = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, n_queries, width)
