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


@pytest.fixture(scope="session")
def teacher_pipe(tiny_teacher_dir):
    from tbcm.models.pipeline import load_pipeline

    return load_pipeline(tiny_teacher_dir)


@pytest.fixture(scope="session")
def student_pipe(tiny_student_dir):
    from tbcm.models.pipeline import load_pipeline

    return load_pipeline(tiny_student_dir)


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny models are latency-bound, and on a loaded 2-core machine two threads make
    each matmul wait for the busy core (measured 3-30x slower). The models/ and world/ tests use it throughout."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
