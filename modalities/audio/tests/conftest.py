"""Test setup: one intra-op torch thread (tiny models; on a small shared CPU two spinning OpenMP
threads can be many times slower than one) and a fresh spoken-digits cache for the session
(``SELFFLOW_CACHE``, unless the caller set one), so tests never touch ``~/.cache``."""

import os
import shutil
import tempfile

import pytest
import torch

_made: list[str] = []


def pytest_configure(config):
    if not os.environ.get("SELFFLOW_CACHE"):
        _made.append(tempfile.mkdtemp(prefix="selfflow-test-cache-"))
        os.environ["SELFFLOW_CACHE"] = _made[-1]


def pytest_unconfigure(config):
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get("SELFFLOW_CACHE") == path:
            del os.environ["SELFFLOW_CACHE"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
