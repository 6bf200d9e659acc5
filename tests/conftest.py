"""Shared fixtures: tiny pipeline folders of the real classes, saved to and loaded from disk."""
from __future__ import annotations

import os

import pytest
import torch

# The kernels run in Triton's CPU interpreter when there is no CUDA. @triton.jit reads the switch when a kernel is
# defined, so it is set here, before any test module imports tbcm (the package itself never sets it).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    from tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "teacher", student=False)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    from tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "student", student=True, seed=1)
