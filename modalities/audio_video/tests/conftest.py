"""Test setup: one intra-op torch thread (tiny models; on a small shared CPU two spinning OpenMP
threads can be many times slower than one) and a fresh spoken-digits cache for the session
(``SELFFLOW_CACHE``, unless the caller set one), so tests never touch ``~/.cache``. (The kit's
fixtures are imported: pytest refuses ``pytest_plugins`` in a conftest that is not top-level.)"""

import pytest

from selfflow_core.testing.fixtures import one_thread as one_thread
from selfflow_core.testing.fixtures import selfflow_cache as selfflow_cache


@pytest.fixture(autouse=True)
def _isolated(selfflow_cache, one_thread):
    """Every test here runs on one torch thread, with the session's cache."""
