"""Presets arrive through selfflow_register_presets and are valid, round-tripping configs."""

import pytest

from selfflow_core import Components, hookimpl, make_plugin_manager
from selfflow_core.builtin.presets import toy
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.config.run import TrainerConfig
from selfflow_core.config.validate import validate as check
from selfflow_core.plugins.registry import DuplicateComponentError, UnknownComponentError

COMPONENTS = Components()


@pytest.mark.parametrize("name", list(COMPONENTS.presets))
def test_every_installed_preset_is_valid_and_round_trips(name):
    config = COMPONENTS.presets.get(name)()
    assert isinstance(config, TrainerConfig)
    check(config, COMPONENTS)
    conv = make_converter(COMPONENTS)
    assert structure(conv, to_data(conv, config), TrainerConfig) == config


def test_selfflow_register_presets_from_a_plugin_and_duplicates():
    def mine():
        return toy()

    class Plugin:
        @hookimpl
        def selfflow_register_presets(self, registry):
            registry.add("mine", mine)

    components = Components(make_plugin_manager([Plugin()], entry_points=False))
    assert components.presets.get("mine") is mine
    assert "preset:mine" in sum(components.by_plugin().values(), [])
    with pytest.raises(UnknownComponentError, match="installed: .*mine"):
        components.presets.get("nope")

    class Clash:
        @hookimpl
        def selfflow_register_presets(self, registry):
            registry.add("toy", mine)

    with pytest.raises(DuplicateComponentError, match="preset 'toy' is registered twice"):
        Components(make_plugin_manager([Clash()], entry_points=False))
