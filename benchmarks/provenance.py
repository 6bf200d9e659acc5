"""What a benchmark measured and how to measure it again: the SHA-256 of a pipeline folder's transformer weights
(tools/docs_table.py compares it with the shipped folder's before it calls a number current) and the command as
anyone can rerun it from the repository root (no path of this machine)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tbcm.distill.teacher import file_sha256


def transformer_sha256(folder: str | Path) -> str:
    return file_sha256(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")


def command() -> str:
    """`python -m benchmarks.NAME ARGS...` of the running benchmark."""
    return shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])
