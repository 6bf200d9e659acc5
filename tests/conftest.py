"""Shared fixtures: tiny pipeline folders of the real classes, saved to and loaded from disk."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    from models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "teacher", student=False)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    from models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "student", student=True, seed=1)
