"""Fixtures of the models/ tests: loaded tiny pipelines and an exact (analytic) flow-matching model."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    """One intra-op thread: the tiny models are latency-bound, and on a loaded 2-core machine two threads make
    each matmul wait for the busy core (measured 3-30x slower). A module may override this fixture to test with
    the session's thread count (the generator's batch-invariance tests do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_pipe(tiny_teacher_dir):
    from tbcm.models.pipeline import load_pipeline

    return load_pipeline(tiny_teacher_dir)


@pytest.fixture(scope="session")
def student_pipe(tiny_student_dir):
    from tbcm.models.pipeline import load_pipeline

    return load_pipeline(tiny_student_dir)


def exact_flow_model(x0: torch.Tensor):
    """The ideal rectified-flow model when the data is the single point x0 (unit-variance units): from
    x_fm = (1 - s) x0 + s eps the noise is eps = (x_fm - (1 - s) x0) / s, and v = eps - x0."""
    def v(x_fm: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        assert s.shape == (len(x_fm),)
        sc = s.view(-1, *([1] * (x_fm.ndim - 1))).to(x_fm.dtype)
        return (x_fm - (1 - sc) * x0) / sc - x0
    return v


@pytest.fixture
def exact_flow():
    return exact_flow_model
