"""Training the embedded world's VAE (a small AutoencoderDC) and its evaluator on procedural images.

Both draw fresh scenes every step from Python's global generator (seeded, and carried by checkpoints), so a
run is a pure function of its config and resumes exactly.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderDC

from tbcm.world import world
from tbcm.world.evaluator import Evaluator, attribute_accuracy, measure, targets_of
from tbcm.models.training import TrainConfig, train_loop


def scene_batch(batch_size: int, image_size: int, two_shapes_fraction: float = 0.0) -> list[world.Scene]:
    """Random scenes from both splits (the VAE and evaluator must handle every combination)."""
    return [world.sample_scene(random.randrange(2**31), random.choice(("train", "heldout")),
                               2 if random.random() < two_shapes_fraction else 1) for _ in range(batch_size)]


@dataclass
class VAEConfig(TrainConfig):
    # the shared training knobs (tbcm.models.training.TrainConfig) at this trainer's defaults
    steps: int = 1500
    lr: float = 1e-3
    ema_decay: float = 0.998
    batch_size: int = 16                            # images per step
    image_size: int = 64                            # pixels per side
    latent_channels: int = 16                       # channels of the f8 latent
    block_out_channels: tuple = (16, 32, 64, 128)   # one DC-AE stage per entry: 2**(n-1) = f8
    layers_per_block: tuple = (0, 1, 1, 1)          # ResBlocks per stage (encoder and decoder)
    two_shapes_fraction: float = 0.25               # share of two-shape scenes in training


def build_vae(config: VAEConfig) -> AutoencoderDC:
    n = len(config.block_out_channels)
    return AutoencoderDC(in_channels=3, latent_channels=config.latent_channels, attention_head_dim=16,
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=tuple(config.block_out_channels),
                         decoder_block_out_channels=tuple(config.block_out_channels),
                         encoder_layers_per_block=tuple(config.layers_per_block),
                         decoder_layers_per_block=tuple(config.layers_per_block),
                         encoder_qkv_multiscales=((),) * n, decoder_qkv_multiscales=((),) * n,
                         upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (a.clamp(-1, 1) - b).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def vae_report(vae: AutoencoderDC, n: int, image_size: int, seed: int) -> dict:
    """Reconstruction PSNR on `n` fresh procedural images and the latent std that sets scaling_factor."""
    state = random.getstate()
    random.seed(f"vae-report:{seed}")
    images = world.render_tensor(scene_batch(n, image_size, 0.25), image_size)
    random.setstate(state)
    latents = torch.cat([vae.encode(images[i:i + 64]).latent for i in range(0, n, 64)])
    recon = torch.cat([vae.decode(latents[i:i + 64]).sample for i in range(0, n, 64)])
    values = psnr(recon, images)
    return {"psnr_db_mean": float(values.mean()), "psnr_db_min": float(values.min()), "n": n,
            "latent_std": float(latents.std())}


def train_vae(config: VAEConfig, out: Path, resume: bool = False) -> AutoencoderDC:
    torch.manual_seed(config.seed)
    vae, ema = build_vae(config), build_vae(config)
    ema.load_state_dict(vae.state_dict())
    ema.requires_grad_(False)

    def loss_fn(step: int):
        images = world.render_tensor(scene_batch(config.batch_size, config.image_size, config.two_shapes_fraction),
                           config.image_size)
        recon = vae.decode(vae.encode(images).latent).sample
        loss = (recon - images).square().mean()
        return loss, {"psnr": float(10 * torch.log10(4.0 / loss.detach()))}

    ema = train_loop(out, config, vae, loss_fn, ema=ema, resume=resume, desc="vae").eval()
    report = vae_report(ema, 512, config.image_size, config.seed)
    ema.register_to_config(scaling_factor=1.0 / report["latent_std"])  # unit-variance latents for the teacher
    ema.save_pretrained(Path(out) / "vae", safe_serialization=True)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))
    print(f"VAE: PSNR {report['psnr_db_mean']:.2f} dB (min {report['psnr_db_min']:.2f}) on {report['n']} images; "
          f"scaling_factor {1.0 / report['latent_std']:.4f}")
    return ema


@dataclass
class EvaluatorConfig(TrainConfig):
    # the shared training knobs (tbcm.models.training.TrainConfig) at this trainer's defaults
    steps: int = 1200
    lr: float = 2e-3
    warmup_steps: int = 50
    checkpoint_every: int = 300
    batch_size: int = 64          # images per step
    image_size: int = 64          # pixels per side
    width: int = 32               # channels of the first conv
    features: int = 128           # penultimate width: the FD feature space
    max_noise: float = 0.1        # images get N(0, s^2) noise, s ~ U(0, max_noise): robust to generator noise


def train_evaluator(config: EvaluatorConfig, out: Path, resume: bool = False) -> Evaluator:
    torch.manual_seed(config.seed)
    model, ema = (Evaluator(config.width, config.features, config.image_size) for _ in range(2))
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)

    def loss_fn(step: int):
        scenes = scene_batch(config.batch_size, config.image_size)
        images = world.render_tensor(scenes, config.image_size)
        images = images + torch.randn_like(images) * torch.rand(len(images), 1, 1, 1) * config.max_noise
        _, logits = model(images)
        targets = targets_of(scenes)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], targets[k]) for k in logits)
        return loss, {"acc": attribute_accuracy(logits, targets)[0]}

    ema = train_loop(out, config, model, loss_fn, ema=ema, resume=resume, desc="evaluator").eval()
    state = random.getstate()
    random.seed(f"evaluator-report:{config.seed}")
    scenes = scene_batch(1024, config.image_size)
    random.setstate(state)
    _, logits = measure(ema, world.render_tensor(scenes, config.image_size))
    every, per = attribute_accuracy(logits, targets_of(scenes))
    report = {"accuracy": every, "accuracy_per_attribute": per, "n": len(scenes)}
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))
    ema.save(Path(out) / "evaluator")
    print(f"evaluator: all-attributes accuracy {every:.4f} on {len(scenes)} real images; per attribute {per}")
    return ema
