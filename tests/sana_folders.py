"""Tiny random-weight Sana and Sana-Sprint pipeline folders built with plain diffusers / transformers calls only
(never tbcm's own helpers): the reference folders of tests/models/test_conformance.py.

Each folder is what `SanaPipeline(...).save_pretrained(...)` / `SanaSprintPipeline(...).save_pretrained(...)`
writes: a Gemma2 text encoder with a Gemma tokenizer built offline (a character-level BPE vocabulary, no merges),
a DC-AE (`AutoencoderDC`, scaling factor 0.41407 as DC-AE f32c32 ships it), and the scheduler each family ships
(Sana: DPM-Solver++ on flow sigmas; a dense-time teacher here: FlowMatchEuler; Sana-Sprint: SCMScheduler).

From the command line (the repository root), for docs and smoke runs of the real-folder path (docs/operators.md):

    .venv/bin/python -m tests.sana_folders --out runs/tiny-sana [--spec sana-dpm] [--seed 0]
"""
from __future__ import annotations

import argparse
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline,
                       SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler)
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

IMAGE_SIZE = 32  # pixels; the DC-AE here is f4, so latents are 8x8 with 4 channels
ENCODER_WIDTH = 32


@dataclass(frozen=True)
class FolderSpec:
    name: str
    sprint: bool            # SanaSprintPipeline (guidance embeds, SCMScheduler) or SanaPipeline (CFG)
    timestep_scale: float   # 1.0: Sana 600M/1.6B (timesteps in [0, 1000]); 0.001: dense time (Sprint)
    scheduler: str          # "dpm" (what Sana ships), "euler" or "scm"
    dtype: torch.dtype = torch.float32
    variant: str | None = None  # saved as *.{variant}.safetensors only


SPECS = {spec.name: spec for spec in (
    FolderSpec("sana-dpm", sprint=False, timestep_scale=1.0, scheduler="dpm"),
    FolderSpec("sana-dense-euler", sprint=False, timestep_scale=0.001, scheduler="euler"),
    FolderSpec("sprint", sprint=True, timestep_scale=0.001, scheduler="scm"),
    FolderSpec("sana-dpm-bf16", sprint=False, timestep_scale=1.0, scheduler="dpm", dtype=torch.bfloat16,
               variant="bf16"),
    FolderSpec("sprint-bf16", sprint=True, timestep_scale=0.001, scheduler="scm", dtype=torch.bfloat16,
               variant="bf16"),
)}


def gemma_tokenizer() -> GemmaTokenizerFast:
    """A Gemma tokenizer (BOS first, "▁" for spaces, <pad> = 0) over single printable characters, mixed case."""
    chars = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *chars])}
    return GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True)


def gemma2_encoder(vocab_size: int) -> Gemma2Model:
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=ENCODER_WIDTH, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1,
                          bos_token_id=2)
    return Gemma2Model(config).eval()


def transformer(spec: FolderSpec) -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=ENCODER_WIDTH, mlp_ratio=2.5, sample_size=IMAGE_SIZE // 4, patch_size=1,
        qk_norm="rms_norm_across_heads" if spec.sprint else None, guidance_embeds=spec.sprint,
        timestep_scale=spec.timestep_scale).eval()


def dc_ae() -> AutoencoderDC:
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()), upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()


def scheduler(kind: str):
    if kind == "dpm":  # Sana's scheduler_config.json: DPM-Solver++ 2M on shifted flow sigmas
        return DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction",
                                           algorithm_type="dpmsolver++", solver_order=2)
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return SCMScheduler(sigma_data=0.5)


def make_folder(spec: FolderSpec, out: Path, seed: int = 0) -> Path:
    """Random weights (seeded), saved the way diffusers saves a pipeline."""
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    cls = SanaSprintPipeline if spec.sprint else SanaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=gemma2_encoder(len(tokenizer)), vae=dc_ae(),
               transformer=transformer(spec), scheduler=scheduler(spec.scheduler))
    pipe.to(spec.dtype).save_pretrained(out, safe_serialization=True, variant=spec.variant)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.sana_folders", description="write a tiny random-weight "
                                     "Sana / Sana-Sprint pipeline folder with plain diffusers calls")
    parser.add_argument("--out", required=True, help="folder to write (its files are written over)")
    parser.add_argument("--spec", choices=sorted(SPECS), default="sana-dpm",
                        help="which folder: sana-dpm is a Sana teacher as Sana ships (DPM-Solver, timestep_scale 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(f"wrote {make_folder(SPECS[args.spec], Path(args.out), args.seed)} ({args.spec})")


if __name__ == "__main__":
    main()
