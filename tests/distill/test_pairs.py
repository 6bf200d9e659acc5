"""TBCM pairs: route and jitter, rollout shapes, velocity reuse, the degenerate filter, re-noised endpoints;
data-sCM pairs."""
import math

import pytest
import torch

from tbcm.distill.config import DistillConfig
from tbcm.distill.pairs import (data_pairs, degenerate_weight, pairs_from_rollout, renoised_endpoint_pairs, rollout,
                          trajectory_times)
from tbcm.models.pipeline import load_pipeline
from tbcm.models.sampling import cfg_flow_model
from tbcm.models.trigflow import SIGMA_DATA, reference_route, trigflow_from_flow


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_pipeline(tiny_teacher_dir)


@pytest.mark.parametrize("strategy", ["route", "lognormal", "uniform"])
def test_trajectory_times_decrease_from_pi_over_2(strategy):
    torch.manual_seed(0)
    times = trajectory_times(5, reference_route(16, 2.5), strategy, -0.8, 1.6)
    assert times.shape == (5, 16)
    assert torch.all(times[:, 0] == math.pi / 2)
    assert torch.all(times[:, 1:] < times[:, :-1])
    assert torch.all(times[:, 1:] > 0)


def test_route_jitter_stays_inside_its_interval_and_changes_each_draw():
    route = reference_route(16, 2.5).float()
    torch.manual_seed(0)
    a, b = (trajectory_times(64, route, "route", 0, 1) for _ in range(2))
    assert torch.all(a[:, 1:] >= route[1:]) and torch.all(a[:, 1:] <= route[:-1])
    assert not torch.equal(a, b)


def test_bad_strategy_is_rejected():
    with pytest.raises(ValueError, match="time_sampling"):
        trajectory_times(1, reference_route(4, 1.0), "cosine", 0, 1)


def conditioning(teacher, prompts):
    states, mask = teacher.text.encode(prompts)
    null_states, null_mask = teacher.text.null(len(prompts))
    return states, mask, null_states, null_mask


def test_rollout_shapes_and_velocity_reuse(teacher):
    torch.manual_seed(0)
    config = DistillConfig(route_points=6, points_per_trajectory=5)
    cond = conditioning(teacher, ["a red circle on the left", "a big blue box at the top", "a cross"])
    roll = rollout(teacher, *cond, config)
    assert roll.states.shape == (3, 6, 4, 4, 4) and roll.velocities.shape == roll.states.shape
    assert roll.times.shape == (3, 6) and roll.endpoints.shape == (3, 4, 4, 4)
    assert set(roll.guidance.tolist()) <= set(config.cfg_scales)
    # the stored velocity is the teacher's CFG velocity at the stored state: no extra teacher call needed
    k = 3
    flow = cfg_flow_model(teacher.transformer, *cond, roll.guidance)
    with torch.no_grad():
        again = SIGMA_DATA * trigflow_from_flow(flow, roll.states[:, k] / SIGMA_DATA, roll.times[:, k])
    torch.testing.assert_close(roll.velocities[:, k], again, atol=1e-5, rtol=1e-5)
    # each next state is the DDIM step of the previous one with that velocity
    dt = (roll.times[:, k] - roll.times[:, k + 1]).view(-1, 1, 1, 1)
    step = torch.cos(dt) * roll.states[:, k] - torch.sin(dt) * roll.velocities[:, k]
    torch.testing.assert_close(roll.states[:, k + 1], step, atol=1e-5, rtol=1e-5)

    weight = torch.tensor([1.0, 0.0, 1.0])  # the degenerate filter's, per prompt
    pairs = pairs_from_rollout(roll, cond[0], cond[1], weight, DistillConfig(route_points=6, points_per_trajectory=2))
    assert len(pairs.t) == 6 and pairs.weight.tolist() == [1, 1, 0, 0, 1, 1]
    assert torch.all(pairs.t < math.pi / 2)  # the pure-noise state k = 0 is never a pair
    for i in range(6):  # every pair is one of its prompt's stored states, with its own time and velocity
        row = roll.states[i // 2]
        match = [j for j in range(6) if torch.equal(row[j], pairs.x_t[i])]
        assert match and roll.times[i // 2, match[0]] == pairs.t[i]
        assert torch.equal(roll.velocities[i // 2, match[0]], pairs.velocity[i])


def test_points_per_trajectory_range(tiny_teacher_dir, tmp_path):
    from tbcm.cli.distill import sources
    from tbcm.distill.trainer import Distiller

    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), route_points=4, points_per_trajectory=4)
    with pytest.raises(ValueError, match=r"--points-per-trajectory must be at most K-1 = 3 \(--route-points 4\)"):
        Distiller(config, sources(config))  # a config for `tbcm rollout`, which keeps no points, but no run
    with pytest.raises(ValueError, match=r"--points-per-trajectory must be >= 1 \(with --pairs data"):
        DistillConfig(points_per_trajectory=0)  # no pair at all
    with pytest.raises(ValueError, match="--ladd needs --points-per-trajectory >= 1"):
        DistillConfig(points_per_trajectory=0, renoised_per_trajectory=2, ladd=True)
    assert DistillConfig(points_per_trajectory=0, renoised_per_trajectory=2).points_per_trajectory == 0
    with pytest.raises(ValueError, match="--points-per-trajectory must be >= 1"):
        DistillConfig(pairs="data", points_per_trajectory=0)


def test_degenerate_filter_drops_constant_endpoints_only():
    torch.manual_seed(0)
    flat = torch.full((50, 4, 8, 8), 0.3)
    varied = torch.randn(50, 4, 8, 8)
    assert degenerate_weight(flat, 0.05).sum() == 0
    assert degenerate_weight(varied, 0.05).sum() == 50


def test_data_pairs_noise_the_encoded_images(teacher):
    torch.manual_seed(0)
    size = teacher.default_size
    images = torch.rand(4, 3, size, size) * 2 - 1  # any captioned images in [-1, 1]: no world needed
    cond = conditioning(teacher, ["a photo of a cat", "a red circle", "a cross", "two dogs"])
    pairs = data_pairs(teacher, images, *cond, DistillConfig())
    assert pairs.x_t.shape == (4, 4, 4, 4) and pairs.velocity.shape == (4, 4, 4, 4)
    assert torch.all((pairs.t > 0) & (pairs.t < math.pi / 2)) and torch.all(pairs.weight == 1)
    with torch.no_grad():
        x0 = teacher.latents_to_trig(teacher.vae.encode(images).latent.float())
    torch.testing.assert_close(pairs.x0, x0)


def test_renoised_endpoints_lie_off_the_trajectory_with_the_teachers_velocity_there(teacher):
    torch.manual_seed(0)
    config = DistillConfig(route_points=4, points_per_trajectory=3, renoised_per_trajectory=3)
    cond = conditioning(teacher, ["a red circle on the left", "a cross"])
    roll = rollout(teacher, *cond, config)
    weight = torch.tensor([1.0, 0.0])
    pairs = renoised_endpoint_pairs(teacher, roll, weight, *cond, config)
    assert len(pairs.t) == 6 and torch.all((pairs.t > 0) & (pairs.t < math.pi / 2))
    assert pairs.weight.tolist() == [1.0] * 3 + [0.0] * 3  # the degenerate filter's verdict follows the prompt
    assert torch.equal(pairs.guidance, roll.guidance.repeat_interleave(3))
    assert torch.equal(pairs.x0[4], roll.endpoints[1])
    # x_t = cos t x0 + sin t z with z ~ N(0, sigma_d^2): the implied noise is not the trajectory's own
    tc = pairs.t.view(-1, 1, 1, 1)
    implied = (pairs.x_t - torch.cos(tc) * pairs.x0) / torch.sin(tc)
    assert implied.std() == pytest.approx(SIGMA_DATA, rel=0.25)
    assert not torch.allclose(implied[0], implied[1])
    # the velocity is the teacher's CFG velocity at the new state, with the prompt's own guidance
    flow = cfg_flow_model(teacher.transformer, *(c.repeat_interleave(3, 0) for c in cond), pairs.guidance)
    with torch.no_grad():
        expected = SIGMA_DATA * trigflow_from_flow(flow, pairs.x_t / SIGMA_DATA, pairs.t)
    torch.testing.assert_close(pairs.velocity, expected, atol=1e-5, rtol=1e-5)
