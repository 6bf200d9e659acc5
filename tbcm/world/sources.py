"""The embedded world as what a distillation run takes from outside (`tbcm distill --prompts world`): training
captions to roll the teacher out on, fixed captions for sample grids, rendered scenes with their captions for
the data-based baseline, and the shipped evaluator's FD and attribute accuracy of a one-step student. The command
line wires them into the trainer (tbcm/cli/distill.py); nothing here knows the trainer.
"""
from __future__ import annotations

import random

import torch

from tbcm.models.pipeline import Pipeline
from tbcm.world import world
from tbcm.world.evaluate import EvalConfig, evaluate

TRAINING_CAPTIONS = 20000  # distinct training-split scenes the prompts are drawn from
SPLITS = ("train", "heldout")  # training and held-out attribute combinations
STUDENT_METRICS = ("fd", "precision", "recall", "accuracy", "nfe", "images_per_s")


def training_captions(seed: int, count: int = TRAINING_CAPTIONS) -> list[str]:
    """Captions of `count` training-split scenes, a pure function of the seed."""
    return [world.sample_scene(seed * 10**7 + i, "train").caption for i in range(count)]


def sample_captions(count: int) -> list[str]:
    """Fixed captions for sample grids, alternating the training and held-out splits."""
    return [world.sample_scene(i, "heldout" if i % 2 else "train").caption for i in range(count)]


class SceneImages:
    """Fresh training-split scenes, rendered: each draw's seeds come from Python's global generator."""

    def sample(self, n: int, size: int) -> tuple[list[str], torch.Tensor]:
        scenes = [world.sample_scene(random.randrange(2**31), "train") for _ in range(n)]
        return [scene.caption for scene in scenes], world.render_tensor(scenes, size)


def student_metrics(student: Pipeline, n: int, split: str) -> dict:
    """1-step FD, precision and recall, attribute accuracy, NFE and images/s of a student on n prompts of a split
    (`tbcm eval`'s)."""
    result = evaluate(EvalConfig(model="student", steps=1, prompts=split, n=n), student)
    return {key: result[key] for key in STUDENT_METRICS}
