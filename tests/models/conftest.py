"""Fixtures of the models/ tests: one thread each, and an exact (analytic) flow-matching model."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One intra-op thread (tests/conftest.py); a module may override this fixture to test with the session's
    thread count (the generator's batch-invariance tests do)."""


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
