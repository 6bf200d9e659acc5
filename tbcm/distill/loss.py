"""The continuous-time consistency (sCM) loss exactly as Sana-Sprint and TBCM implement it (Sana-Sprint arXiv
2503.09641, Alg. 2; sCM arXiv 2410.11081, eqs. 8 and 14 and §4.2).

For pairs (x_t, t, dx_t/dt = v) the student's tangent is computed with one forward-mode JVP under no_grad, using
the rearranged tangents that keep fp16/bf16 finite; the loss is then a regression of a second, differentiable
forward onto F^- + g with the prior weight 1/(sigma_d tan t) and a learned log-variance.

Both passes call the student module as given, which may be wrapped by accelerate (DDP or FSDP). The JVP pass
uses dual tensors (torch.autograd.forward_ad), not torch.func.jvp. As a result, a wrapper's forward hooks run as
usual, such as FSDP gathering its sharded parameters, while the tangents flow through the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbcm.models.trigflow import SIGMA_DATA, consistency_x0

from tbcm.distill.student import Student


TANGENT_NORM_C = 0.1  # c of g <- g / (||g|| + c), per sample (sCM §4.2 and App. G; Sana-Sprint and TBCM keep 0.1)


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


def as_column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def consistency_tangent(student: Student | torch.nn.Module, pairs: Pairs, r: float):
    """(F^-, g): the stop-grad student output and the normalised tangent (Sprint Alg. 2, lines 6-9).
    `student` is a Student, or one wrapped by accelerate (its forward returns (F, logvar))."""
    t = pairs.t.to(pairs.x_t.dtype)
    cos, sin = as_column(torch.cos(t), pairs.x_t), as_column(torch.sin(t), pairs.x_t)
    # Rearranged tangents: (cos t sin t dx/dt / sigma_d, cos t sin t) give J = cos t sin t dF/dt (Sprint Alg. 2).
    tangents = (cos * sin * pairs.velocity / SIGMA_DATA, torch.cos(t) * torch.sin(t))
    # fused SDPA kernels have no forward-mode AD
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fwad.dual_level():
        x_dual = fwad.make_dual(pairs.x_t / SIGMA_DATA, tangents[0])
        t_dual = fwad.make_dual(t, tangents[1])
        velocity = student(x_dual, t_dual, pairs.states, pairs.mask, pairs.guidance)[0]
        f_minus, jvp = fwad.unpack_dual(velocity)
    # g = -cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x_t + sigma_d J)  (sCM eq. 8, Sprint Alg. 2 line 8)
    g = -cos**2 * (SIGMA_DATA * f_minus - pairs.velocity) - r * (cos * sin * pairs.x_t + SIGMA_DATA * jvp)
    g_norm = g.flatten(1).norm(dim=1)
    g = g / as_column(g_norm + TANGENT_NORM_C, g)  # per-sample tangent normalisation (sCM §4.2)
    return f_minus, g


def prior_weight(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pair prior weight: "tan" is 1/(sigma_d tan t) (sCM eq. 14); "uniform" weighs every time alike."""
    if kind == "tan":
        return 1.0 / (SIGMA_DATA * torch.tan(t.float()))
    if kind == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    raise ValueError(f"prior_weight must be 'tan' or 'uniform', got {kind!r}")


def scm_loss(student: Student | torch.nn.Module, pairs: Pairs, r: float, prior: str = "tan",
             logvar_min: float | None = None):
    """Returns (loss, stats). Per element: e^{-logvar} w(t) (F - F^- - g)^2 + logvar (sCM eq. 14), with the prior
    w(t) from `prior_weight` and logvar clamped from below at `logvar_min` when given.

    `student` may be wrapped by accelerate: through DDP or FSDP the gradients are reduced across ranks."""
    f_minus, g = consistency_tangent(student, pairs, r)
    velocity, logvar = student(pairs.x_t / SIGMA_DATA, pairs.t.to(pairs.x_t.dtype), pairs.states, pairs.mask,
                               pairs.guidance)
    logvar = logvar.float() if logvar_min is None else logvar.float().clamp(min=logvar_min)
    per_pair = (velocity.float() - f_minus.float() - g.float()).square().flatten(1).mean(1)
    weight = prior_weight(pairs.t, prior) * torch.exp(-logvar)  # what the loss puts on each pair's MSE
    loss = weighted_mean(weight * per_pair + logvar, pairs.weight)
    return loss, {"mse": float(per_pair.detach().mean()), "logvar": float(logvar.detach().mean()),
                  "weight": float(weight.detach().mean())}


def one_step(student: Student | torch.nn.Module, starts: Pairs) -> torch.Tensor:
    """The student's clean estimate f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta (sCM eq. 9), with grad;
    at the rollouts' start noise (t = pi/2) it is the one-step sample."""
    velocity = student(starts.x_t / SIGMA_DATA, starts.t.to(starts.x_t.dtype), starts.states, starts.mask,
                       starts.guidance)[0]
    return consistency_x0(starts.x_t, SIGMA_DATA * velocity, starts.t)


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the samples the degenerate filter kept."""
    return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)


def endpoint_loss(student: Student | torch.nn.Module, starts: Pairs) -> torch.Tensor:
    """Mean of ||f_theta(z, pi/2) - x0'||^2 / sigma_d^2 over rollouts: the one-step sample from each rollout's start
    noise z (`starts.x_t`) regressed onto the teacher's ODE endpoint x0' of that same noise."""
    x0 = one_step(student, starts)
    return weighted_mean(((x0.float() - starts.x0.float()) / SIGMA_DATA).square().flatten(1).mean(1), starts.weight)
