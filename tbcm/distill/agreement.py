"""Teacher agreement: how closely a student reproduces its teacher, measured with no evaluator, so any teacher and
any prompts (a prompt file, a Sana folder) get a number.

Image i is prompt i (the prompts cycled) with seed i, from the same noise for both models (the generator draws it
from the seed): the teacher's image at its default steps with its folder's scheduler and CFG, and the student's at
1, 2 and 4 steps (embedded guidance, as SanaSprintPipeline samples). Per student step count: the PSNR of the
student's images against the teacher's over all pixels (uint8, peak 255), and the mean squared difference of the
decoded latents, scaled as the transformer sees them (latent x scaling_factor, about unit variance). The teacher's
images are made once (`teacher_reference`) and reused at every periodic evaluation and at export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tbcm.models.generator import DEFAULT_GUIDANCE, TEACHER_DEFAULT_STEPS, Generator
from tbcm.models.pipeline import Pipeline

NAME = "teacher-agreement"  # its name in the manifest's "evaluations"
STUDENT_STEPS = (1, 2, 4)
MAX_PSNR_DB = 100.0  # the PSNR of identical images (a zero MSE), kept finite for JSON


@dataclass(frozen=True)
class TeacherReference:
    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor   # uint8 (n, H, W, 3)
    latents: torch.Tensor  # float32 (n, C, h, w)


def teacher_reference(teacher: Pipeline, prompts: list[str], n: int) -> TeacherReference:
    """The teacher's n images (prompt i mod len(prompts), seed i) at its default steps and guidance 4.5."""
    if not prompts or n < 1:
        raise ValueError(f"teacher agreement needs prompts and n >= 1, got {len(prompts)} prompts and n = {n}")
    chosen, seeds = [prompts[i % len(prompts)] for i in range(n)], list(range(n))
    out = Generator(teacher).generate(chosen, seeds, TEACHER_DEFAULT_STEPS, DEFAULT_GUIDANCE, keep_latents=True)
    return TeacherReference(chosen, seeds, out.images, out.latents)


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> float:
    """10 log10(255^2 / MSE) over every pixel of two uint8 image batches (at most MAX_PSNR_DB)."""
    mse = float(((images.double() - reference.double()) ** 2).mean())
    return MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10 * math.log10(255.0**2 / mse))


def teacher_agreement(student: Pipeline, reference: TeacherReference) -> dict:
    """{"n", "teacher_steps", "guidance", "steps": {"1": {"psnr_db", "latent_mse"}, "2": ..., "4": ...}}."""
    generator = Generator(student)
    steps = {}
    for count in STUDENT_STEPS:
        out = generator.generate(reference.prompts, reference.seeds, count, DEFAULT_GUIDANCE, keep_latents=True)
        steps[str(count)] = {"psnr_db": psnr_db(out.images, reference.images),
                             "latent_mse": float(((out.latents - reference.latents) ** 2).mean())}
    return {"n": len(reference.prompts), "teacher_steps": TEACHER_DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
            "steps": steps}
