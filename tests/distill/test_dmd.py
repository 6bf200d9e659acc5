"""DMD's regulariser on the real Sana transformer class: its gradient on the one-step samples, and the fake
denoiser's target, against plain references."""
import math
from types import SimpleNamespace

import torch

from tbcm.distill.dmd import denoiser_velocity, dmd_loss, dmd_times, fake_denoiser, fake_denoiser_loss
from tbcm.distill.loss import Pairs
from tiny import tiny_transformer
from tbcm.models.trigflow import SIGMA_DATA, renoise


def batch(n=3):
    g = torch.Generator().manual_seed(2)
    return Pairs(x_t=torch.randn(n, 4, 4, 4, generator=g) * SIGMA_DATA, t=torch.full((n,), math.pi / 2),
                 velocity=torch.zeros(n, 4, 4, 4), states=torch.randn(n, 16, 32, generator=g),
                 mask=torch.ones(n, 16, dtype=torch.long), guidance=torch.tensor([4.0, 4.5, 5.0][:n]),
                 weight=torch.ones(n), x0=torch.zeros(n, 4, 4, 4))


def test_dmd_times_lie_inside_the_trigflow_interval_and_lean_toward_noise():
    t = dmd_times(4096, shift=5.0)
    assert t.min() > 0 and t.max() < math.pi / 2
    assert (t > math.pi / 4).float().mean() > 0.75  # shift 5: flow time 5u / (1 + 4u) > 1/2 for u > 1/6


def test_dmd_gradient_on_the_samples_is_fake_minus_real_over_the_normaliser():
    torch.manual_seed(0)
    teacher = tiny_transformer(student=False).eval()
    fake = fake_denoiser(teacher)
    with torch.no_grad():
        for p in fake.parameters():
            p += 0.05 * torch.randn_like(p)
    starts = batch()
    null = (torch.zeros(3, 16, 32), torch.ones(3, 16, dtype=torch.long))
    x0_hat = (torch.randn(3, 4, 4, 4) * SIGMA_DATA).requires_grad_(True)
    torch.manual_seed(1)
    dmd_loss(teacher, fake, x0_hat, starts, null, shift=5.0).backward()

    torch.manual_seed(1)  # the same times and noise, by hand
    s = dmd_times(3, 5.0)
    with torch.no_grad():
        x_s = renoise(x0_hat, SIGMA_DATA * torch.randn_like(x0_hat), s)
        column = s.view(-1, 1, 1, 1)
        real = torch.cos(column) * x_s - torch.sin(column) * SIGMA_DATA * denoiser_velocity(teacher, x_s, s, starts,
                                                                                            null)
        fake_x0 = torch.cos(column) * x_s - torch.sin(column) * SIGMA_DATA * denoiser_velocity(fake, x_s, s, starts)
        normaliser = (x0_hat - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = (fake_x0 - real) / normaliser / (3 * x0_hat[0].numel())
    torch.testing.assert_close(x0_hat.grad, expected, atol=1e-6, rtol=1e-4)
    assert expected.abs().max() > 1e-4  # a perturbed fake really differs from the teacher


def test_fake_denoiser_loss_vanishes_for_a_denoiser_that_returns_the_sample():
    """F* = (cos s x_s - x̂0) / (sigma_d sin s): a denoiser whose x0 estimate is x̂0 itself has zero loss, and the
    shipped one (a copy of a random teacher) does not."""
    torch.manual_seed(0)
    teacher = tiny_transformer(student=False).eval()
    starts = batch()
    x0_hat = torch.randn(3, 4, 4, 4) * SIGMA_DATA

    class Oracle(torch.nn.Module):  # a flow model whose TrigFlow F gives back x̂0 exactly, at any (x_s, s)
        dtype = torch.float32
        config = SimpleNamespace(guidance_embeds=True, timestep_scale=1.0)  # fed the flow time itself, as Sprint's

        def forward(self, x_fm, encoder_hidden_states, encoder_attention_mask, timestep, guidance, return_dict):
            s = timestep.view(-1, 1, 1, 1)
            x0_fm = x0_hat / SIGMA_DATA  # flow state x_fm = (1 - s) x0 + s z, velocity z - x0
            return ((x_fm - (1 - s) * x0_fm) / s - x0_fm,)

    torch.manual_seed(3)
    assert fake_denoiser_loss(Oracle(), x0_hat, starts, 5.0) < 1e-8
    assert fake_denoiser_loss(fake_denoiser(teacher), x0_hat, starts, 5.0) > 1e-3
