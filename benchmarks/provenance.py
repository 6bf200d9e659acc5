"""What a benchmark measured: the SHA-256 of a pipeline folder's transformer weights, which tools/docs_table.py
compares with the shipped folder's before it calls a number current."""
from __future__ import annotations

from pathlib import Path

from tbcm.distill.teacher import file_sha256


def transformer_sha256(folder: str | Path) -> str:
    return file_sha256(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")
