"""The sCM loss and its JVP tangent against float64 finite differences, through the real Sana transformer."""
import math

import pytest
import torch
from diffusers import SanaTransformer2DModel

from tbcm.distill.loss import Pairs, consistency_tangent, endpoint_loss, prior_weight, scm_loss, tangent_r
from tbcm.distill.student import Student, student_from_teacher
from tiny import tiny_transformer
from tbcm.models.trigflow import SIGMA_DATA


@pytest.fixture(scope="module")
def student64():
    torch.manual_seed(0)
    student = Student(student_from_teacher(tiny_transformer(student=False))).double()
    for p in student.parameters():  # non-zero guidance branch and log-variance, so every path is exercised
        p.data += 0.01 * torch.randn_like(p)
    return student


def make_pairs(n=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return Pairs(x_t=torch.randn(n, 4, 4, 4, generator=g, dtype=dtype) * SIGMA_DATA,
                 t=torch.tensor([0.2, 0.9, 1.4][:n], dtype=dtype),
                 velocity=torch.randn(n, 4, 4, 4, generator=g, dtype=dtype) * SIGMA_DATA,
                 states=torch.randn(n, 16, 32, generator=g, dtype=dtype), mask=torch.ones(n, 16, dtype=torch.long),
                 guidance=torch.tensor([4.0, 4.5, 5.0][:n], dtype=dtype), weight=torch.ones(n, dtype=dtype),
                 x0=torch.randn(n, 4, 4, 4, generator=g, dtype=dtype) * SIGMA_DATA)


def reference_tangent(student, pairs, r, c, h=1e-3):
    """g from the definition, with dF/dt along the ODE by central finite differences in float64 (Sana's linear
    attention computes in float32 whatever the model dtype, which sets the step h and the tolerance)."""
    t, x = pairs.t, pairs.x_t
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    cos, sin = col(torch.cos(t)), col(torch.sin(t))

    def f(x_over_sigma, time):
        return student.velocity(x_over_sigma, time, pairs.states, pairs.mask, pairs.guidance)

    with torch.no_grad():
        f_minus = f(x / SIGMA_DATA, t)
        tx, tt = cos * sin * pairs.velocity / SIGMA_DATA, torch.cos(t) * torch.sin(t)
        jvp = (f(x / SIGMA_DATA + h * tx, t + h * tt) - f(x / SIGMA_DATA - h * tx, t - h * tt)) / (2 * h)
    g = -cos**2 * (SIGMA_DATA * f_minus - pairs.velocity) - r * (cos * sin * x + SIGMA_DATA * jvp)
    return f_minus, g / col(g.flatten(1).norm(dim=1) + c)


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_tangent_matches_finite_differences(student64, r):
    pairs = make_pairs()
    f_minus, g = consistency_tangent(student64, pairs, r)
    ref_f, ref_g = reference_tangent(student64, pairs, r, 0.1)
    torch.testing.assert_close(f_minus, ref_f, atol=1e-10, rtol=1e-10)
    assert (g - ref_g).abs().max() < 2e-4
    assert (g.flatten(1).norm(dim=1) < 1).all()  # normalised: ||g|| / (||g|| + c) < 1
    if r:  # the JVP term moves g far more than the tolerance, so a wrong J cannot pass
        assert (g - consistency_tangent(student64, pairs, 0.0)[1]).abs().max() > 100 * 2e-4


@pytest.mark.parametrize("prior, logvar_min", [("tan", None), ("uniform", None), ("tan", 0.0)])
def test_loss_matches_its_formula(student64, prior, logvar_min):
    pairs = make_pairs()
    loss, _ = scm_loss(student64, pairs, r=1.0, prior=prior, logvar_min=logvar_min)
    f_minus, g = reference_tangent(student64, pairs, 1.0, 0.1)
    velocity, logvar = student64(pairs.x_t / SIGMA_DATA, pairs.t, pairs.states, pairs.mask, pairs.guidance)
    weight = 1 / (SIGMA_DATA * torch.tan(pairs.t)) if prior == "tan" else torch.ones_like(pairs.t)
    if logvar_min is not None:
        assert (logvar < logvar_min).any()  # the bound is active on at least one pair, so it is tested
        logvar = torch.maximum(logvar, torch.tensor(logvar_min, dtype=logvar.dtype))
    expected = (weight * torch.exp(-logvar) * (velocity - f_minus - g).square().flatten(1).mean(1) + logvar).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)


def test_unknown_prior_weight_is_named():
    with pytest.raises(ValueError, match="prior_weight must be 'tan' or 'uniform'"):
        prior_weight(torch.ones(2), "edm")


def test_loss_weight_zero_drops_pairs(student64):
    pairs = make_pairs()
    pairs.weight = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    only_first = Pairs(*(field[:1] for field in vars(make_pairs()).values()))
    loss, _ = scm_loss(student64, pairs, 1.0)
    loss_first, _ = scm_loss(student64, only_first, 1.0)
    torch.testing.assert_close(loss, loss_first, atol=1e-6, rtol=1e-5)


def test_gradient_reaches_student_and_logvar(student64):
    student64.zero_grad()
    loss, _ = scm_loss(student64, make_pairs(), 1.0)
    loss.backward()
    assert student64.logvar.weight.grad.abs().sum() > 0
    assert student64.transformer.time_embed.guidance_embedder.linear_2.weight.grad.abs().sum() > 0
    student64.zero_grad()


def test_student_starts_as_the_teacher():
    torch.manual_seed(0)
    teacher = tiny_transformer(student=False).eval()
    student = student_from_teacher(teacher).eval()
    x, s, states = torch.randn(2, 4, 4, 4), torch.rand(2), torch.randn(2, 16, 32)
    with torch.no_grad():
        want = teacher(x, states, s, return_dict=False)[0]
        got = student(x, states, s, guidance=torch.tensor([0.4, 0.5]), return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_tangent_r_schedule():
    assert tangent_r(0, 100, 10**9, 10, 0.75) == 0.0
    assert tangent_r(50, 100, 10**9, 10, 0.75) == 0.5
    assert tangent_r(500, 100, 10**9, 10, 0.75) == 1.0
    assert math.isclose(tangent_r(205, 100, 200, 10, 0.75), 0.875)
    assert tangent_r(400, 100, 200, 10, 0.75) == 0.75


def test_endpoint_loss_regresses_the_one_step_sample_onto_the_endpoint(student64):
    """At t = pi/2 the consistency function is f = -sigma_d F (sCM eq. 9): the loss is its mean squared distance
    to x0 in units of sigma_d, averaged over the kept rollouts only."""
    pairs = make_pairs()
    starts = Pairs(**{**vars(pairs), "t": torch.full((3,), math.pi / 2, dtype=torch.float64),
                      "weight": torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)})
    with torch.no_grad():
        one_step = -SIGMA_DATA * student64.velocity(starts.x_t / SIGMA_DATA, starts.t, starts.states, starts.mask,
                                                    starts.guidance)
        per_rollout = ((one_step - starts.x0) / SIGMA_DATA).square().flatten(1).mean(1)
        loss = endpoint_loss(student64, starts)
    torch.testing.assert_close(loss, (per_rollout[0] + per_rollout[2]) / 2, atol=1e-6, rtol=1e-6)
    assert abs(loss - per_rollout.mean()) > 1e-3  # the dropped rollout really is left out
    exact = Pairs(**{**vars(starts), "x0": one_step})
    assert endpoint_loss(student64, exact) < 1e-12


def test_student_of_a_sparse_time_teacher_warns_that_it_does_not_start_as_the_teacher():
    """A Sana 600M/1.6B teacher (timestep_scale 1.0) embeds 1000 x flow time; its Sprint student embeds flow time."""
    teacher = SanaTransformer2DModel.from_config({**tiny_transformer(student=False).config, "timestep_scale": 1.0})
    with pytest.warns(UserWarning, match="timestep_scale is 1.0.*dense time"):
        student_from_teacher(teacher)


@pytest.mark.parametrize("detached", [False, True])
def test_a_detached_log_variance_head_trains_only_itself(detached):
    """Sana's logvar head reads the time embedding, so its gradient also trains the transformer's time embedder;
    with logvar_detached it trains the head alone."""
    torch.manual_seed(0)
    transformer = student_from_teacher(tiny_transformer(student=False))
    student = Student(transformer, logvar_detached=detached)
    torch.nn.init.normal_(student.logvar.weight)
    pairs = make_pairs(dtype=torch.float32)
    velocity, logvar = student(pairs.x_t / SIGMA_DATA, pairs.t, pairs.states, pairs.mask, pairs.guidance)
    logvar.sum().backward()
    embedder = [p.grad for name, p in transformer.named_parameters() if name.startswith("time_embed.")]
    assert student.logvar.weight.grad.abs().sum() > 0
    assert all(g is None for g in embedder) if detached else any(g is not None and g.abs().sum() > 0 for g in embedder)
