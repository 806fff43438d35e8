"""Tests of selfflow-timeseries: the core's contract kit, the layout, and a few training steps.

Run with ``python -m pytest tests -q`` after ``pip install -e .`` (the entry-point checks need the
distribution installed).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from selfflow_core import (
    Components,
    ConfigError,
    ModalityConfig,
    Trainer,
    make_converter,
    sample_checkpoint,
    structure,
)
from selfflow_core.testing import ModalityContract, ModalityPluginContract
from selfflow_core.testing.fixtures import one_thread  # noqa: F401  (a fixture, used below)

from selfflow_timeseries.adapter import TimeseriesModality

# tiny tensors: more intra-op threads only add overhead (and thrash a shared machine)
pytestmark = pytest.mark.usefixtures("one_thread")


# Expected shapes and labels come from the config (``TimeseriesModality.Config()`` and the presets),
# never from its defaults written out: change ``length``, ``channels``, ``patch``, ``classes`` or
# ``noise`` in adapter.py or presets.py and these tests still check the right thing.

# ---- the contract every modality satisfies ----------------------------------------------------

class TestTimeseriesContract(ModalityContract):
    config = TimeseriesModality.Config(count=16)


class TestTimeseriesContractUnconditional(ModalityContract):
    config = TimeseriesModality.Config(channels=1, length=32, patch=8, classes=0, count=8)


# ---- the plugin: entry point, config round trips, valid presets, debug_tiny trains ------------

class TestTimeseriesPlugin(ModalityPluginContract):
    modality = "timeseries"
    distribution = "selfflow-timeseries"
    config_class = TimeseriesModality.Config
    presets = ("timeseries",)


def test_config_errors_name_the_field():
    conv = make_converter(Components())
    cfg = structure(conv, {"kind": "timeseries", "length": 32, "patch": 8}, ModalityConfig)
    assert cfg == TimeseriesModality.Config(length=32, patch=8)
    with pytest.raises(ConfigError, match=r"\$\.length.*multiple of patch 4"):
        structure(conv, {"kind": "timeseries", "length": 30, "patch": 4}, ModalityConfig)
    with pytest.raises(ConfigError, match=r"\$\.channels"):
        structure(conv, {"kind": "timeseries", "channels": 0}, ModalityConfig)


# ---- data and layout --------------------------------------------------------------------------

def test_source_is_deterministic_and_labelled():
    cfg = TimeseriesModality.Config(count=10)
    src = cfg.build().open_source("sensors")
    assert len(src) == 10
    whole, part = src.read(0, 10), src.read(3, 7)
    np.testing.assert_array_equal(part["signals"], whole["signals"][3:7])
    assert whole["labels"].tolist() == [i % max(cfg.classes, 1) for i in range(10)]
    assert whole["signals"].shape == (10, cfg.channels, cfg.length)
    assert whole["signals"].dtype == np.float32 and whole["labels"].dtype == np.int64
    # two sinusoids of amplitude <= 1 and <= 0.4, plus noise of std `noise` (6 sigma: never hit)
    bound = 1.4 + 6 * cfg.noise
    assert np.isfinite(whole["signals"]).all() and np.abs(whole["signals"]).max() < bound


def test_tokens_are_patches_of_time_steps():
    adapter = TimeseriesModality.Config(channels=2, length=8, patch=4, classes=4).build()
    x = torch.arange(2 * 2 * 8, dtype=torch.float32).reshape(2, 2, 8)
    batch = adapter.tokenize({"latents": x, "labels": torch.tensor([1, 3])})
    assert batch.tokens.shape == (2, 2, 8) and adapter.token_dim == 8
    # token 1 of sample 0 holds steps 4..7 of channel 0, then steps 4..7 of channel 1
    assert batch.tokens[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert batch.positions[0, :, 0].tolist() == [0.0, 1.0]
    assert batch.labels.tolist() == [1, 3]
    assert torch.equal(adapter.detokenize(batch.tokens), x)


def test_array_source(tmp_path: Path):
    cfg = TimeseriesModality.Config(scale=0.5)
    shape = (cfg.channels, cfg.length)  # what a sample of the config is
    signals = np.random.default_rng(0).normal(size=(5, *shape)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", signals=signals, labels=np.arange(5))
    adapter = cfg.build()
    src = adapter.open_source(str(tmp_path / "mine.npz"))
    assert type(src).__name__ == "ArraySource" and len(src) == 5
    out = adapter.encode(src.read(1, 3))
    assert out["latents"].shape == (2, *shape) and out["latents"].dtype == np.float32
    np.testing.assert_allclose(out["latents"], signals[1:3] * 0.5)
    assert out["labels"].tolist() == [1, 2]
    np.save(tmp_path / "bad.npy", np.concatenate([signals, signals[:, :1]], axis=1))  # +1 channel
    with pytest.raises(ValueError, match=rf"expected \[N, {cfg.channels}, {cfg.length}\]"):
        adapter.open_source(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="unknown source"):
        adapter.open_source("accelerometer")


# ---- a few training steps ---------------------------------------------------------------------

def test_train_a_few_steps_and_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    components = Components()
    config = attrs.evolve(components.presets.get("timeseries_debug_tiny")(), steps=6)
    modality = config.modalities["timeseries"].modality  # the preset's config: shapes, classes
    summary = Trainer(config, components=components, progress=False).fit()
    assert summary["step"] == 6 and summary["reason"] == "done"
    assert np.isfinite(summary["final_loss"])
    samples = sorted((tmp_path / config.run_dir / "samples").rglob("samples.*"))
    assert [p.name for p in samples] == ["samples.npz", "samples.svg"]
    ckpt = max((tmp_path / config.run_dir / "checkpoints").glob("step-*.pt"))
    paths = sample_checkpoint(ckpt, components, out_dir=str(tmp_path / "again"), count=4,
                              steps=2)
    with np.load(next(p for p in paths if p.suffix == ".npz")) as data:
        assert data["signals"].shape == (4, modality.channels, modality.length)
        assert np.isfinite(data["signals"]).all()
        if modality.classes:  # classes cycled; an unconditional model writes no labels
            assert data["labels"].tolist() == [i % modality.classes for i in range(4)]
        else:
            assert "labels" not in data.files
