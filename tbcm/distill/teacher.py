"""The frozen teacher of a distillation run: loaded and checked once, and fingerprinted by the SHA-256 of its
transformer weights (rollout shards and export manifests record it)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tbcm.models.pipeline import Pipeline, load_pipeline

from tbcm.distill.config import DistillConfig


def load_teacher(config: DistillConfig, device="cpu") -> Pipeline:
    """`config.teacher` with nothing trainable, its text encoder batching `config.text_microbatch` captions."""
    teacher = load_pipeline(config.teacher, device=device)
    if teacher.is_student:
        raise ValueError(f"--teacher {config.teacher}: has a guidance embedding (a student); need a CFG teacher")
    teacher.transformer.requires_grad_(False)
    teacher.vae.requires_grad_(False)
    teacher.text.microbatch = config.text_microbatch
    return teacher


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def portable_path(path: str | None) -> str | None:
    """A path as a manifest records it: never absolute (a manifest names no folder of the machine it was made on),
    but relative to the current directory: "runs/x" for a path inside it, "../runs/x" beside it."""
    if not path or not Path(path).is_absolute():
        return path
    return os.path.relpath(path)


def teacher_fingerprint(teacher: Pipeline) -> dict:
    weights = sorted((teacher.path / "transformer").glob("*.safetensors"))
    return {"path": portable_path(str(teacher.path)), "transformer_sha256": {p.name: file_sha256(p) for p in weights}}
