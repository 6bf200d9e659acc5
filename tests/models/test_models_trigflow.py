"""TrigFlow time, the flow -> TrigFlow conversion and the TrigFlow step against closed forms (sCM,
arXiv 2410.11081, Sec. 2; Sana-Sprint, arXiv 2503.09641, Sec. 3.1 and Prop. 3.1; TBCM's reference route).

The exact flow model is the ideal velocity when all data is one fixed tensor x0, so every quantity has an
analytic value: F* = cos t z / sigma_d - sin t x0 / sigma_d, and x_s = cos s x0 + sin s z along the ODE.
"""
import math

import pytest
import torch

from tbcm.models.trigflow import (SIGMA_DATA, T_MAX, consistency_x0, flow_shift, flow_sigmas, flow_time,
                             reference_route, renoise, trig_time, trigflow_from_flow, trigflow_step)

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
SPEC_ROUTE = [1.5708, 1.5423, 1.5095, 1.4714, 1.4268, 1.3741, 1.3112, 1.2356, 1.1440, 1.0331, 0.8997, 0.7425,
              0.5642, 0.3734, 0.1832, 0.0063]


def data_and_noise(dtype, batch=5):
    """TrigFlow data x0 (std sigma_d) and noise z ~ N(0, sigma_d^2)."""
    g = torch.Generator().manual_seed(0)
    x0 = SIGMA_DATA * torch.randn(batch, 3, 4, 4, generator=g, dtype=dtype)
    z = SIGMA_DATA * torch.randn(batch, 3, 4, 4, generator=g, dtype=dtype)
    return x0, z


def col(t):
    return t.view(-1, 1, 1, 1)


def test_constants():
    assert SIGMA_DATA == 0.5 and T_MAX == math.pi / 2


def test_flow_time_and_trig_time_are_inverses():
    t = torch.linspace(0, math.pi / 2, 101, dtype=torch.float64)
    torch.testing.assert_close(trig_time(flow_time(t)), t, atol=1e-12, rtol=0)
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(flow_time(trig_time(s)), s, atol=1e-12, rtol=0)
    assert float(flow_time(torch.tensor(0.0))) == 0.0
    assert float(flow_time(torch.tensor(math.pi / 2, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-15)
    assert float(trig_time(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(math.pi / 2, abs=1e-15)
    assert (flow_time(t).diff() > 0).all()  # monotone


def test_equal_snr():
    """tan t == s / (1 - s): the TrigFlow state and the flow state have the same signal-to-noise ratio."""
    t = torch.linspace(0.01, 1.55, 50, dtype=torch.float64)
    s = flow_time(t)
    torch.testing.assert_close(torch.tan(t), s / (1 - s), atol=0, rtol=1e-12)
    # and the rescaling factor of Sprint Alg. 1 is 1 / (sin t + cos t)
    torch.testing.assert_close(torch.sqrt(s**2 + (1 - s) ** 2), 1 / (torch.sin(t) + torch.cos(t)), atol=0,
                               rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trigflow_from_flow_gives_the_analytic_velocity(exact_flow, dtype):
    x0, z = data_and_noise(dtype)
    t = torch.tensor([0.05, 0.4, 0.785, 1.2, 1.55], dtype=dtype)
    x_t = renoise(x0, z, t)
    F = trigflow_from_flow(exact_flow(x0 / SIGMA_DATA), x_t / SIGMA_DATA, t)
    F_star = col(torch.cos(t)) * z / SIGMA_DATA - col(torch.sin(t)) * x0 / SIGMA_DATA
    assert F.dtype == dtype and F.shape == x0.shape
    torch.testing.assert_close(F, F_star, **TOL[dtype])


def test_trigflow_from_flow_feeds_the_flow_model_the_equal_snr_state():
    x0, z = data_and_noise(torch.float64, batch=3)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    seen = {}

    def model(x_fm, s):
        seen["x"], seen["s"] = x_fm, s
        return torch.zeros_like(x_fm)

    trigflow_from_flow(model, renoise(x0, z, t) / SIGMA_DATA, t)
    s = col(flow_time(t))
    torch.testing.assert_close(seen["s"], flow_time(t))
    torch.testing.assert_close(seen["x"], (1 - s) * x0 / SIGMA_DATA + s * z / SIGMA_DATA, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t_from,t_to", [(math.pi / 2, 1.3), (1.3, 0.6), (1.0, 0.999), (0.6, 0.0), (1.5, 0.2)])
def test_trigflow_step_with_exact_velocity_stays_on_the_path(dtype, t_from, t_to):
    x0, z = data_and_noise(dtype)
    t = torch.full((len(x0),), t_from, dtype=dtype)
    s = torch.full((len(x0),), t_to, dtype=dtype)
    velocity = col(torch.cos(t)) * z - col(torch.sin(t)) * x0  # dx_t/dt = sigma_d F*
    out = trigflow_step(renoise(x0, z, t), velocity, t - s)
    torch.testing.assert_close(out, col(torch.cos(s)) * x0 + col(torch.sin(s)) * z, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_consistency_x0_with_exact_velocity_returns_x0(exact_flow, dtype):
    x0, z = data_and_noise(dtype)
    t = torch.tensor([math.pi / 2, 1.3, 0.8, 0.2, 0.01], dtype=dtype)
    x_t = renoise(x0, z, t)
    velocity = SIGMA_DATA * trigflow_from_flow(exact_flow(x0 / SIGMA_DATA), x_t / SIGMA_DATA, t)
    torch.testing.assert_close(consistency_x0(x_t, velocity, t), x0, **TOL[dtype])
    # a wrong velocity does not give x0
    assert (consistency_x0(x_t, 0.9 * velocity, t) - x0).abs().max() > 1e-3


def test_renoise_is_the_forward_process():
    x0, z = data_and_noise(torch.float64, batch=2)
    t = torch.tensor([0.0, math.pi / 2], dtype=torch.float64)
    out = renoise(x0, z, t)
    torch.testing.assert_close(out[0], x0[0], atol=0, rtol=0)
    torch.testing.assert_close(out[1], z[1], atol=1e-15, rtol=0)


def test_flow_shift():
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(flow_shift(sigma, 1.0), sigma)
    shifted = flow_shift(sigma, 2.5)
    assert float(shifted[0]) == 0 and float(shifted[-1]) == 1
    assert (shifted[1:-1] > sigma[1:-1]).all() and (shifted.diff() > 0).all()
    torch.testing.assert_close(shifted, 2.5 * sigma / (1 + 1.5 * sigma))
    sig = flow_sigmas(5, 3.0)
    assert sig.dtype == torch.float64 and len(sig) == 5 and float(sig[0]) == 1.0
    assert float(sig[-1]) == pytest.approx(3 * 0.0025 / (1 + 2 * 0.0025))


def test_reference_route_matches_the_spec():
    route = reference_route(16, 2.5)
    assert route.shape == (16,)
    assert float(route[0]) == pytest.approx(math.pi / 2, abs=1e-12)
    assert (route.diff() < 0).all()
    assert float(route[-1]) > 0
    torch.testing.assert_close(route, torch.tensor(SPEC_ROUTE, dtype=torch.float64), atol=1e-3, rtol=0)
