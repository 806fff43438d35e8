"""Opt-in pytest fixtures for selfflow tests (the core's and plugins').

Enable them in your top-level ``conftest.py``::

    pytest_plugins = ["selfflow_core.testing.fixtures"]

pytest refuses ``pytest_plugins`` in a conftest that is not top-level (a plugin inside a larger
tree whose tests run together, as ``pytest modalities plugins`` does here); import the fixtures
you use into that conftest or test module instead (the redundant alias marks a re-export)::

    from selfflow_core.testing.fixtures import one_thread as one_thread

Nothing here is autouse: enabling the plugin changes no test by itself. To run every test of a
folder on one torch thread, request the fixture from an autouse fixture of that folder's
conftest (or mark a module: ``pytestmark = pytest.mark.usefixtures("one_thread")``)::

    @pytest.fixture(autouse=True)
    def _one_thread(one_thread):
        \"\"\"Every test here runs on one torch thread.\"\"\"

Fixtures:

- ``one_thread``: torch pinned to one intra-op thread for the test, the previous count restored
  after (tiny models: on a small shared CPU, spinning OpenMP threads can be many times slower
  than one). Module- or class-scoped fixtures that train use :func:`torch_threads` instead.
- ``components``: fresh :class:`Components` with the installed plugins (entry points, unless
  ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD`` is set).
- ``core_components``: fresh :class:`Components` of the core's built-ins only (entry points off).
- ``toy_store`` (session): the path (a ``str``) of a complete store of :data:`TINY_TOY`
  (source ``waves``), shared read-only: give runs ``store=toy_store, source=""``.
- ``selfflow_cache`` (session): ``$SELFFLOW_CACHE`` pointed at a fresh folder, removed at the
  end, unless the caller set one, so that sources' caches never touch ``~/.cache``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from selfflow_core.builtin.toy import ToyModality
from selfflow_core.config.converter import make_converter, to_data
from selfflow_core.data.writer import encode_store
from selfflow_core.plugins.manager import Components, make_plugin_manager

__all__ = ["TINY_TOY", "components", "core_components", "one_thread", "selfflow_cache",
           "torch_threads", "toy_store"]

#: the toy modality of the ``toy_store`` fixture: 64 samples of 8 tokens x 4 channels, 4 classes
TINY_TOY = ToyModality.Config(tokens=8, channels=4, classes=4, count=64)


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads; the previous count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for this test (restored after)."""
    with torch_threads(1):
        yield


@pytest.fixture
def components() -> Components:
    """Fresh components with the installed plugins (entry points)."""
    return Components()


@pytest.fixture
def core_components() -> Components:
    """Fresh components of the core's built-ins only: installed plugins are not loaded."""
    return Components(make_plugin_manager(entry_points=False))


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A complete store of :data:`TINY_TOY` (source ``waves``), shared read-only by the session:
    runs that read it name no source (``source=""``), so nothing writes to it."""
    path = tmp_path_factory.mktemp("toy-store") / "toy.zarr"
    encode_store(TINY_TOY.build(), "waves", path,
                 adapter_config=to_data(make_converter(), TINY_TOY), progress=False)
    return str(path)


@pytest.fixture(scope="session")
def selfflow_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$SELFFLOW_CACHE`` for the rest of the session: a fresh folder (removed at the end),
    unless the caller set one, which is kept."""
    if os.environ.get("SELFFLOW_CACHE"):
        yield Path(os.environ["SELFFLOW_CACHE"])
        return
    path = tmp_path_factory.mktemp("selfflow-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFFLOW_CACHE", str(path))
        yield path
    shutil.rmtree(path, ignore_errors=True)
