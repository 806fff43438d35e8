"""The cache of the fixed evaluators (:class:`selfflow_core.EvaluatorCache`): trained once, then
loaded; refused when the weights or the settings no longer match their record; never half
written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from selfflow_core import (
    EvaluatorCache,
    EvaluatorCacheError,
    SelfFlowError,
    default_cache_dir,
    settings_key,
    weights_sha256,
)


class Toy:
    """An evaluator: a network and its record."""

    def __init__(self, net: nn.Module, info: dict) -> None:
        self.net, self.info = net, info


class ToyCacheError(EvaluatorCacheError):
    """The toy evaluator's own error."""


CACHE = EvaluatorCache(kind="toy_evaluator", version=3, stem="toy", name="toy evaluator",
                       error=ToyCacheError)
SETTINGS = {"version": 3, "width": 4, "seed": 1}


class Trainer:
    """A train function that counts its calls."""

    def __init__(self, settings: dict = SETTINGS) -> None:
        self.settings, self.calls = settings, 0

    def __call__(self) -> Toy:
        self.calls += 1
        torch.manual_seed(self.settings["seed"])
        return Toy(nn.Linear(self.settings["width"], 2), {"settings": self.settings, "acc": 0.9})


def load(cache_dir: Path, train: Trainer, settings: dict = SETTINGS, **kw) -> Toy:
    return CACHE.load_or_train(settings, train=train, empty=lambda: nn.Linear(settings["width"], 2),
                               wrap=Toy, cache_dir=cache_dir, **kw)


def test_trained_once_then_loaded_from_the_cache(tmp_path, capsys):
    train = Trainer()
    first = load(tmp_path, train)
    assert train.calls == 1
    out = capsys.readouterr().out
    folder = tmp_path / "toy_evaluator" / "v3" / settings_key(SETTINGS)
    assert out == f"training the toy evaluator once (cached in {folder}) ...\n"
    assert sorted(p.name for p in folder.iterdir()) == ["toy.json", "toy.pt"]
    record = json.loads((folder / "toy.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / "toy.pt").read_bytes()).hexdigest()
    assert record["sha256"] == first.info["sha256"] == weights_sha256(first.net)
    assert record["settings"] == SETTINGS and record["acc"] == 0.9

    again = load(tmp_path, train)
    assert train.calls == 1 and capsys.readouterr().out == ""
    assert again.info == record
    for a, b in zip(again.net.state_dict().values(), first.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    load(tmp_path / "quiet", Trainer(), progress=False)
    assert capsys.readouterr().out == ""


def test_tampered_weights_are_refused_with_the_plugins_error(tmp_path):
    load(tmp_path, Trainer())
    folder = CACHE.folder(SETTINGS, tmp_path)
    data = bytearray((folder / "toy.pt").read_bytes())
    data[-20] ^= 0xFF
    (folder / "toy.pt").write_bytes(bytes(data))
    train = Trainer()
    with pytest.raises(ToyCacheError, match="does not match its record") as info:
        load(tmp_path, train)
    assert isinstance(info.value, SelfFlowError) and isinstance(info.value, RuntimeError)
    assert str(folder) in str(info.value) and "to train it again" in str(info.value)
    assert train.calls == 0  # refused, not silently retrained


def test_a_record_of_other_settings_is_refused(tmp_path):
    load(tmp_path, Trainer())
    record = CACHE.folder(SETTINGS, tmp_path) / "toy.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "settings": {**SETTINGS, "seed": 2}}))
    with pytest.raises(EvaluatorCacheError, match="or other settings"):
        load(tmp_path, Trainer())


def test_other_settings_are_another_entry(tmp_path):
    other = {**SETTINGS, "seed": 2}
    assert settings_key(other) != settings_key(SETTINGS)
    assert settings_key(dict(reversed(SETTINGS.items()))) == settings_key(SETTINGS)
    train = Trainer(other)
    load(tmp_path, Trainer())
    load(tmp_path, train, other)
    assert train.calls == 1
    assert CACHE.folder(other, tmp_path) != CACHE.folder(SETTINGS, tmp_path)
    assert {p.name for p in (tmp_path / "toy_evaluator" / "v3").iterdir()} == {
        settings_key(SETTINGS), settings_key(other)}


def test_a_failing_training_leaves_no_entry(tmp_path):
    def fails() -> Toy:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        CACHE.load_or_train(SETTINGS, train=fails, empty=lambda: nn.Linear(4, 2), wrap=Toy,
                            cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "toy_evaluator").exists()

    def unrecordable() -> Toy:  # the record cannot be written: nothing is
        return Toy(nn.Linear(4, 2), {"settings": SETTINGS, "when": object()})

    with pytest.raises(TypeError):
        CACHE.load_or_train(SETTINGS, train=unrecordable, empty=lambda: nn.Linear(4, 2),
                            wrap=Toy, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "toy_evaluator").exists()
    train = Trainer()
    load(tmp_path, train)  # and the next use trains it
    assert train.calls == 1


def test_a_failing_write_leaves_no_entry(tmp_path, monkeypatch):
    import selfflow_core.eval.cached as cached

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cached.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        load(tmp_path, Trainer(), progress=False)
    folder = CACHE.folder(SETTINGS, tmp_path)
    assert list(folder.iterdir()) == []  # no weights, no record, no temporary file


def test_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFFLOW_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert CACHE.folder(SETTINGS) == tmp_path / "explicit" / "toy_evaluator" / "v3" / (
        settings_key(SETTINGS))
    monkeypatch.delenv("SELFFLOW_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "selfflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "selfflow"
    assert CACHE.folder(SETTINGS, tmp_path / "given").parent.parent.parent == tmp_path / "given"
