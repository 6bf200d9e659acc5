"""Kernel tests run on CUDA when present, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, before the test
modules import `kernels` (the package also sets it itself when CUDA is absent).
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the repository root, for runs that do not start in it (`python -m pytest` adds it already)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
