"""Samplers: the teacher's flow-Euler and TrigFlow samplers with CFG, and the student's consistency sampler.

All work on unit-variance latents x0' = latent * scaling_factor (TrigFlow multiplies by sigma_d inside). Noise
comes from one generator per image, so an image depends on its seed only, not on the batch it lands in.
"""
from __future__ import annotations

import torch

from tbcm.models.trigflow import (SIGMA_DATA, T_MAX, consistency_x0, flow_sigmas, renoise, trig_time, trigflow_from_flow,
                       trigflow_step)

# Student sampling times after pi/2, per step count (Sprint Tab. 7 and diffusers' SCMScheduler defaults).
CM_INTERMEDIATE_TIMES = {1: (), 2: (1.3,), 3: (1.3, 0.9), 4: (1.3, 1.1, 0.6)}


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One standard-normal tensor per seed, drawn from its own CPU generator (kept for later draws)."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def flow_model(transformer, states, mask, guidance: torch.Tensor | None = None):
    """The transformer as a function v(x_s, s) of a flow-matching state and flow time (Sana's convention)."""
    def v(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return transformer(x_s, encoder_hidden_states=states, encoder_attention_mask=mask, timestep=s,
                           guidance=guidance, return_dict=False)[0]
    return v


def cfg_flow_model(transformer, states, mask, null_states, null_mask, scale: torch.Tensor,
                   guidance_max_sigma: float = 1.0):
    """Classifier-free guidance v = v_null + w (v_cond - v_null), both halves in one batch (Ho & Salimans eq. 6).

    `scale` has shape (B,): each prompt may have its own guidance scale. Below 1, `guidance_max_sigma` limits
    guidance to flow times s <= it (the guidance interval of Kynkaanniemi et al. 2024): above it a sample gets
    the conditional velocity alone (w = 1), and its unconditional half is not computed.
    """
    limited = guidance_max_sigma < 1

    def v(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rows = (s <= guidance_max_sigma).nonzero().squeeze(1) if limited else slice(None)
        out = transformer(torch.cat([x_s, x_s[rows]]), encoder_hidden_states=torch.cat([states, null_states[rows]]),
                          encoder_attention_mask=torch.cat([mask, null_mask[rows]]), timestep=torch.cat([s, s[rows]]),
                          return_dict=False)[0]
        cond, null = out[:len(x_s)], out[len(x_s):]
        guided = null + scale.to(out.device)[rows].view(-1, 1, 1, 1).to(out.dtype) * (cond[rows] - null)
        return guided if not limited else cond.index_copy(0, rows, guided)
    return v


def teacher_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Flow sigmas of an N-step teacher run, ending at 0 (float64)."""
    return torch.cat([flow_sigmas(steps, shift), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_flow_euler(velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the flow ODE dx/ds = v from s = 1 to 0: x <- x + (s_next - s) v (rectified flow eq. 1)."""
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + float(s_next - s) * velocity(x, torch.full((len(x),), float(s), dtype=x.dtype))
    return x


def trigflow_trajectory(velocity, noise: torch.Tensor, times: torch.Tensor, record: bool = False):
    """Roll the TrigFlow PF-ODE from t = times[0] with DDIM steps through `times` and on to 0 (sCM eq. 10).

    `times` has shape (K,) or (B, K) (one decreasing route per sample). Returns (x0', states, velocities): with
    `record`, the state x_tk and velocity dx/dt at every time (K entries each; velocities are sigma_d F).
    """
    times = times.expand(len(noise), -1) if times.ndim == 1 else times
    x = noise * SIGMA_DATA
    states, velocities = [], []
    for k in range(times.shape[1]):
        t = times[:, k]
        v = SIGMA_DATA * trigflow_from_flow(velocity, x / SIGMA_DATA, t.to(x.dtype))
        if record:
            states.append(x)
            velocities.append(v)
        t_next = times[:, k + 1] if k + 1 < times.shape[1] else torch.zeros_like(t)
        x = trigflow_step(x, v, (t - t_next).to(x.dtype))
    return x / SIGMA_DATA, states, velocities


@torch.no_grad()
def sample_trigflow(velocity, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The same schedule as `sample_flow_euler`, integrated in TrigFlow time: identical up to rounding."""
    x0, _, _ = trigflow_trajectory(velocity, noise, trig_time(sigmas[:-1]).to(noise.dtype))
    return x0


def cm_times(steps: int, intermediate: tuple[float, ...] = ()) -> list[float]:
    """pi/2, the times between (`intermediate`, or Sprint's for this step count when empty), then 0."""
    if steps not in CM_INTERMEDIATE_TIMES:
        raise ValueError(f"steps must be one of {sorted(CM_INTERMEDIATE_TIMES)}, got {steps}")
    times = [T_MAX, *(intermediate or CM_INTERMEDIATE_TIMES[steps]), 0.0]
    if len(times) != steps + 1 or not all(a > b for a, b in zip(times, times[1:])):
        raise ValueError(f"intermediate_times must hold steps - 1 = {steps - 1} decreasing times in (0, pi/2), "
                         f"got {tuple(intermediate)}")
    return times


@torch.no_grad()
def sample_consistency(velocity, noise: torch.Tensor, generators: list[torch.Generator],
                       steps: int, intermediate: tuple[float, ...] = ()) -> torch.Tensor:
    """Multistep consistency sampling: x0 = f(x_t, t), then re-noise to the next time with fresh per-image noise
    (sCM Alg. 1; diffusers SCMScheduler.step)."""
    times = cm_times(steps, intermediate)
    x = noise * SIGMA_DATA
    for t, t_next in zip(times[:-1], times[1:]):
        tt = torch.full((len(x),), t, dtype=x.dtype)
        x0 = consistency_x0(x, SIGMA_DATA * trigflow_from_flow(velocity, x / SIGMA_DATA, tt), tt)
        if t_next == 0.0:
            return x0 / SIGMA_DATA
        fresh = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
        x = renoise(x0, SIGMA_DATA * fresh, torch.full_like(tt, t_next))
    raise AssertionError("unreachable: the last time is 0")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1], (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

