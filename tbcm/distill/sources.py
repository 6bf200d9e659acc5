"""What a distillation run takes from outside: its prompts, captioned images for the data-based baseline, and an
evaluator. The trainer knows no domain; the command line wires one (tbcm/cli/distill.py): the embedded shapes
world for `--prompts world`, or a prompt file and nothing else, as for a real teacher.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from tbcm.models.pipeline import Pipeline

SAMPLE_PROMPTS = 8  # prompts of each sample grid


class CaptionedImages(Protocol):
    """Real images with their captions (`--pairs data`, Sana-Sprint's sCM on data)."""

    def sample(self, n: int, size: int) -> tuple[list[str], torch.Tensor]:
        """n captions and their images (n, 3, size, size) in [-1, 1]; any randomness from Python's or torch's
        global generators, which checkpoints carry."""


# Score a one-step student on n prompts of one split: -> {metric: number}, e.g. {"fd": ..., "accuracy": ...}
Evaluate = Callable[[Pipeline, int, str], dict]


@dataclass(frozen=True)
class Evaluator:
    evaluate: Evaluate
    splits: tuple[str, ...]  # the prompt splits it scores: periodic evals use the first, the export manifest all


@dataclass(frozen=True)
class Sources:
    prompts: list[str]                     # what the teacher is rolled out on (TBCM pairs, `tbcm rollout`)
    sample_prompts: list[str]              # the fixed prompts of the sample grids
    images: CaptionedImages | None = None  # captioned images for --pairs data; None: the run is image-free
    evaluator: Evaluator | None = None     # None: periodic evals are skipped and the manifest says none was run


def read_prompt_file(path: str) -> list[str]:
    """A prompt file: one prompt per line, blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: file not found") from None
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file (one per line expected)")
    return prompts


def prompt_file_sources(path: str) -> Sources:
    """A prompt file alone: rollouts and sample grids on its prompts, no images, no evaluator."""
    prompts = read_prompt_file(path)
    return Sources(prompts, prompts[:SAMPLE_PROMPTS])
