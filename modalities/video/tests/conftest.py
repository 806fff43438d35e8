"""Run each test with one intra-op torch thread: the models here are tiny, and on a small shared
CPU two spinning OpenMP threads can be many times slower than one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
