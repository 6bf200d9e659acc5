"""Fixtures of the world/ tests."""
import pytest


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One intra-op thread (tests/conftest.py)."""
