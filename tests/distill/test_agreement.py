"""Teacher agreement against plain recomputations: the teacher's and the student's images from the same seeds,
PSNR by numpy's formula, latent MSE against the decoded latents."""
import numpy as np
import pytest
import torch

from tbcm.distill.agreement import MAX_PSNR_DB, STUDENT_STEPS, psnr_db, teacher_agreement, teacher_reference
from tbcm.distill.student import student_from_teacher, student_pipeline
from tbcm.models.generator import TEACHER_DEFAULT_STEPS, Generator


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def test_psnr_is_the_pooled_pixel_psnr():
    a = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    b = (a.int() + torch.randint(-9, 10, a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    assert psnr_db(a, b.to(torch.uint8)) == pytest.approx(numpy_psnr(a.numpy(), b.numpy()), rel=1e-12)
    assert psnr_db(a, a) == MAX_PSNR_DB


def test_agreement_compares_each_student_step_count_with_the_teachers_image_from_the_same_seed(teacher_pipe):
    torch.manual_seed(0)
    transformer = student_from_teacher(teacher_pipe.transformer).eval()
    torch.nn.init.normal_(transformer.time_embed.guidance_embedder.linear_2.weight, std=0.5)
    student = student_pipeline(teacher_pipe, transformer)
    prompts = ["a red circle", "a blue square"]
    reference = teacher_reference(teacher_pipe, prompts, 3)
    assert reference.prompts == ["a red circle", "a blue square", "a red circle"] and reference.seeds == [0, 1, 2]
    teacher = Generator(teacher_pipe).generate(reference.prompts, [0, 1, 2], TEACHER_DEFAULT_STEPS, keep_latents=True)
    assert torch.equal(reference.images, teacher.images)
    result = teacher_agreement(student, reference)
    assert list(result["steps"]) == [str(s) for s in STUDENT_STEPS] and result["n"] == 3
    for steps, row in result["steps"].items():
        out = Generator(student).generate(reference.prompts, [0, 1, 2], int(steps), keep_latents=True)
        assert row["psnr_db"] == pytest.approx(numpy_psnr(out.images.numpy(), teacher.images.numpy()))
        assert row["latent_mse"] == pytest.approx(float(((out.latents - teacher.latents) ** 2).mean()))
        assert 0 < row["latent_mse"] and row["psnr_db"] < MAX_PSNR_DB  # a student is not its teacher
    with pytest.raises(ValueError, match="teacher agreement needs prompts and n >= 1"):
        teacher_reference(teacher_pipe, prompts, 0)

