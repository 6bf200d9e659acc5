"""Where training pairs come from: the teacher's own trajectories (TBCM) or noised real images (data sCM).

TBCM (arXiv 2511.20410): roll the frozen teacher out with CFG from noise at pi/2 through K times drawn around a
reference route, keep the K-1 non-noise states with their times, and reuse the velocity computed during the
rollout as dx/dt. No images, no VAE encoder. Data sCM (Sana-Sprint, arXiv 2503.09641, Alg. 2): VAE-encode
captioned images, noise them at a log-normal time, and ask the teacher for its CFG velocity there. Between the
two, still image-free: a rollout's endpoint noised the way data sCM noises an image (`--renoised-per-trajectory`).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from tbcm.models.pipeline import Pipeline
from tbcm.models.sampling import cfg_flow_model, trigflow_trajectory
from tbcm.models.trigflow import SIGMA_DATA, T_MAX, reference_route, renoise, trigflow_from_flow

from tbcm.distill.config import DistillConfig
from tbcm.distill.loss import Pairs


def lognormal_times(n: int, p_mean: float, p_std: float) -> torch.Tensor:
    """sCM's proposal: tan t = e^tau / sigma_d with tau ~ N(p_mean, p_std^2) (sCM App. G.2)."""
    return torch.atan(torch.exp(torch.randn(n) * p_std + p_mean) / SIGMA_DATA)


def trajectory_times(n: int, route: torch.Tensor, strategy: str, p_mean: float, p_std: float) -> torch.Tensor:
    """(n, K) decreasing times starting at pi/2, one row per prompt.

    route: t_k ~ U(route[k], route[k-1]) for k >= 1, TBCM's stratified jitter of its route (arXiv 2511.20410);
    lognormal / uniform: K-1 sorted draws from the sCM proposal / U(0, pi/2)."""
    k = len(route)
    if strategy == "route":
        lo, hi = route[1:].float(), route[:-1].float()
        inner = lo + (hi - lo) * torch.rand(n, k - 1)
    elif strategy == "lognormal":
        inner = lognormal_times(n * (k - 1), p_mean, p_std).view(n, k - 1).sort(dim=1, descending=True).values
    elif strategy == "uniform":
        inner = (torch.rand(n, k - 1) * T_MAX).sort(dim=1, descending=True).values
    else:
        raise ValueError(f"time_sampling must be 'route', 'lognormal' or 'uniform', got {strategy!r}")
    return torch.cat([torch.full((n, 1), T_MAX), inner.clamp(min=1e-3, max=T_MAX - 1e-4)], dim=1)


def degenerate_weight(x0: torch.Tensor, threshold: float) -> torch.Tensor:
    """TBCM's black-image filter generalised: an endpoint whose spatial std (mean over channels) s is below
    `threshold` is near-constant; its pairs are dropped with probability 1 - s / threshold. Returns 0/1 weights."""
    spread = (x0 / SIGMA_DATA).flatten(2).std(dim=2).mean(dim=1)
    keep_probability = (spread / threshold).clamp(max=1.0)
    return (torch.rand(len(x0)) < keep_probability).float()


@dataclass
class Rollout:
    """Teacher trajectories of B prompts: states, velocities and times at K points, and the endpoints."""
    states: torch.Tensor       # (B, K, C, H, W)
    velocities: torch.Tensor   # (B, K, C, H, W)
    times: torch.Tensor        # (B, K)
    endpoints: torch.Tensor    # (B, C, H, W), x0 in TrigFlow units
    guidance: torch.Tensor     # (B,)


@torch.no_grad()
def rollout(teacher: Pipeline, states, mask, null_states, null_mask, config: DistillConfig) -> Rollout:
    """K-step CFG TrigFlow rollout from pi/2 (32 teacher forwards for K = 16), recording every state."""
    n = len(states)
    guidance = torch.tensor([random.choice(config.cfg_scales) for _ in range(n)], dtype=torch.float32)
    route = reference_route(config.route_points, teacher.flow_shift)
    times = trajectory_times(n, route, config.time_sampling, config.p_mean, config.p_std)
    velocity = cfg_flow_model(teacher.transformer, states, mask, null_states, null_mask, guidance,
                              config.guidance_max_sigma)
    side = teacher.transformer.config.sample_size
    noise = torch.randn(n, teacher.latent_channels, side, side)
    x0, xs, vs = trigflow_trajectory(velocity, noise, times, record=True)
    return Rollout(torch.stack(xs, 1), torch.stack(vs, 1), times, x0 * SIGMA_DATA, guidance)


def pairs_from_rollout(roll: Rollout, states, mask, weight, config: DistillConfig) -> Pairs:
    """Keep `points_per_trajectory` of the K-1 non-noise states per prompt (a random subset each time), each with
    its prompt's degenerate-filter weight."""
    n, k = roll.times.shape
    p = config.points_per_trajectory
    chosen = torch.stack([torch.randperm(k - 1)[:p] + 1 for _ in range(n)])  # (n, p), skipping k = 0 (noise)
    rows = torch.arange(n).unsqueeze(1).expand(-1, p)
    return Pairs(x_t=roll.states[rows, chosen].flatten(0, 1), t=roll.times[rows, chosen].flatten(),
                 velocity=roll.velocities[rows, chosen].flatten(0, 1),
                 states=states.repeat_interleave(p, 0), mask=mask.repeat_interleave(p, 0),
                 guidance=roll.guidance.repeat_interleave(p), weight=weight.repeat_interleave(p),
                 x0=roll.endpoints.repeat_interleave(p, 0))


def start_pairs(roll: Rollout, states, mask, weight) -> Pairs:
    """Each rollout's first state, its start noise at t = pi/2, paired with its own endpoint (`--endpoint-weight`)."""
    return Pairs(roll.states[:, 0], roll.times[:, 0], roll.velocities[:, 0], states, mask, roll.guidance, weight,
                 roll.endpoints)


def noise_starts(pairs: Pairs, per_prompt: int) -> Pairs:
    """For data pairs, which have no rollout: fresh noise z ~ N(0, sigma_d^2) at pi/2 for the first pair of each
    prompt (its caption and CFG scale), drawn from torch's generator on the pairs' device, which checkpoints carry.
    DMD's one-step samples start there; z has no known velocity or endpoint, so those are NaN (nothing reads them)."""
    first = slice(None, None, per_prompt)
    x_t = SIGMA_DATA * torch.randn_like(pairs.x_t[first])
    unknown = torch.full_like(x_t, float("nan"))
    return Pairs(x_t, torch.full_like(pairs.t[first], T_MAX), unknown, pairs.states[first], pairs.mask[first],
                 pairs.guidance[first], torch.ones_like(pairs.weight[first]), unknown)


@torch.no_grad()
def noised_pairs(teacher: Pipeline, x0, states, mask, null_states, null_mask, guidance, weight,
                 config: DistillConfig) -> Pairs:
    """sCM's pairs: x_t = cos t x0 + sin t z at a log-normal t, and the teacher's CFG velocity at (x_t, t)
    (one teacher call with CFG per pair)."""
    t = lognormal_times(len(x0), config.p_mean, config.p_std).clamp(min=1e-3, max=T_MAX - 1e-4)
    x_t = renoise(x0, SIGMA_DATA * torch.randn_like(x0), t)
    flow = cfg_flow_model(teacher.transformer, states, mask, null_states, null_mask, guidance,
                          config.guidance_max_sigma)
    velocity = SIGMA_DATA * trigflow_from_flow(flow, x_t / SIGMA_DATA, t)
    return Pairs(x_t, t, velocity, states, mask, guidance, weight, x0)


@torch.no_grad()
def data_pairs(teacher: Pipeline, images: torch.Tensor, states, mask, null_states, null_mask,
               config: DistillConfig) -> Pairs:
    """Sana-Sprint-style pairs: x0 from the VAE encoder of images (N, 3, H, W) in [-1, 1], with their captions'
    states, noised at a log-normal t (`noised_pairs`)."""
    x0 = teacher.latents_to_trig(teacher.vae.encode(images.to(teacher.vae.dtype)).latent.float())
    guidance = torch.tensor([random.choice(config.cfg_scales) for _ in range(len(images))], dtype=torch.float32)
    return noised_pairs(teacher, x0, states, mask, null_states, null_mask, guidance, torch.ones(len(images)), config)


@torch.no_grad()
def renoised_endpoint_pairs(teacher: Pipeline, roll: Rollout, weight, states, mask, null_states, null_mask,
                            config: DistillConfig) -> Pairs:
    """Still image-free: each rollout endpoint stands in for an image and is noised `renoised_per_trajectory`
    times at log-normal times with fresh noise, states off the trajectory (what multistep sampling visits)."""
    per_prompt = (roll.endpoints, states, mask, null_states, null_mask, roll.guidance, weight)
    return noised_pairs(teacher, *(x.repeat_interleave(config.renoised_per_trajectory, 0) for x in per_prompt),
                        config)


def concat_pairs(*parts: Pairs) -> Pairs:
    """One batch of the parts' pairs, in order."""
    return Pairs(*(torch.cat([getattr(part, f.name) for part in parts]) for f in dataclasses.fields(Pairs)))

