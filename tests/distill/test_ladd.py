"""The optional LADD branch: hinge losses by hand, per-token heads on frozen teacher features, where gradients go,
and the trainer with --ladd on both pair sources, including exact resume."""
import json
import math

import pytest
import torch

from tbcm.distill.config import DistillConfig
from tbcm.distill.ladd import (Discriminator, default_blocks, generator_loss, hinge_d_loss, hinge_g_loss, max_time,
                          one_per_prompt, teacher_features)
from tbcm.distill.loss import Pairs
from tbcm.distill.student import Student, student_from_teacher
from tbcm.distill.trainer import Distiller
from tbcm.cli.distill import sources
from tiny import tiny_transformer
from tbcm.models.training import learning_rate, read_safetensors
from tbcm.models.trigflow import SIGMA_DATA, renoise

TINY = dict(steps=3, prompts_per_step=2, route_points=4, points_per_trajectory=3, sample_every=0, eval_every=0,
            checkpoint_every=1, tangent_warmup=2, ladd=True)


def distiller_for(config: DistillConfig, resume: bool = False) -> Distiller:
    """A Distiller with its sources wired as `tbcm distill` wires them (the embedded world for --prompts world)."""
    return Distiller(config, sources(config), resume=resume)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = tiny_transformer(student=False).requires_grad_(False)
    return teacher, Student(student_from_teacher(teacher)), Discriminator(teacher)


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 4, 4, generator=g) * SIGMA_DATA
    return x, torch.tensor([0.3, 0.9, 1.4][:n]), torch.randn(n, 16, 32, generator=g), torch.ones(n, 16,
                                                                                                   dtype=torch.long)


def metrics(run) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_hinge_losses_match_hand_computed_values():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])   # relu(1 - real) = [0, .5, 2, 1]: mean 0.875
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.5]])  # relu(1 + fake) = [0, 1.5, 2, .5]: mean 1.0
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.875 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(0.25)


def test_heads_give_per_token_logits_on_hooked_blocks(nets):
    teacher, _, disc = nets
    assert default_blocks(28) == (0, 9, 18, 27) and default_blocks(2) == (0, 1) and disc.blocks == (0, 1)
    x, t, states, mask = inputs()
    assert disc(teacher, x, t, states, mask).shape == (3, 2 * 16)  # 4x4 latent, patch 1: 16 tokens per head
    assert Discriminator(teacher, (1,))(teacher, x, t, states, mask).shape == (3, 16)
    assert all(not block._forward_hooks for block in teacher.transformer_blocks)  # hooks live for one call only
    seen = []  # the features are the blocks' own outputs, (B, N, C)
    hook = teacher.transformer_blocks[1].register_forward_hook(lambda m, i, out: seen.append(out))
    features = teacher_features(teacher, (1,), x, t, states, mask)
    hook.remove()
    assert features[0].shape == (3, 16, 16) and torch.equal(features[0], seen[0])
    with pytest.raises(ValueError, match="blocks"):
        Discriminator(teacher, (2,))


def test_teacher_stays_frozen_while_fakes_and_student_get_gradients(nets):
    teacher, student, disc = nets
    x, t, states, mask = inputs()
    x0_hat = x.clone().requires_grad_(True)
    hinge_g_loss(disc(teacher, renoise(x0_hat, torch.randn_like(x) * SIGMA_DATA, t), t, states, mask)).backward()
    assert x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    disc.zero_grad(set_to_none=True)

    batch = Pairs(x, t, torch.zeros_like(x), states, mask, torch.full((3,), 4.5), torch.ones(3), x)
    loss, fake = generator_loss(disc, teacher, student, batch)
    loss.backward()
    assert not fake.requires_grad and fake.shape == x.shape
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # the heads were frozen for the G pass only
    assert student.transformer.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)


def test_max_time_weighting():
    x, t, _, _ = inputs()
    torch.manual_seed(0)
    same_x, same_t = max_time(x, t, 0.0)
    assert torch.equal(same_x, x) and torch.equal(same_t, t)
    noise_x, max_t = max_time(x, t, 1.0)
    assert torch.all(max_t == math.pi / 2) and not torch.equal(noise_x, x)
    torch.manual_seed(0)
    _, half = max_time(torch.zeros(4000, 1, 1, 1), torch.zeros(4000), 0.5)
    assert 0.45 < (half == math.pi / 2).float().mean() < 0.55


def test_one_per_prompt_takes_trajectory_pairs_only():
    # 3 prompts x 2 trajectory pairs, then 3 x 2 re-noised endpoints: one trajectory pair per prompt
    n = 12
    pairs = Pairs(torch.zeros(n, 1, 1, 1), torch.arange(n).float(), torch.zeros(n, 1, 1, 1), torch.zeros(n, 1, 1),
                  torch.ones(n, 1), torch.ones(n), torch.ones(n), torch.zeros(n, 1, 1, 1))
    assert one_per_prompt(pairs, points=2, prompts=3).t.tolist() == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("pairs", ["trajectory", "data"])
def test_trainer_with_ladd_logs_both_losses_and_moves_the_heads(tiny_teacher_dir, tmp_path, pairs):
    config = DistillConfig(teacher=str(tiny_teacher_dir), out=str(tmp_path), pairs=pairs, ladd_lr=3e-4, **TINY)
    distiller = distiller_for(config)
    heads = {k: v.clone() for k, v in distiller.discriminator.state_dict().items()}
    teacher = {k: v.clone() for k, v in distiller.teacher.transformer.state_dict().items()}
    distiller.train()
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    student_group, heads_group = distiller.optimizer.param_groups  # the student's schedule; the heads' constant lr
    assert student_group["lr"] == learning_rate(config, 3) and heads_group["lr"] == 3e-4
    assert all(math.isfinite(row[key]) for row in rows.values() for key in ("loss", "g_loss", "d_loss"))
    assert any(not torch.equal(v, heads[k]) for k, v in distiller.discriminator.state_dict().items() if "original" in k)
    assert all(torch.equal(v, teacher[k]) for k, v in distiller.teacher.transformer.state_dict().items())
    tensors, _ = read_safetensors(tmp_path / "checkpoint.safetensors")
    assert any(k.startswith("ladd.heads.") for k in tensors)


def test_ladd_resume_reaches_the_same_losses(tiny_teacher_dir, tmp_path):
    config = DistillConfig(teacher=str(tiny_teacher_dir), **{**TINY, "steps": 4})
    straight = distiller_for(DistillConfig(**{**config.__dict__, "out": str(tmp_path / "straight")}))
    straight.train()
    distiller_for(DistillConfig(**{**config.__dict__, "out": str(tmp_path / "split"), "steps": 2})).train()
    resumed = distiller_for(DistillConfig(**{**config.__dict__, "out": str(tmp_path / "split")}), resume=True)
    assert resumed.step == 2
    resumed.train()
    keys = ("loss", "g_loss", "d_loss", "grad_norm")
    assert [[row[k] for k in keys] for row in metrics(tmp_path / "split").values()] == \
        [[row[k] for k in keys] for row in metrics(tmp_path / "straight").values()]
    for k, v in straight.discriminator.state_dict().items():
        assert torch.equal(v, resumed.discriminator.state_dict()[k]), k
