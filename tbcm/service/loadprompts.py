"""Prompts for load tests: unique by default, so a load test measures text encoding as users cause it, not the
service's encoded-prompt cache (a handful of fixed prompts are all cache hits after the first few requests).

`PromptMix` draws each prompt either as a repeat of one already sent (with probability `repeat_ratio`) or as a new
one: the next line of a prompt file (shuffled; repeats once the file is used up), or else a caption of one or two
shapes from a small grammar of its own (129 600 distinct captions, in the shapes world's words, of at most 13
encoder tokens, so they fit the tiny test models too). It counts what it sent and how much of it was repeated.
"""
from __future__ import annotations

import random
from pathlib import Path

SIZES = ("small", "medium", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle", "cross")
PLACES = ("left", "right", "top", "bottom", "center")


def _shape(rng: random.Random) -> tuple[str, str, str, str]:
    return rng.choice(SIZES), rng.choice(COLOURS), rng.choice(KINDS), rng.choice(PLACES)


def caption(rng: random.Random) -> str:
    """One shape ('a small red circle on the left') or two different ones ('a small red circle left, a large blue
    square top')."""
    first = _shape(rng)
    if rng.random() < 0.5:
        return "a {} {} {} on the {}".format(*first)
    second = _shape(rng)
    while second == first:
        second = _shape(rng)
    return "a {} {} {} {}, a {} {} {} {}".format(*first, *second)


MAX_DRAWS = 64  # tries for a caption not sent yet, before a repeat is accepted (only once nearly all were sent)


class PromptMix:
    def __init__(self, seed: int = 0, repeat_ratio: float = 0.0, prompt_file: str = ""):
        if not 0.0 <= repeat_ratio <= 1.0:
            raise ValueError(f"repeat_ratio must be between 0 and 1, got {repeat_ratio}")
        self.rng, self.repeat_ratio = random.Random(seed), repeat_ratio
        self.file_prompts: list[str] = []
        if prompt_file:
            self.file_prompts = [line.strip() for line in Path(prompt_file).read_text().splitlines()
                                 if line.strip()]
            if not self.file_prompts:
                raise ValueError(f"prompt file {prompt_file} holds no prompts")
            self.rng.shuffle(self.file_prompts)
        self._line = 0  # the next line of the prompt file
        self.sent: list[str] = []
        self._seen: set[str] = set()
        self.repeated = 0

    def _new(self) -> str:
        if self.file_prompts:
            self._line += 1
            return self.file_prompts[(self._line - 1) % len(self.file_prompts)]
        for _ in range(MAX_DRAWS):
            prompt = caption(self.rng)
            if prompt not in self._seen:
                break
        return prompt

    def next(self) -> str:
        if self.sent and self.rng.random() < self.repeat_ratio:
            prompt = self.rng.choice(self.sent)
        else:
            prompt = self._new()
        if prompt in self._seen:
            self.repeated += 1
        else:
            self._seen.add(prompt)
            self.sent.append(prompt)
        return prompt

    def counts(self) -> tuple[int, int]:
        """(new prompts, repeats) sent so far: pass to `stats` to report only what was sent after this point."""
        return len(self.sent), self.repeated

    def stats(self, since: tuple[int, int] = (0, 0)) -> dict:
        """What was sent since `since` (a `counts()`; default: ever). One mix shared by several runs (a sweep's
        probes, a benchmark's phases) never sends a later run the earlier runs' prompts as new ones."""
        new, repeated = len(self.sent) - since[0], self.repeated - since[1]
        total = new + repeated
        return {"sent": total, "distinct": new, "repeated": repeated,
                "repeat_fraction": round(repeated / total, 4) if total else 0.0,
                "repeat_ratio_asked": self.repeat_ratio}
