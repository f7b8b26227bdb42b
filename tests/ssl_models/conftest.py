import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every model test here uses tiny tensors (see tests/conftest.py's one_thread)."""
