"""Registration goes through pluggy's own hook calling (wrappers and tracing work), and the
optional capabilities of components are declared on the interfaces, not probed for."""

from __future__ import annotations

import attrs
import pytest

from selfflow_core import (
    Backbone,
    BackboneConfig,
    Components,
    ModalitySpec,
    TrainerConfig,
    hookimpl,
    make_plugin_manager,
    validate,
)
from selfflow_core.builtin.toy import ToyModality


@attrs.frozen(kw_only=True)
class Wide(ToyModality.Config):
    kind = "wide_toy"


class Plain:
    @hookimpl
    def selfflow_register_modalities(self, registry):
        registry.add(Wide)


class Wrapper:
    """A wrapper hookimpl around every plugin's modality registration."""

    def __init__(self):
        self.before, self.after = None, None

    @hookimpl(wrapper=True)
    def selfflow_register_modalities(self, registry):
        self.before = sorted(registry)
        result = yield
        self.after = sorted(registry)
        return result


def test_wrapper_hookimpls_see_the_whole_registration():
    wrapper = Wrapper()
    comps = Components(make_plugin_manager([Plain(), wrapper], entry_points=False))
    assert wrapper.before == [] and wrapper.after == ["toy", "wide_toy"]
    # each component is still credited to the plugin that defines it
    assert comps.modalities.provider("toy").distribution == "selfflow"
    assert comps.modalities.provider("wide_toy").plugin != comps.modalities.provider("toy").plugin


def test_hook_tracing_and_monitoring_see_registration_calls():
    pm = make_plugin_manager([Plain()], entry_points=False)
    calls = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name),
                                      lambda outcome, name, impls, kwargs: None)
    Components(pm)
    undo()
    assert "selfflow_register_modalities" in calls and "selfflow_register_presets" in calls


@attrs.frozen(kw_only=True)
class NoDepthBackbone(BackboneConfig):
    """A third-party backbone whose config does not know its depth before it is built."""

    kind = "no_depth"

    def build(self, **runtime):
        raise NotImplementedError


class NoDepthPlugin:
    @hookimpl
    def selfflow_register_backbones(self, registry):
        registry.add(NoDepthBackbone)


def test_a_backbone_config_without_depth_validates():
    comps = Components(make_plugin_manager([NoDepthPlugin()], entry_points=False))
    config = TrainerConfig(modalities={"toy": ModalitySpec(modality=ToyModality.Config(),
                                                           store="x.zarr")},
                           backbone=NoDepthBackbone())
    assert NoDepthBackbone().depth is None
    validate(config, comps)  # no crash probing a depth it does not have


def test_optional_capabilities_have_defaults_on_the_interfaces():
    class Minimal(Backbone):
        depth, width = 2, 8

        def forward(self, x, t, batch, *, feature_layers=(), stop_after=None):
            raise NotImplementedError

    assert list(Minimal().repeated_blocks()) == []
    assert ToyModality.Config(channels=3).build().token_dims == (3,)
    assert BackboneConfig().problems() == []
    from selfflow_core import NoTeacher
    assert NoTeacher.Config().build().feature_dim is None


def test_two_plugins_declaring_different_defaults_conflict():
    from selfflow_core import DuplicateComponentError

    class A:
        @hookimpl
        def selfflow_register_presets(self, registry):
            registry.add("a", lambda: None)
            registry.set_default("a")

    class B:
        @hookimpl
        def selfflow_register_presets(self, registry):
            registry.add("b", lambda: None)
            registry.set_default("b")

    assert Components(make_plugin_manager([A()], entry_points=False)).presets.default == "a"
    assert Components(make_plugin_manager([], entry_points=False)).presets.default == "toy"
    with pytest.raises(DuplicateComponentError, match="default preset declared twice"):
        Components(make_plugin_manager([A(), B()], entry_points=False))


def test_declared_modality_plugin_hooks_register_like_written_ones():
    from selfflow_core import modality_plugin_hooks

    def main():
        return None

    modalities, presets = modality_plugin_hooks([Wide], {"wide": main}, default_preset="wide")

    class Declared:
        selfflow_register_modalities = staticmethod(modalities)
        selfflow_register_presets = staticmethod(presets)

    comps = Components(make_plugin_manager([Declared()], entry_points=False))
    assert comps.modalities.get("wide_toy") is Wide
    assert comps.presets.get("wide") is main and comps.presets.default == "wide"
    with pytest.raises(ValueError, match="default_preset 'nope'"):
        modality_plugin_hooks([Wide], {"wide": main}, default_preset="nope")
