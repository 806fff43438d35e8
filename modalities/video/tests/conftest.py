"""Run each test with one intra-op torch thread: the models here are tiny, and on a small shared
CPU two spinning OpenMP threads can be many times slower than one. (The kit's fixtures are
imported: pytest refuses ``pytest_plugins`` in a conftest that is not top-level.)"""

import pytest

from selfflow_core.testing.fixtures import one_thread as one_thread


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread."""
