"""Every error type the project raises survives pickling with its message and fields: errors
cross process boundaries (multiprocessing pools, loader workers, torchrun), and one that cannot
be unpickled hangs a pool instead of reporting."""

from __future__ import annotations

import pickle

import pytest

from selfflow_core.cli.scaffold import ScaffoldError
from selfflow_core.config.converter import ConfigError
from selfflow_core.data.check import StoreError
from selfflow_core.errors import CheckpointError
from selfflow_core.plugins.manager import PluginLoadError
from selfflow_core.plugins.registry import DuplicateComponentError, UnknownComponentError
from selfflow_core.runtime.guard import RunDirInUse
from selfflow_core.runtime.locking import LockHeld
from selfflow_core.trainer import NonFiniteLossError

ERRORS = [
    StoreError("data/x.zarr", ["latents: chunk 3 damaged", "labels: missing"]),
    LockHeld("data/x.zarr.lock", (123, "host")),
    LockHeld("data/x.zarr.lock", None),
    ConfigError(["$.steps: expected int"], "run.toml"),
    CheckpointError("bad checkpoint"), PluginLoadError("plugin x failed"),
    UnknownComponentError("unknown kind"), DuplicateComponentError("twice"),
    RunDirInUse("in use"), ScaffoldError("bad name"), NonFiniteLossError("nan at step 3"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)


def test_repa_encoder_error_survives_pickling():
    teacher = pytest.importorskip("selfflow_repa.teacher")
    error = teacher.EncoderError("missing file x.pt")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is teacher.EncoderError and str(back) == str(error)
