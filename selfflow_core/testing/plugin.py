"""``ModalityPluginContract``: what every installed modality plugin must satisfy, as inherited
pytest tests (one subclass per plugin; :class:`ModalityContract` checks each adapter config)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

from selfflow_core.builtin.trackers import NullTracker
from selfflow_core.config.converter import make_converter
from selfflow_core.config.run import TrainerConfig
from selfflow_core.config.validate import validate
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.plugins.manager import Components
from selfflow_core.testing.checks import (
    check_discovered,
    check_loss_lowered,
    check_round_trip,
    installed_components,
)
from selfflow_core.testing.fixtures import torch_threads


@attrs.frozen
class TinyRun:
    """A finished ``<modality>_debug_tiny`` run of the contract: its tmp folder (``root``; the
    run in ``root / "run"``, stores beside it), the config that ran, the trainer, ``fit()``'s
    summary and the training losses."""

    root: Path
    config: TrainerConfig
    trainer: object
    summary: dict
    losses: list[float]

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


class ModalityPluginContract:
    """Subclass once per installed modality plugin::

        class TestAudioPlugin(ModalityPluginContract):
            modality = "audio"                  # the kind its entry point registers
            distribution = "selfflow-audio"     # the installed distribution declaring it

    The checks: the distribution's ``selfflow`` entry point registers the modality (and the
    presets), ``Components()`` naming the distribution as provider; the modality config and
    every preset of the distribution round-trip through ``to_data``/``structure`` and the
    presets are valid; and ``<modality>_debug_tiny`` trained for its few steps (store and run in
    a tmp folder, :class:`NullTracker`, one torch thread) lowers the loss. Add tests of your own
    on the same run through the class-scoped ``debug_tiny_run`` fixture (a :class:`TinyRun`).
    """

    #: the modality's kind (required)
    modality: ClassVar[str]
    #: the installed distribution whose ``selfflow`` entry point registers it (required)
    distribution: ClassVar[str]
    #: the config class ``modality`` must map to (``None``: not checked)
    config_class: ClassVar[type[ModalityConfig] | None] = None
    #: modality configs to round-trip; ``None``: the registered class's defaults
    configs: ClassVar[Sequence[ModalityConfig] | None] = None
    #: presets the distribution must register besides ``<modality>_debug_tiny``
    presets: ClassVar[tuple[str, ...]] = ()
    #: steps of the training check (``None``: the preset's own)
    train_steps: ClassVar[int | None] = None
    #: "lowers the loss": mean of the last ``loss_window`` losses < ``loss_ratio`` x the first's
    loss_window: ClassVar[int] = 5
    loss_ratio: ClassVar[float] = 0.9
    #: a reason to skip the training check (e.g. a system tool its source needs is missing)
    train_skip: ClassVar[str | None] = None

    @classmethod
    def debug_tiny_preset(cls) -> str:
        return f"{cls.modality}_debug_tiny"

    # ---- the run (override ``debug_tiny_config`` to adapt) ----------------------------------

    @classmethod
    def debug_tiny_config(cls, components: Components, root: Path) -> TrainerConfig:
        """The ``<modality>_debug_tiny`` preset with its stores and run in ``root``, a
        :class:`NullTracker` and :attr:`train_steps`."""
        config = components.presets.get(cls.debug_tiny_preset())()
        modalities = {name: attrs.evolve(spec, store=str(root / f"{name}.zarr"))
                      for name, spec in config.modalities.items()}
        return attrs.evolve(config, modalities=modalities, run_dir=str(root / "run"),
                            tracker=NullTracker.Config(),
                            steps=cls.train_steps if cls.train_steps is not None else config.steps)

    @classmethod
    def train_debug_tiny(cls, root: Path) -> TinyRun:
        """Train :meth:`debug_tiny_config` to the end on one torch thread."""
        from selfflow_core.trainer import Trainer

        components = installed_components()
        config = cls.debug_tiny_config(components, Path(root))
        with torch_threads(1):
            trainer = Trainer(config, components=components, progress=False)
            summary = trainer.fit()
        return TinyRun(root=Path(root), config=config, trainer=trainer, summary=summary,
                       losses=list(trainer.losses))

    @pytest.fixture(scope="class")
    @classmethod
    def debug_tiny_run(cls, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
        if cls.train_skip:
            pytest.skip(cls.train_skip)
        return cls.train_debug_tiny(tmp_path_factory.mktemp(f"{cls.modality}-debug-tiny"))

    # ---- tests ------------------------------------------------------------------------------

    def test_discovered_through_its_entry_point(self) -> None:
        check_discovered("modalities", self.modality, self.distribution,
                         config_class=self.config_class,
                         presets=(self.debug_tiny_preset(), *self.presets))

    def test_config_round_trips(self) -> None:
        """The modality config(s) and every preset of the distribution, unchanged through the
        converter of ``Components()``."""
        components = installed_components()
        conv = make_converter(components)
        configs = self.configs
        if configs is None:
            configs = (components.modalities.get(self.modality)(),)
        for cfg in configs:
            check_round_trip(conv, cfg, ModalityConfig)
        for name in self._own_presets(components):
            preset = components.presets.get(name)()
            assert isinstance(preset, TrainerConfig), (
                f"preset {name!r} returned {type(preset).__name__}, not a TrainerConfig")
            check_round_trip(conv, preset, TrainerConfig)

    def test_presets_are_valid(self) -> None:
        components = installed_components()
        for name in self._own_presets(components):
            validate(components.presets.get(name)(), components)

    def test_debug_tiny_lowers_the_loss(self, debug_tiny_run: TinyRun) -> None:
        steps = debug_tiny_run.config.steps
        assert debug_tiny_run.summary["step"] == steps, (
            f"the run stopped at step {debug_tiny_run.summary['step']} of {steps}: "
            f"{debug_tiny_run.summary}")
        assert len(debug_tiny_run.losses) == steps, (
            f"{len(debug_tiny_run.losses)} losses for {steps} steps")
        check_loss_lowered(debug_tiny_run.losses, window=self.loss_window, ratio=self.loss_ratio)

    def _own_presets(self, components: Components) -> list[str]:
        own = [n for n in components.presets
               if components.presets.provider(n).distribution == self.distribution]
        assert self.debug_tiny_preset() in own, (
            f"{self.distribution} registers no preset {self.debug_tiny_preset()!r}; its presets: "
            f"{own}")
        return own
