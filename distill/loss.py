"""The continuous-time consistency (sCM) loss exactly as Sana-Sprint and TBCM implement it (distill-spec §4).

For pairs (x_t, t, dx_t/dt = v) the student's tangent is computed with one forward-mode JVP under no_grad, using
the rearranged tangents that keep fp16/bf16 finite; the loss is then a regression of a second, differentiable
forward onto F^- + g with the prior weight 1/(sigma_d tan t) and a learned log-variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.trigflow import SIGMA_DATA

from .student import Student


@dataclass
class Pairs:
    """A batch of training pairs: states x_t, times t, velocities dx/dt, and their prompt conditioning."""
    x_t: torch.Tensor        # (N, C, H, W), TrigFlow units (sigma_d-scaled)
    t: torch.Tensor          # (N,)
    velocity: torch.Tensor   # (N, C, H, W), teacher dx_t/dt = sigma_d F_teacher,cfg
    states: torch.Tensor     # (N, L, D)
    mask: torch.Tensor       # (N, L)
    guidance: torch.Tensor   # (N,), the CFG scale the teacher used
    weight: torch.Tensor     # (N,), 1 normally, 0 for pairs dropped by the degenerate-sample filter
    x0: torch.Tensor         # (N, C, H, W), the clean latent behind each pair (rollout endpoint / encoded image)


def tangent_r(step: int, warmup: int, calm_start: int, calm_steps: int, final_r: float) -> float:
    """Weight r of the unstable tangent term: linear warm-up to 1 (sCM §4.2), then TBCM's calm-down to final_r."""
    r = min(1.0, step / max(1, warmup))
    if step > calm_start:
        r = r + (final_r - r) * min(1.0, (step - calm_start) / max(1, calm_steps))
    return r


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def consistency_tangent(student: Student, pairs: Pairs, r: float, norm_c: float):
    """(F^-, g): the stop-grad student output and the normalised tangent (Sprint Alg. 2, lines 6-9)."""
    t = pairs.t.to(pairs.x_t.dtype)
    cos, sin = _column(torch.cos(t), pairs.x_t), _column(torch.sin(t), pairs.x_t)

    def f(x_over_sigma: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return student.velocity(x_over_sigma, time, pairs.states, pairs.mask, pairs.guidance)

    # Rearranged tangents: (cos t sin t dx/dt / sigma_d, cos t sin t) give J = cos t sin t dF/dt (Sprint Alg. 2).
    tangents = (cos * sin * pairs.velocity / SIGMA_DATA, torch.cos(t) * torch.sin(t))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # fused SDPA kernels have no forward-mode AD
        f_minus, jvp = torch.func.jvp(f, (pairs.x_t / SIGMA_DATA, t), tangents)
    # g = -cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x_t + sigma_d J)  (sCM eq. 8, Sprint Alg. 2 line 8)
    g = -cos**2 * (SIGMA_DATA * f_minus - pairs.velocity) - r * (cos * sin * pairs.x_t + SIGMA_DATA * jvp)
    g_norm = g.flatten(1).norm(dim=1)
    g = g / _column(g_norm + norm_c, g)  # per-sample tangent normalisation (sCM §4.2)
    return f_minus, g


def scm_loss(student: Student, pairs: Pairs, r: float, norm_c: float = 0.1, wrapped=None):
    """Returns (loss, stats). Per element: e^{-logvar} / (sigma_d tan t) (F - F^- - g)^2 + logvar (sCM eq. 14).

    `wrapped` is the same student as prepared by accelerate (DDP): the differentiable forward goes through it so
    gradients are averaged across ranks; the JVP pass uses the plain module."""
    f_minus, g = consistency_tangent(student, pairs, r, norm_c)
    velocity, logvar = (wrapped or student)(pairs.x_t / SIGMA_DATA, pairs.t.to(pairs.x_t.dtype), pairs.states,
                                            pairs.mask, pairs.guidance)
    prior = 1.0 / (SIGMA_DATA * torch.tan(pairs.t.float()))
    per_pair = (velocity.float() - f_minus.float() - g.float()).square().flatten(1).mean(1)
    weighted = prior * torch.exp(-logvar.float()) * per_pair + logvar.float()
    loss = (weighted * pairs.weight).sum() / pairs.weight.sum().clamp(min=1.0)
    return loss, {"mse": float(per_pair.detach().mean()), "logvar": float(logvar.detach().mean())}
