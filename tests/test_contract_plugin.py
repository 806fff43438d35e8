"""The kit's plugin checks (``ModalityPluginContract``, ``check_discovered``,
``check_round_trip``, ``check_loss_lowered``) pass on a well-made installed plugin and fail on
broken ones. The plugins are fake installed distributions: a ``*.dist-info`` with a ``selfflow``
entry point in a folder put on ``sys.path`` for this module."""

from __future__ import annotations

import math
import sys
import textwrap

import attrs
import pytest

from selfflow_core.builtin.toy import ToyModality
from selfflow_core.testing import (
    ModalityPluginContract,
    check_discovered,
    check_loss_lowered,
    check_round_trip,
    installed_components,
)

#: a modality plugin: a toy adapter under its own kind and a ``<kind>_debug_tiny`` preset
PLUGIN = """
import attrs
from selfflow_core import (CheckpointConfig, DiT, ObjectiveConfig, OptimConfig, SamplingConfig,
                           hookimpl)
from selfflow_core.builtin.presets import toy
from selfflow_core.builtin.toy import ToyModality


class Adapter(ToyModality):
    name = {kind!r}

    @attrs.frozen(kw_only=True)
    class Config(ToyModality.Config):
        kind = {kind!r}
        {field}

        def build(self):
            return Adapter(self)


def debug_tiny():
    base = toy()
    spec = attrs.evolve(base.modalities["toy"], store="data/tiny.zarr", batch_size=16,
                        modality=Adapter.Config(tokens=8, channels=4, classes=4, count=64))
    return attrs.evolve(
        base, modalities={{{kind!r}: spec}}, backbone=DiT.Config(depth=2, width=32, heads=4),
        objective=ObjectiveConfig(student_layer=1, teacher_layer={teacher_layer}),
        optim=OptimConfig(lr={lr}, warmup_steps=2), steps=20, log_every=5,
        checkpoint=CheckpointConfig(every=1000, keep=1), sampling=SamplingConfig(count=2, steps=2),
        run_dir="runs/tiny")


@hookimpl
def selfflow_register_modalities(registry):
    {register}


@hookimpl
def selfflow_register_presets(registry):
    registry.add({kind!r} + "_debug_tiny", debug_tiny)
"""
GOOD = dict(field="", lr=3e-3, teacher_layer=2, register="registry.add(Adapter.Config)")
#: kind -> how its plugin differs from a good one
PLUGINS = {
    "fakewaves": {},
    # a field whose converter changes the value on every construction: no round trip
    "fakelossy": dict(field="level: int = attrs.field(default=0, converter=lambda v: int(v) + 1)"),
    # a learning rate that moves nothing: the preset does not train
    "fakestuck": dict(lr=1e-9),
    # the representation target past the backbone (layer 5 of 2 blocks): an invalid preset
    "fakeinvalid": dict(teacher_layer=5),
    # an entry point that registers no modality
    "fakeghost": dict(register="pass"),
}


@pytest.fixture(scope="module", autouse=True)
def fake_site(tmp_path_factory):
    """The fake distributions ``selfflow-<kind>``, installed for this module."""
    site = tmp_path_factory.mktemp("site")
    for kind, changes in PLUGINS.items():
        info = site / f"selfflow_{kind}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: selfflow-{kind}\n"
                                       f"Version: 0.1\n")
        (info / "entry_points.txt").write_text(f"[selfflow]\n{kind} = {kind}_plugin\n")
        source = PLUGIN.format(kind=kind, **{**GOOD, **changes})
        (site / f"{kind}_plugin.py").write_text(textwrap.dedent(source))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))               # also invalidates importlib's caches
        mp.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        mp.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)
        yield site
    for kind in PLUGINS:
        sys.modules.pop(f"{kind}_plugin", None)


def contract(kind: str, **attributes) -> ModalityPluginContract:
    """The contract for fake plugin ``kind`` (not collected: the name does not start with
    ``Test``)."""
    cls = type(f"{kind}Contract", (ModalityPluginContract,),
               {"modality": kind, "distribution": f"selfflow-{kind}", **attributes})
    return cls()


# ---- a well-made plugin passes every check ----------------------------------------------------

class TestFakeWavesPlugin(ModalityPluginContract):
    modality, distribution = "fakewaves", "selfflow-fakewaves"

    def test_the_run_used_the_tmp_folder(self, debug_tiny_run):
        root = debug_tiny_run.root
        assert debug_tiny_run.config.modalities["fakewaves"].store == str(root / "fakewaves.zarr")
        assert (root / "fakewaves.zarr").is_dir() and debug_tiny_run.run_dir == root / "run"
        assert debug_tiny_run.run_dir.is_dir() and debug_tiny_run.config.tracker.kind == "none"


# ---- "discovered through its entry point" -----------------------------------------------------

@pytest.mark.parametrize("kind, distribution, attributes, match", [
    ("fakewaves", "selfflow-notinstalled", {}, "no installed distribution 'selfflow-notinstalled'"),
    ("toy", "selfflow", {}, "no installed distribution 'selfflow'"),  # a built-in, no entry point
    ("toy", "selfflow-fakewaves", {}, "'toy' is provided by selfflow "),
    ("fakeghost", "selfflow-fakeghost", {}, "'fakeghost' is not registered"),
    ("fakewaves", "selfflow-fakewaves", {"config_class": ToyModality.Config},
     "registered as .*Adapter.Config"),
    ("fakewaves", "selfflow-fakewaves", {"presets": ("fakewaves_full",)},
     "preset 'fakewaves_full' is not registered"),
    ("fakewaves", "selfflow-fakewaves", {"presets": ("toy",)}, "preset 'toy' is provided by"),
])
def test_discovery_check_fails(kind, distribution, attributes, match):
    check = contract(kind, **attributes)
    check.distribution = distribution
    with pytest.raises(AssertionError, match=match):
        check.test_discovered_through_its_entry_point()


def test_check_discovered_works_for_other_categories():
    components = check_discovered("modalities", "fakewaves", "selfflow-fakewaves")
    assert components.modalities.provider("fakewaves").plugin == "fakewaves"
    with pytest.raises(AssertionError, match="tracker 'fakewaves' is not registered"):
        check_discovered("trackers", "fakewaves", "selfflow-fakewaves")


# ---- "config round-trips" ---------------------------------------------------------------------

def test_round_trip_check_fails_on_a_config_that_changes():
    with pytest.raises(AssertionError, match="changed in a round trip"):
        contract("fakelossy").test_config_round_trips()
    # the preset holds such a config too: it fails on its own
    lossy = contract("fakelossy", configs=())
    with pytest.raises(AssertionError, match="TrainerConfig changed in a round trip"):
        lossy.test_config_round_trips()
    contract("fakewaves").test_config_round_trips()


def test_round_trip_check_fails_on_data_that_does_not_structure_back():
    from selfflow_core import make_converter
    from selfflow_core.interfaces import ModalityConfig

    conv = make_converter(installed_components())
    good = ToyModality.Config(tokens=3)
    check_round_trip(conv, good, ModalityConfig)

    @attrs.frozen(kw_only=True)
    class Unregistered(ToyModality.Config):
        kind = "unregistered_kind"

    with pytest.raises(AssertionError, match="does not structure back"):
        check_round_trip(conv, Unregistered(), ModalityConfig)


def test_presets_check_fails_on_an_invalid_preset():
    from selfflow_core import ConfigError

    with pytest.raises(ConfigError, match="teacher_layer|objective"):
        contract("fakeinvalid").test_presets_are_valid()
    elsewhere = contract("fakenone", distribution="selfflow-fakewaves")
    with pytest.raises(AssertionError, match="registers no preset 'fakenone_debug_tiny'"):
        elsewhere.test_presets_are_valid()
    contract("fakewaves").test_presets_are_valid()


# ---- "its debug_tiny preset lowers the loss" --------------------------------------------------

def test_training_check_fails_on_a_preset_that_does_not_train(tmp_path):
    stuck = contract("fakestuck")
    run = type(stuck).train_debug_tiny(tmp_path)
    assert run.summary["step"] == 20 and len(run.losses) == 20
    with pytest.raises(AssertionError, match="did not lower the loss"):
        stuck.test_debug_tiny_lowers_the_loss(run)
    early = attrs.evolve(run, summary={**run.summary, "step": 7})
    with pytest.raises(AssertionError, match="stopped at step 7 of 20"):
        stuck.test_debug_tiny_lowers_the_loss(early)
    # the same preset with a working learning rate passes: the check measures the training
    contract("fakewaves").test_debug_tiny_lowers_the_loss(
        type(contract("fakewaves")).train_debug_tiny(tmp_path / "waves"))


@pytest.mark.parametrize("losses, window, ratio, match", [
    ([1.0] * 10, 5, 0.9, "did not lower the loss"),
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], 2, 0.3, "did not lower the loss"),
    ([1.0, 0.5, math.nan, 0.2, 0.1, 0.1], 2, 0.9, r"non-finite losses at steps \[3\]"),
    ([1.0, 0.1, 0.1], 2, 0.9, "too few"),
])
def test_check_loss_lowered_fails(losses, window, ratio, match):
    with pytest.raises(AssertionError, match=match):
        check_loss_lowered(losses, window=window, ratio=ratio)


def test_check_loss_lowered_uses_window_means():
    check_loss_lowered([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], window=2, ratio=0.4)
    # one noisy last step does not decide it: the mean of the window does
    check_loss_lowered([1.0, 1.0, 0.5, 0.5, 0.4, 0.95], window=2, ratio=0.7)
