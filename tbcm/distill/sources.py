"""What a distillation run takes from outside: its prompts, captioned images for the data-based baseline, and an
evaluator. The trainer knows no domain; the command line wires one (tbcm/cli/distill.py): the embedded shapes
world for `--prompts world`, or a prompt file and nothing else, as for a real teacher.
"""
from __future__ import annotations

import json
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
    evaluator: Evaluator | None = None     # None: evals hold teacher agreement only (tbcm/distill/agreement.py)


def _jsonl_prompt(path: str, number: int, line: str) -> str:
    """A JSONL line's prompt: an object's "prompt" string (other keys ignored) or a bare JSON string."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"--prompts {path}, line {number}: not JSON ({err.msg})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"--prompts {path}, line {number}: expected {{\"prompt\": \"...\"}} or a JSON string, "
                         f"got {line[:80]}")
    return prompt.strip()


def read_prompt_file(path: str) -> list[str]:
    """A prompt file: one prompt per line, blank lines skipped; a `.jsonl` file holds one JSON object with a
    "prompt" key (or one JSON string) per line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(number, line.strip()) for number, line in enumerate(handle, 1) if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: file not found") from None
    if not lines:
        raise ValueError(f"--prompts {path}: no prompts in the file (one per line expected)")
    if path.endswith(".jsonl"):
        return [_jsonl_prompt(path, number, line) for number, line in lines]
    return [line for _, line in lines]


def prompt_file_sources(path: str) -> Sources:
    """A prompt file alone: rollouts and sample grids on its prompts, no images, no evaluator."""
    prompts = read_prompt_file(path)
    return Sources(prompts, prompts[:SAMPLE_PROMPTS])
