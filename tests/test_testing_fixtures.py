"""The opt-in fixtures plugin ``selfflow_core.testing.fixtures`` (enabled in tests/conftest.py)."""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import numpy as np
import torch

from selfflow_core.data.store import open_store
from selfflow_core.testing import TINY_TOY, torch_threads


def test_one_thread_pins_torch_to_one_thread(one_thread):
    assert torch.get_num_threads() == 1


def test_torch_threads_restores_the_previous_count():
    with torch_threads(1):
        with torch_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        try:
            with torch_threads(2):
                raise RuntimeError("restored on errors too")
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 1


def test_core_components_load_no_installed_plugin(core_components):
    assert set(core_components.pm.providers) == {"selfflow_core.builtin.plugin"}
    assert {core_components.modalities.provider(k).distribution
            for k in core_components.modalities} == {"selfflow"}


def test_components_load_the_installed_plugins(components, core_components):
    if os.environ.get("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD"):
        assert set(components.pm.providers) == set(core_components.pm.providers)
        return
    blocked = {b.strip() for b in os.environ.get("SELFFLOW_BLOCK_PLUGINS", "").split(",")}
    installed = {ep.name for ep in md.entry_points(group="selfflow")} - blocked
    assert installed <= set(components.pm.providers)
    assert components is not core_components


def test_toy_store_is_a_complete_store_of_the_tiny_toy(toy_store):
    store = open_store(toy_store)
    assert len(store) == TINY_TOY.count == 64
    adapter = TINY_TOY.build()
    got = store.read(np.arange(3))
    want = adapter.encode(adapter.open_source("waves").read(0, 3))
    assert set(got) == set(adapter.fields())
    for name, arr in want.items():
        np.testing.assert_array_equal(got[name], arr)


def test_selfflow_cache_points_at_a_folder(selfflow_cache):
    assert Path(os.environ["SELFFLOW_CACHE"]) == selfflow_cache and selfflow_cache.is_dir()
