"""TrigFlow time, the training-free flow-matching -> TrigFlow conversion, and the TrigFlow ODE step.

Conventions (TrigFlow, sCM: Lu & Song, arXiv 2410.11081, Sec. 2; Sana-Sprint, arXiv 2503.09641,
Sec. 3.1 and Prop. 3.1): sigma_d = 0.5; x_t = cos(t) x0 + sin(t) z with x0 = latent *
scaling_factor * sigma_d and z ~ N(0, sigma_d^2); the network sees x_t / sigma_d and dx_t/dt = sigma_d F.
A flow-matching model predicts v = noise - data on unit-variance x_fm = (1 - s) x0' + s eps.
"""
from __future__ import annotations

import math

import torch

SIGMA_DATA = 0.5
T_MAX = math.pi / 2


def flow_time(t: torch.Tensor) -> torch.Tensor:
    """TrigFlow time -> flow time with equal SNR: s = sin t / (sin t + cos t) (Sprint eq. 8, step 1)."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trig_time(s: torch.Tensor) -> torch.Tensor:
    """Flow time -> TrigFlow time: t = atan(s / (1 - s)) (inverse of Sprint eq. 8, step 1)."""
    return torch.atan2(s, 1 - s)


def flow_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent time shift of flow sigmas: shift s / (1 + (shift - 1) s) (SD3 eq. 23)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(num_points: int, shift: float, sigma_min: float = 0.0025) -> torch.Tensor:
    """`num_points` decreasing flow sigmas from 1 to shift(sigma_min), the FlowMatch-Euler schedule (float64)."""
    return flow_shift(torch.linspace(1.0, sigma_min, num_points, dtype=torch.float64), shift)


def reference_route(num_points: int, shift: float) -> torch.Tensor:
    """TBCM's reference route (arXiv 2511.20410, trajectory sampling): FlowMatch-Euler flow sigmas mapped to TrigFlow
    time by Sprint eq. 8 (t = atan(s / (1 - s))), starting at pi/2."""
    return trig_time(flow_sigmas(num_points, shift))


def _as_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def trigflow_from_flow(flow_model, x_over_sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F(x_t / sigma_d, t) of a flow-matching model `flow_model(x_fm, s) -> v` (Sprint Prop. 3.1, Alg. 1).

    `t` has shape (B,); the result is in network units, so dx_t/dt = sigma_d * F.
    """
    s = flow_time(t)
    sc = _as_column(s, x_over_sigma)
    k = torch.sqrt(sc**2 + (1 - sc) ** 2)  # = 1 / (sin t + cos t)
    x_fm = x_over_sigma * k
    v = flow_model(x_fm, s.to(x_over_sigma.dtype))
    return ((1 - 2 * sc) * x_fm + (1 - 2 * sc + 2 * sc**2) * v) / k  # Sprint Alg. 1, step 5


def consistency_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean estimate f(x_t, t) = cos t x_t - sin t dx/dt, with velocity = sigma_d F (sCM eq. 9)."""
    tc = _as_column(t, x_t)
    return torch.cos(tc) * x_t - torch.sin(tc) * velocity


def trigflow_step(x_t: torch.Tensor, velocity: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Exact DDIM-like TrigFlow step from t to t - dt: x = cos(dt) x_t - sin(dt) dx/dt (sCM eq. 10)."""
    dtc = _as_column(dt, x_t)
    return torch.cos(dtc) * x_t - torch.sin(dtc) * velocity


def renoise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward TrigFlow noising x_t = cos t x0 + sin t z, with z already scaled by sigma_d (sCM eq. 3)."""
    tc = _as_column(t, x0)
    return torch.cos(tc) * x0 + torch.sin(tc) * noise
