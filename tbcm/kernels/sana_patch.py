"""Swap the fused kernels into a diffusers SanaTransformer2DModel, and restore it exactly.

What `install` replaces, and with what:
  - attn1.processor (SanaLinearAttnProcessor2_0)  -> FusedSanaLinearAttnProcessor (linear_attention)
  - attn2.processor (SanaAttnProcessor2_0)        -> FusedSanaCrossAttnProcessor (softmax_attention)
  - attn1/attn2 norm_q, norm_k and caption_norm (diffusers RMSNorm, no bias) -> FusedRMSNorm sharing
    the same weight Parameters (state_dict keys and optimizer references are unchanged)
  - each SanaTransformerBlock's forward: diffusers applies LayerNorm and then the adaLN modulation
    x * (1 + scale) + shift inline in that forward, so the only place to fuse them is the forward
    itself; an instance-level forward doing the same steps with layer_norm_modulate is set
  - norm_out (SanaModulatedNorm) -> FusedModulatedNorm
`uninstall` puts every original object back and deletes the instance-level forwards.
"""

import types

import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.sana_transformer import SanaModulatedNorm
from torch import nn

from tbcm.kernels.cross_attention import softmax_attention
from tbcm.kernels.layer_norm_modulate import layer_norm_modulate
from tbcm.kernels.linear_attention import linear_attention
from tbcm.kernels.rms_norm import FusedRMSNorm
from tbcm.kernels.utils import available, reason

_RECORD = "_tbcm_kernels_record"


def _project(attn, hidden_states, encoder_hidden_states):
    """q, k, v projections and QK norms, as both Sana processors do them."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _key_bias(attention_mask, batch, n_keys):
    """diffusers' cross-attention mask (an additive bias [B, 1, Nk], or a bool mask [B, Nk]) as a [B, Nk] bias."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 3 and attention_mask.shape[1] == 1:
        attention_mask = attention_mask[:, 0]
    if attention_mask.ndim != 2 or attention_mask.shape[-1] != n_keys or attention_mask.shape[0] not in (1, batch):
        raise ValueError("only key-padding masks of shape [B, Nk] or [B, 1, Nk] are fused, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:  # True = keep, as diffusers' pipelines build it
        return (~attention_mask).float() * -10000.0
    return attention_mask


class FusedSanaLinearAttnProcessor:
    """Same maths as diffusers' SanaLinearAttnProcessor2_0, with the fused linear-attention kernel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        original_dtype = hidden_states.dtype
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        hidden_states = linear_attention(query, key, value, attn.heads).to(original_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class FusedSanaCrossAttnProcessor:
    """Same maths as diffusers' SanaAttnProcessor2_0 (key-padding masks only), with the fused softmax kernel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        query, key, value = _project(attn, hidden_states, encoder_hidden_states)
        key_bias = _key_bias(attention_mask, query.shape[0], key.shape[1])
        hidden_states = softmax_attention(query, key, value, attn.heads, key_bias)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


class FusedModulatedNorm(nn.Module):
    """Drop-in for diffusers' SanaModulatedNorm without affine (the final norm of the transformer)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, hidden_states, temb, scale_shift_table):
        shift, scale = (scale_shift_table[None] + temb[:, None].to(scale_shift_table.device)).chunk(2, dim=1)
        return layer_norm_modulate(hidden_states, scale, shift, self.eps)


def _fused_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, timestep=None, height=None, width=None):
    """SanaTransformerBlock.forward with LayerNorm + modulation fused; same arguments and steps."""
    batch = hidden_states.shape[0]
    # adaLN parameters per sample: table + projected timestep embedding, six [B, 1, D] chunks
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)

    normed = layer_norm_modulate(hidden_states, scale_msa, shift_msa, self.norm1.eps).to(hidden_states.dtype)
    hidden_states = hidden_states + gate_msa * self.attn1(normed)

    if self.attn2 is not None:
        hidden_states = hidden_states + self.attn2(
            hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)

    normed = layer_norm_modulate(hidden_states, scale_mlp, shift_mlp, self.norm2.eps)
    ff_output = self.ff(normed.unflatten(1, (height, width)).permute(0, 3, 1, 2))
    return hidden_states + gate_mlp * ff_output.flatten(2, 3).permute(0, 2, 1)


def _has_affine(norm: nn.LayerNorm) -> bool:
    return norm.weight is not None or norm.bias is not None


def install(transformer: nn.Module) -> nn.Module:
    """Swap the fused kernels into a SanaTransformer2DModel in place; installing twice is a no-op."""
    if not available():
        raise RuntimeError(f"cannot install the Triton kernels: {reason()}")
    if hasattr(transformer, _RECORD):
        return transformer
    replaced, patched_blocks = [], []  # (owner, attribute, original object); blocks with an instance forward

    def replace(owner, name, new):
        replaced.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def replace_rms_norm(owner, name):
        norm = getattr(owner, name)
        if isinstance(norm, RMSNorm) and norm.bias is None:
            replace(owner, name, FusedRMSNorm.sharing_parameters_of(norm))

    for block in transformer.transformer_blocks:
        replace(block.attn1, "processor", FusedSanaLinearAttnProcessor())
        attentions = [block.attn1]
        if block.attn2 is not None:
            replace(block.attn2, "processor", FusedSanaCrossAttnProcessor())
            attentions.append(block.attn2)
        for attn in attentions:
            replace_rms_norm(attn, "norm_q")
            replace_rms_norm(attn, "norm_k")
        if not (_has_affine(block.norm1) or _has_affine(block.norm2)):
            block.forward = types.MethodType(_fused_block_forward, block)
            patched_blocks.append(block)
    replace_rms_norm(transformer, "caption_norm")
    norm_out = transformer.norm_out
    if isinstance(norm_out, SanaModulatedNorm) and not _has_affine(norm_out.norm):
        replace(transformer, "norm_out", FusedModulatedNorm(norm_out.norm.eps))
    setattr(transformer, _RECORD, (replaced, patched_blocks))
    return transformer


def uninstall(transformer: nn.Module) -> nn.Module:
    """Restore every object `install` replaced; a transformer without kernels is returned unchanged."""
    if not hasattr(transformer, _RECORD):
        return transformer
    replaced, patched_blocks = getattr(transformer, _RECORD)
    for owner, name, original in reversed(replaced):
        setattr(owner, name, original)
    for block in patched_blocks:
        del block.forward
    delattr(transformer, _RECORD)
    return transformer


def installed(transformer: nn.Module) -> bool:
    return hasattr(transformer, _RECORD)
