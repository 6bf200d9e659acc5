"""Training the embedded world's teacher: a small SanaTransformer2DModel, flow matching in the VAE's latent space.

Rectified flow (x_s = (1 - s) x0 + s eps, target v = eps - x0, s ~ logit-normal) on unit-variance latents, with
caption dropout to the empty prompt (for CFG), a dense timestep s in [0, 1] and QK-norm, as Sana-Sprint teachers
use, and EMA weights. The training set (latents and caption states) is precomputed once per seed and cached.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from tqdm import tqdm

from tbcm.world import world
from tbcm.models.sampling import DENSE_TIMESTEP_SCALE, flow_model
from tbcm.models.text import TextEncoder
from tbcm.models.training import TrainConfig, atomic_write_safetensors, read_safetensors, train_loop

DATASET = "dataset.safetensors"


@dataclass
class TeacherConfig(TrainConfig):
    # the shared training knobs (tbcm.models.training.TrainConfig) at this trainer's defaults
    steps: int = 2000
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    batch_size: int = 64              # latents per step
    dataset_size: int = 6000          # precomputed (latent, caption) pairs from the training split
    image_size: int = 64              # pixels per side
    max_sequence_length: int = 32     # encoder tokens per caption (padding included)
    caption_dropout: float = 0.1      # share of captions replaced by "" (the CFG null prompt)
    logit_mean: float = 0.0           # s = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3 eq. 19)
    logit_std: float = 1.0            #   standard deviation of that normal
    num_layers: int = 6               # SanaTransformerBlocks
    heads: int = 4                    # self- and cross-attention heads
    head_dim: int = 32                # channels per head (Sana's linear attention uses 32)
    mlp_ratio: float = 2.5            # GLUMBConv expansion
    sample_shift: float = 2.5         # flow shift of the shipped sampler's schedule (scheduler config)
    init_from: str = ""               # transformer folder to continue from (model and EMA); "" = random init


# TeacherConfig's architecture knobs and the SanaTransformer2DModel config keys they set
ARCHITECTURE = {"num_layers": "num_layers", "heads": "num_attention_heads", "head_dim": "attention_head_dim",
                "mlp_ratio": "mlp_ratio"}


def check_init_architecture(config: TeacherConfig) -> None:
    """A continued run's config must describe the model it continues, so its run record says what was trained."""
    init = SanaTransformer2DModel.load_config(config.init_from)
    diffs = [f"--{knob.replace('_', '-')} {getattr(config, knob)} (the init has {init[key]})"
             for knob, key in ARCHITECTURE.items() if init[key] != getattr(config, knob)]
    if diffs:
        raise ValueError(f"--init-from {config.init_from}: this run's architecture differs from the model it "
                         f"continues: {', '.join(diffs)}; pass the init's values")


def build_teacher(config: TeacherConfig, latent_channels: int, latent_size: int, caption_channels: int):
    width = config.heads * config.head_dim
    return SanaTransformer2DModel(
        in_channels=latent_channels, out_channels=latent_channels, num_attention_heads=config.heads,
        attention_head_dim=config.head_dim, num_layers=config.num_layers, num_cross_attention_heads=config.heads,
        cross_attention_head_dim=config.head_dim, cross_attention_dim=width, caption_channels=caption_channels,
        mlp_ratio=config.mlp_ratio, sample_size=latent_size, patch_size=1, interpolation_scale=1.0,
        qk_norm="rms_norm_across_heads", guidance_embeds=False,
        timestep_scale=DENSE_TIMESTEP_SCALE)  # dense time: SanaPipeline feeds it 1000 s x 0.001 = s (Sprint Sec. 3.2)


@torch.no_grad()
def build_dataset(config: TeacherConfig, vae: AutoencoderDC, text: TextEncoder, out: Path) -> dict:
    """Training-split scenes -> unit-variance latents, caption states and masks (cached in out/dataset)."""
    path = Path(out) / DATASET
    if path.exists():
        tensors, meta = read_safetensors(path)
        if meta.get("seed") == config.seed and meta.get("size") == config.dataset_size:
            return tensors
    scenes = [world.sample_scene(i, "train") for i in range(config.seed * 10**7,
                                                            config.seed * 10**7 + config.dataset_size)]
    latents, states, masks = [], [], []
    chunk = 128
    for i in tqdm(range(0, len(scenes), chunk), desc="dataset (render, VAE, text)", unit="chunk"):
        part = scenes[i:i + chunk]
        images = world.render_tensor(part, config.image_size)
        latents.append(vae.encode(images).latent * vae.config.scaling_factor)
        s, m = text.encode([s.caption for s in part])
        states.append(s.half())
        masks.append(m)
    tensors = {"latents": torch.cat(latents), "states": torch.cat(states), "masks": torch.cat(masks)}
    atomic_write_safetensors(tensors, path, {"seed": config.seed, "size": config.dataset_size})
    return tensors


def flow_matching_loss(transformer: SanaTransformer2DModel, x0: torch.Tensor, states: torch.Tensor,
                       mask: torch.Tensor, config: TeacherConfig) -> torch.Tensor:
    """Rectified-flow loss: || v(x_s, s) - (eps - x0) ||^2 with x_s = (1 - s) x0 + s eps (SD3 eq. 1-3)."""
    s = torch.sigmoid(torch.randn(len(x0)) * config.logit_std + config.logit_mean)
    eps = torch.randn_like(x0)
    sc = s.view(-1, 1, 1, 1)
    x_s = (1 - sc) * x0 + sc * eps
    pred = flow_model(transformer, states, mask)(x_s, s)  # the timestep SanaPipeline feeds at flow time s
    return (pred - (eps - x0)).square().mean()


def train_teacher(config: TeacherConfig, vae: AutoencoderDC, text: TextEncoder, out: Path,
                  resume: bool = False) -> SanaTransformer2DModel:
    if config.init_from:
        check_init_architecture(config)
    data = build_dataset(config, vae, text, out)
    latents, states, masks = data["latents"], data["states"], data["masks"]
    null_states, null_mask = text.null(1)
    torch.manual_seed(config.seed)
    if config.init_from:
        build = lambda: SanaTransformer2DModel.from_pretrained(config.init_from, use_safetensors=True)  # noqa: E731
    else:
        build = lambda: build_teacher(config, latents.shape[1], latents.shape[-1], states.shape[-1])  # noqa: E731
    model, ema = build(), build()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)

    def loss_fn(step: int):
        index = torch.tensor([random.randrange(len(latents)) for _ in range(config.batch_size)])
        drop = (torch.rand(config.batch_size) < config.caption_dropout).view(-1, 1)
        batch_states = torch.where(drop.unsqueeze(-1), null_states, states[index].float())
        batch_mask = torch.where(drop, null_mask, masks[index])
        return flow_matching_loss(model, latents[index], batch_states, batch_mask, config), {}

    model.train()
    ema = train_loop(out, config, model, loss_fn, ema=ema, resume=resume, desc="teacher").eval()
    ema.save_pretrained(Path(out) / "transformer", safe_serialization=True)
    return ema
