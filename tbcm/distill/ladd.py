"""Sana-Sprint's optional adversarial branch (LADD, Sana-Sprint arXiv 2503.09641 §3.3), with trajectory endpoints
as "real" under TBCM.

The discriminator is the frozen teacher in TrigFlow form with small trainable heads on a few of its block outputs,
each scoring every token. Fakes are the student's one-step estimates x̂0 = f_theta(x_t, t), with t pushed to pi/2
half the time; reals are clean latents (the teacher's rollout endpoints under --pairs trajectory, our extension:
Sana-Sprint's real side needs images; encoded images under --pairs data). Both are re-noised at a log-normal time
s before scoring, and the two sides play the hinge game. The teacher's weights never change, but the generator
loss backpropagates through its activations into x̂0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from tbcm.models.sampling import flow_model
from tbcm.models.trigflow import SIGMA_DATA, T_MAX, consistency_x0, renoise, trigflow_from_flow

from tbcm.distill.loss import Pairs
from tbcm.distill.pairs import lognormal_times

MAX_TIME_PROB = 0.5                   # the generator's input t is set to pi/2 with this probability (Sprint Tab. 6)
NOISE_P_MEAN, NOISE_P_STD = -0.6, 1.0  # the discriminator's re-noising time proposal (Sprint Tab. 8, the best)


def default_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """`count` evenly spaced block indices from the first to the last (Sana-Sprint hooks [2, 8, 14, 19] of 28)."""
    count = min(count, depth)
    return tuple(sorted({round(i * (depth - 1) / max(1, count - 1)) for i in range(count)}))


def _conv(channels_in: int, channels_out: int, kernel: int) -> nn.Module:
    """A spectral-norm 1-D convolution over the token axis (Miyato et al. 2018, as in StyleGAN-T's heads)."""
    return spectral_norm(nn.Conv1d(channels_in, channels_out, kernel, padding=kernel // 2))


def _block(channels: int, kernel: int) -> nn.Sequential:
    """Conv, norm, LeakyReLU 0.2. GroupNorm uses per-sample statistics, so no running buffers and no dependence
    on how the batch is split across ranks (Sana-Sprint's heads use batch norm, App. F.2)."""
    return nn.Sequential(_conv(channels, channels, kernel), nn.GroupNorm(math.gcd(channels, 32), channels),
                         nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.inner(x)) / math.sqrt(2)  # variance-preserving residual (StyleGAN-T's discriminator)


class Head(nn.Module):
    """(B, N, C) token features -> (B, N) logits: a 1-wide block, a residual 9-wide block, a 1-channel conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1), _Residual(_block(channels, 9)))
        self.logits = _conv(channels, 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.main(tokens.transpose(1, 2).float())).squeeze(1)


def teacher_features(teacher, blocks: tuple[int, ...], x_s: torch.Tensor, s: torch.Tensor, states, mask):
    """Outputs (B, N, C) of the chosen blocks of the conditional teacher at the TrigFlow state x_s, time s (Sprint
    Alg. 1 conversion). The hooks live only for this call, so the rollouts never pay for them."""
    found: dict[int, torch.Tensor] = {}
    hooks = [teacher.transformer_blocks[b].register_forward_hook(lambda _m, _i, out, b=b: found.__setitem__(b, out))
             for b in blocks]
    try:
        trigflow_from_flow(flow_model(teacher, states, mask), x_s / SIGMA_DATA, s.to(x_s.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return [found[b] for b in blocks]


class Discriminator(nn.Module):
    """Trainable heads over frozen-teacher block features. The teacher is passed to each call, never owned, so
    this module's parameters and state dict are the heads alone."""

    def __init__(self, teacher, blocks: tuple[int, ...] = ()):
        super().__init__()
        depth = len(teacher.transformer_blocks)
        self.blocks = tuple(int(b) for b in blocks) or default_blocks(depth)
        if not all(0 <= b < depth for b in self.blocks):
            raise ValueError(f"--ladd-blocks {self.blocks}: the teacher has blocks 0..{depth - 1}")
        width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        self.heads = nn.ModuleList(Head(width) for _ in self.blocks)

    def forward(self, teacher, x_s: torch.Tensor, s: torch.Tensor, states, mask) -> torch.Tensor:
        """Per-token logits, concatenated over heads: (B, len(blocks) * N)."""
        features = teacher_features(teacher, self.blocks, x_s, s, states, mask)
        return torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D: 0.5 (E relu(1 - D(real)) + E relu(1 + D(fake))) (hinge GAN, Lim & Ye 2017; Sana-Sprint's 0.5)."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G: -E D(fake) (Lim & Ye 2017; Sprint §3.3)."""
    return -fake_logits.mean()


def one_per_prompt(pairs: Pairs, points: int, prompts: int) -> Pairs:
    """Every `points`-th of the first prompts x points pairs (the trajectory's; re-noised ones follow): one random
    state per prompt, so the branch costs a batch of prompts, not pairs."""
    keep = torch.arange(0, prompts * points, points)
    return Pairs(*(field[keep] for field in vars(pairs).values()))


def max_time(x_t: torch.Tensor, t: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p per sample, replace (x_t, t) by pure noise z ~ N(0, sigma_d^2) at t = pi/2 ("max-time
    weighting", Sprint §3.3, Tab. 6). Drawn on the CPU generator, which checkpoints carry."""
    at_max = (torch.rand(len(t)) < probability).to(t.device)
    noise = (SIGMA_DATA * torch.randn(x_t.shape)).to(x_t)
    return torch.where(at_max.view(-1, 1, 1, 1), noise, x_t), torch.where(at_max, torch.full_like(t, T_MAX), t)


def noise_level(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) for re-noising: tan s = e^tau / sigma_d, tau ~ N(NOISE_P_MEAN, NOISE_P_STD^2), z ~ N(0, sigma_d^2);
    drawn on the CPU generator, which checkpoints carry."""
    s = lognormal_times(len(like), NOISE_P_MEAN, NOISE_P_STD).clamp(min=1e-3, max=T_MAX - 1e-4).to(like)
    return s, (SIGMA_DATA * torch.randn(like.shape)).to(like)


@contextmanager
def frozen(module: nn.Module):
    """No parameter of `module` enters graphs built inside (its gradients stay None)."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


def generator_loss(discriminator: Discriminator, teacher, student, batch: Pairs):
    """(L_G, x̂0 detached): x̂0 = f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta (sCM eq. 9) at the max-time
    weighted inputs, re-noised and scored by the frozen teacher + frozen heads; gradients reach only the student."""
    x_t, t = max_time(batch.x_t, batch.t.to(batch.x_t.dtype), MAX_TIME_PROB)
    velocity, logvar = student(x_t / SIGMA_DATA, t, batch.states, batch.mask, batch.guidance)
    x0_hat = consistency_x0(x_t, SIGMA_DATA * velocity, t)
    s, z = noise_level(x0_hat)
    with frozen(discriminator):  # fake_s = cos s x̂0 + sin s z (Sprint §3.3)
        loss = hinge_g_loss(discriminator(teacher, renoise(x0_hat, z, s), s, batch.states, batch.mask))
    return loss + 0.0 * logvar.sum(), x0_hat.detach()  # 0 * logvar: every student parameter in the graph (DDP)


def discriminator_loss(discriminator, teacher, real: torch.Tensor, fake: torch.Tensor, states, mask):
    """L_D on real and fake re-noised at the same s and z, scored in one teacher call (inputs carry no grad,
    so the teacher builds no graph and only the heads learn)."""
    s, z = noise_level(real)
    both = renoise(torch.cat([real, fake]).detach(), torch.cat([z, z]), torch.cat([s, s]))  # real_s, fake_s
    logits = discriminator(teacher, both, torch.cat([s, s]), torch.cat([states, states]), torch.cat([mask, mask]))
    return hinge_d_loss(*logits.chunk(2))
