"""Distribution matching on the one-step samples, as a regulariser of the sCM loss (`--dmd-weight`).

rCM (arXiv 2510.08431) finds that sCM alone loses fine detail and adds DMD's reverse-divergence term (DMD2,
arXiv 2405.14867): here a small one-step student rounds the corners of squares until the evaluator reads circles.
The student's one-step samples x̂0 = f_theta(z, pi/2) are noised at a time s; there the teacher's CFG denoiser
D_real pulls them toward the teacher's distribution, and a fake denoiser D_fake, trained online on the student's
own samples, pushes them away from where they already are. Still no images: the fake denoiser learns from the
student's samples only. It starts as a copy of the teacher without CFG, so at step 0 the term already pulls the
samples from the conditional teacher's denoising toward the CFG teacher's.
"""
from __future__ import annotations

import copy

import torch
from diffusers import SanaTransformer2DModel

from tbcm.models.sampling import cfg_flow_model, flow_model
from tbcm.models.trigflow import SIGMA_DATA, T_MAX, consistency_x0, flow_shift, renoise, trig_time, trigflow_from_flow

from tbcm.distill.loss import Pairs, as_column, weighted_mean


def fake_denoiser(teacher: SanaTransformer2DModel) -> SanaTransformer2DModel:
    """D_fake's network: a trainable copy of the teacher (rCM and DMD2 initialise it so)."""
    return copy.deepcopy(teacher).requires_grad_(True).train()


def dmd_times(n: int, shift: float) -> torch.Tensor:
    """Noise times of the term: flow time u ~ U(0, 1) shifted toward noise (SD3 eq. 23), as TrigFlow time."""
    return trig_time(flow_shift(torch.rand(n), shift)).clamp(min=1e-3, max=T_MAX - 1e-4)


def denoiser_velocity(transformer, x_t: torch.Tensor, t: torch.Tensor, batch: Pairs, null=None,
                      guidance_max_sigma: float = 1.0) -> torch.Tensor:
    """F(x_t / sigma_d, t) of a flow transformer, conditioned on the batch's captions; with null = (states, mask)
    of the empty caption, CFG at the batch's scales (within `guidance_max_sigma`)."""
    velocity = (cfg_flow_model(transformer, batch.states, batch.mask, *null, batch.guidance, guidance_max_sigma)
                if null else flow_model(transformer, batch.states, batch.mask))
    return trigflow_from_flow(velocity, x_t / SIGMA_DATA, t.to(x_t.dtype))


def dmd_loss(teacher: SanaTransformer2DModel, fake: SanaTransformer2DModel, x0_hat: torch.Tensor, starts: Pairs,
             null, shift: float, guidance_max_sigma: float = 1.0) -> torch.Tensor:
    """A loss whose gradient on x̂0 is (D_fake - D_real)(x_s) / mean|x̂0 - D_real(x_s)| per sample, divided by the
    element count (DMD eq. 7 with DMD2's normalisation); x_s = cos s x̂0 + sin s z (sCM eq. 3)."""
    s = dmd_times(len(x0_hat), shift).to(x0_hat.device)
    with torch.no_grad():
        x_s = renoise(x0_hat.detach(), SIGMA_DATA * torch.randn_like(x0_hat), s)
        real = consistency_x0(x_s, SIGMA_DATA * denoiser_velocity(teacher, x_s, s, starts, null, guidance_max_sigma), s)
        fake_x0 = consistency_x0(x_s, SIGMA_DATA * denoiser_velocity(fake, x_s, s, starts), s)
        scale = (x0_hat.detach() - real).abs().flatten(1).mean(1).clamp(min=1e-5)
        gradient = (fake_x0 - real) / as_column(scale, x0_hat)
    per_sample = 0.5 * (x0_hat.float() - (x0_hat - gradient).detach().float()).square().flatten(1).mean(1)
    return weighted_mean(per_sample, starts.weight)


def fake_denoiser_loss(fake, x0_hat: torch.Tensor, starts: Pairs, shift: float) -> torch.Tensor:
    """D_fake's denoising loss on the (detached) one-step samples: ||F_fake(x_s, s) - F*||^2 with the target
    F* = (cos s x_s - x̂0) / (sigma_d sin s) (sCM eq. 9 solved for F), at the term's noise times."""
    s = dmd_times(len(x0_hat), shift).to(x0_hat.device)
    x_s = renoise(x0_hat, SIGMA_DATA * torch.randn_like(x0_hat), s)
    column = as_column(s, x0_hat)
    target = (torch.cos(column) * x_s - x0_hat) / (SIGMA_DATA * torch.sin(column))
    predicted = denoiser_velocity(fake, x_s, s, starts)
    return weighted_mean((predicted.float() - target.float()).square().flatten(1).mean(1), starts.weight)
