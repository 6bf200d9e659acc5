"""Samplers: flow-Euler and TrigFlow agree on the tiny teacher with CFG; the timestep fed to the transformer;
recorded trajectories; CM times; per-seed noise."""
import copy
import importlib
import math

import pytest
import torch

from tbcm.models.sampling import (CM_STEPS, SCM_MAX_TIME, cfg_flow_model, cm_times, flow_model, sample_consistency,
                             sample_flow_euler, sample_trigflow, seeded_noise, teacher_sigmas, to_uint8,
                             trigflow_trajectory)
from tbcm.models.trigflow import (SIGMA_DATA, T_MAX, consistency_x0, flow_sigmas, reference_route, renoise, trig_time,
                             trigflow_from_flow)

PROMPTS = ["a small red circle on the left", "a big blue box at the top", "there is a tiny green cross"]
SAMPLER_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def captions(teacher_pipe):
    """The tiny teacher's encoder states and masks of PROMPTS, then of as many empty captions (CFG's null)."""
    return (*teacher_pipe.text.encode(PROMPTS), *teacher_pipe.text.null(len(PROMPTS)))


@pytest.fixture(scope="module")
def teacher_velocity(teacher_pipe, captions):
    """CFG velocity of the tiny teacher per dtype, with one guidance scale per prompt."""
    states, mask, null_states, null_mask = captions

    def make(dtype):
        transformer = teacher_pipe.transformer if dtype == torch.float32 else \
            copy.deepcopy(teacher_pipe.transformer).to(dtype)
        return cfg_flow_model(transformer, states.to(dtype), mask, null_states.to(dtype), null_mask,
                              torch.tensor([3.0, 4.5, 6.0], dtype=dtype))
    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 2, 4, 16])
def test_flow_euler_and_trigflow_samplers_agree(teacher_velocity, dtype, steps):
    velocity = teacher_velocity(dtype)
    noise, _ = seeded_noise([11, 12, 13], (4, 4, 4))
    noise = noise.to(dtype)
    sigmas = teacher_sigmas(steps, 2.5)
    flow = sample_flow_euler(velocity, noise, sigmas)
    trig = sample_trigflow(velocity, noise, sigmas)
    assert flow.dtype == trig.dtype == dtype and flow.shape == noise.shape
    assert (flow - trig).abs().max() < SAMPLER_TOL[dtype]
    assert (flow - noise).abs().max() > 0.1  # the sampler did move the state


def test_cfg_flow_model_matches_two_separate_calls(teacher_pipe, captions):
    transformer = teacher_pipe.transformer
    states, mask, null_states, null_mask = captions
    scale = torch.tensor([1.0, 4.5, 7.0])
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        guided = cfg_flow_model(transformer, states, mask, null_states, null_mask, scale)(x, s)
        cond = flow_model(transformer, states, mask)(x, s)
        null = flow_model(transformer, null_states, null_mask)(x, s)
    reference = null + scale.view(-1, 1, 1, 1) * (cond - null)
    torch.testing.assert_close(guided, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[0], cond[0], atol=1e-5, rtol=1e-5)  # w = 1 is the conditional model
    assert (cond - null).abs().max() > 1e-3  # the prompt matters, so the test can tell the branches apart


@pytest.mark.parametrize("which,timestep_scale,expected", [("teacher", 1.0, 1000.0), ("teacher", 0.001, 1.0),
                                                          ("student", 1.0, 1.0), ("student", 0.001, 1.0)])
def test_flow_model_feeds_the_timestep_diffusers_pipelines_feed(teacher_pipe, student_pipe, captions, which,
                                                                 timestep_scale, expected):
    """SanaPipeline: scheduler timestep (1000 s) x timestep_scale; SanaSprintPipeline: s itself."""
    transformer = copy.deepcopy((teacher_pipe if which == "teacher" else student_pipe).transformer)
    transformer.register_to_config(timestep_scale=timestep_scale)
    seen = []
    transformer.time_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    s = torch.tensor([0.9, 0.5, 0.1])
    guidance = torch.full((3,), 0.45) if which == "student" else None
    with torch.no_grad():
        flow_model(transformer, *captions[:2], guidance=guidance)(torch.randn(3, 4, 4, 4), s)
    torch.testing.assert_close(seen[0], s * expected)


def test_cfg_flow_model_guides_only_inside_its_interval(teacher_pipe, captions):
    """Above `guidance_max_sigma` a sample gets the conditional velocity alone, at or below it the full CFG one."""
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    limited, everywhere = (cfg_flow_model(teacher_pipe.transformer, *captions, torch.tensor([3.0, 4.5, 7.0]), limit)
                           for limit in (0.6, 1.0))
    conditioned = flow_model(teacher_pipe.transformer, *captions[:2])
    mixed, above = torch.tensor([0.9, 0.6, 0.1]), torch.full((3,), 0.8)  # above, on and below the limit; all above
    with torch.no_grad():
        torch.testing.assert_close(limited(x, mixed)[0], conditioned(x, mixed)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(limited(x, mixed)[1:], everywhere(x, mixed)[1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(limited(x, above), conditioned(x, above))
        assert (everywhere(x, above) - limited(x, above)).abs().max() > 1e-3  # guidance does change it there


def test_teacher_sigmas():
    sig = teacher_sigmas(4, 2.5)
    assert sig.dtype == torch.float64 and len(sig) == 5 and float(sig[-1]) == 0.0
    torch.testing.assert_close(sig[:-1], flow_sigmas(4, 2.5))
    assert (sig.diff() < 0).all()


@pytest.mark.parametrize("steps", [1, 3, 16])
def test_samplers_are_exact_for_the_exact_model(exact_flow, steps):
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigmas = teacher_sigmas(steps, 2.5)
    torch.testing.assert_close(sample_flow_euler(exact_flow(x0), noise, sigmas), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(sample_trigflow(exact_flow(x0), noise, sigmas), x0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_trajectory_records_states_and_velocities_in_time_order(exact_flow, per_sample):
    """With the exact model each state lies on the analytic path at its own time, so recorded entry k must be
    (x_tk, dx/dt at t_k) for the k-th (decreasing) time."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)   # unit-variance data
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    route = reference_route(16, 2.5)
    times = route
    if per_sample:  # one jittered decreasing route per sample, like TBCM's stratified draw
        lower = torch.cat([route[1:], torch.zeros(1, dtype=route.dtype)])
        u = torch.rand(3, 16, generator=g, dtype=torch.float64)
        times = torch.cat([route[:1].expand(3, 1), (lower + u * (route - lower))[:, :-1]], dim=1)
        assert (times.diff(dim=1) < 0).all()
    out, states, velocities = trigflow_trajectory(exact_flow(x0), noise, times, record=True)
    assert len(states) == len(velocities) == 16
    full = times.expand(3, -1)
    x0_t, z = SIGMA_DATA * x0, SIGMA_DATA * noise
    for k in range(16):
        t = full[:, k]
        c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
        torch.testing.assert_close(states[k], renoise(x0_t, z, t), atol=1e-10, rtol=0)
        torch.testing.assert_close(velocities[k], c * z - s * x0_t, atol=1e-10, rtol=0)
    torch.testing.assert_close(states[0], noise * SIGMA_DATA, atol=0, rtol=0)  # starts from pure noise at pi/2
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)
    _, no_states, no_velocities = trigflow_trajectory(exact_flow(x0), noise, times)
    assert no_states == [] and no_velocities == []


def test_trajectory_matches_a_hand_written_ddim_loop(teacher_velocity):
    velocity = teacher_velocity(torch.float64)
    noise, _ = seeded_noise([1, 2, 3], (4, 4, 4))
    noise = noise.double()
    times = trig_time(flow_sigmas(4, 2.5))
    out, states, vels = trigflow_trajectory(velocity, noise, times, record=True)
    x = noise * SIGMA_DATA
    nxt = torch.cat([times[1:], torch.zeros(1, dtype=times.dtype)])
    for k, (t, t_next) in enumerate(zip(times, nxt)):
        torch.testing.assert_close(states[k], x, atol=1e-12, rtol=0)
        x = math.cos(t - t_next) * x - math.sin(t - t_next) * vels[k]
    torch.testing.assert_close(out, x / SIGMA_DATA, atol=1e-12, rtol=0)


def test_the_probes_stochastic_teacher_sampler_is_the_teachers_own_at_c_1(teacher_velocity):
    """benchmarks/probe_teacher_limits.py: keeping all of the predicted noise is the deterministic DDIM sampler."""
    probe = importlib.import_module("benchmarks.probe_teacher_limits")
    velocity = teacher_velocity(torch.float64)
    noise = seeded_noise([1, 2, 3], (4, 4, 4))[0].double()
    sigmas = teacher_sigmas(4, 2.5)
    deterministic = sample_trigflow(velocity, noise, sigmas)
    torch.testing.assert_close(probe.stochastic_sampler(1.0, 0)(velocity, noise, sigmas), deterministic,
                               atol=1e-10, rtol=0)
    half = probe.stochastic_sampler(0.5, 0)(velocity, noise, sigmas)
    torch.testing.assert_close(probe.stochastic_sampler(0.5, 0)(velocity, noise, sigmas), half, atol=0, rtol=0)
    assert (half - deterministic).abs().max() > 0.01  # fresh noise enters below c = 1


def test_cm_times():
    for bad in (0, 5, -1, 16):
        with pytest.raises(ValueError, match="steps"):
            cm_times(bad)
    for steps in range(1, 5):
        times = cm_times(steps)
        assert len(times) == steps + 1 and times[0] == pytest.approx(SCM_MAX_TIME) and times[-1] == 0.0
        assert all(a > b for a, b in zip(times, times[1:]))
    assert SCM_MAX_TIME == pytest.approx(T_MAX, abs=1e-5)  # diffusers' pi/2, rounded to 5 decimals
    assert cm_times(2) == pytest.approx([1.5708, 1.3, 0.0])  # SanaSprintPipeline's defaults
    assert cm_times(4) == pytest.approx([1.5708 * k / 4 for k in (4, 3, 2, 1, 0)])  # SCMScheduler's linspace
    assert CM_STEPS == (1, 2, 3, 4)
    assert cm_times(2, (0.9,)) == pytest.approx([1.5708, 0.9, 0.0])
    assert cm_times(3, (1.2, 0.4)) == pytest.approx([1.5708, 1.2, 0.4, 0.0])
    for steps, bad in ((2, (0.9, 0.5)), (1, (0.9,)), (3, (0.4, 1.2)), (2, (1.6,)), (2, (0.0,)), (3, (0.9, 0.9))):
        with pytest.raises(ValueError, match="intermediate_times must hold"):
            cm_times(steps, bad)


def test_seeded_noise_is_per_seed():
    shape = (4, 4, 4)
    alone, gens = seeded_noise([5], shape)
    batch, batch_gens = seeded_noise([1, 5, 9, 5], shape)
    assert alone.shape == (1, *shape) and batch.shape == (4, *shape) and len(batch_gens) == 4
    assert torch.equal(alone[0], batch[1]) and torch.equal(alone[0], batch[3])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])
    assert torch.equal(alone[0], torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    # the generators are returned after the first draw, so later draws continue each image's own stream
    ref = torch.Generator().manual_seed(5)
    torch.randn(shape, generator=ref)
    assert torch.equal(torch.randn(shape, generator=gens[0]), torch.randn(shape, generator=ref))
    assert torch.equal(torch.randn(shape, generator=batch_gens[1]), torch.randn(shape, generator=batch_gens[3]))


def test_consistency_sampler_one_step_is_the_x0_prediction(student_pipe):
    states, mask = student_pipe.text.encode(PROMPTS)
    guidance = torch.full((3,), 4.5 * student_pipe.transformer.config.guidance_embeds_scale)
    velocity = flow_model(student_pipe.transformer, states, mask, guidance=guidance)
    noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))
    x0 = sample_consistency(velocity, noise, gens, 1)
    with torch.no_grad():  # at t = pi/2: s = 1, k = 1, x_fm = noise, F = v - noise, x0 = -sigma_d F / sigma_d
        v = velocity(noise, torch.ones(3))
    torch.testing.assert_close(x0, noise - v, atol=1e-5, rtol=1e-5)


def test_consistency_sampler_follows_the_intermediate_times(student_pipe):
    states, mask = student_pipe.text.encode(PROMPTS)
    velocity = flow_model(student_pipe.transformer, states, mask, guidance=torch.full((3,), 0.45))

    def sample(*intermediate):
        noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))
        return sample_consistency(velocity, noise, gens, 2, intermediate)
    torch.testing.assert_close(sample(1.3), sample(), atol=0, rtol=0)  # Sprint's time is the default
    assert not torch.allclose(sample(0.9), sample(), atol=1e-3)
    noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))  # by hand: x0 at the first time, re-noised to 0.9, x0 there
    first_time = torch.full((3,), SCM_MAX_TIME)
    with torch.no_grad():
        first = consistency_x0(noise * SIGMA_DATA, SIGMA_DATA * trigflow_from_flow(velocity, noise, first_time),
                               first_time)
        fresh = torch.stack([torch.randn((4, 4, 4), generator=g) for g in gens])
        x = renoise(first, SIGMA_DATA * fresh, torch.full((3,), 0.9))
        t = torch.full((3,), 0.9)
        second = consistency_x0(x, SIGMA_DATA * trigflow_from_flow(velocity, x / SIGMA_DATA, t), t) / SIGMA_DATA
    torch.testing.assert_close(sample(0.9), second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [2, 4])
def test_consistency_sampler_renoises_from_each_images_generator(student_pipe, steps):
    states, mask = student_pipe.text.encode(PROMPTS)
    guidance = torch.full((3,), 0.45)
    velocity = flow_model(student_pipe.transformer, states, mask, guidance=guidance)
    noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))
    a = sample_consistency(velocity, noise, gens, steps)
    noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))
    b = sample_consistency(velocity, noise, gens, steps)
    assert torch.equal(a, b)
    noise, gens = seeded_noise([1, 2, 3], (4, 4, 4))
    gens[1].manual_seed(999)  # a different re-noising stream for image 1 changes image 1 only
    c = sample_consistency(velocity, noise, gens, steps)
    assert not torch.allclose(a[1], c[1], atol=1e-3)
    torch.testing.assert_close(a[[0, 2]], c[[0, 2]], atol=1e-5, rtol=1e-5)


def test_to_uint8():
    images = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0, 0.5]).view(1, 3, 1, 2)
    out = to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 2, 3)
    # channels last: pixel 0 is (-1, 0, 3) -> (0, 128, 255); pixel 1 is (-2, 1, 0.5) -> (0, 255, 191)
    assert out[0, 0].tolist() == [[0, 128, 255], [0, 255, 191]]
