"""`tbcm distill`, `tbcm rollout`, `tbcm export`: the TBCM trainer (filled in by distill/)."""
from __future__ import annotations


def register(sub) -> None:
    return None
