"""Plugin managers: built-ins through hooks, explicit plugins, hook validation, entry points."""

import importlib
import importlib.metadata as md
import sys
import textwrap
import types

import attrs
import pluggy
import pytest

from selfflow_core import Components, hookimpl, make_plugin_manager
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.plugins.manager import PluginLoadError
from selfflow_core.plugins.registry import DuplicateComponentError, UnknownComponentError

BUILTIN = "selfflow_core.builtin.plugin"


@attrs.frozen(kw_only=True)
class FakeConfig(ModalityConfig):
    kind = "fake"
    size: int = 2

    def build(self):
        raise NotImplementedError


@attrs.frozen(kw_only=True)
class OtherFakeConfig(ModalityConfig):
    kind = "fake"


class FakePlugin:
    def __init__(self, cfg=FakeConfig):
        self.cfg = cfg

    @hookimpl
    def selfflow_register_modalities(self, registry):
        registry.add(self.cfg)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


def test_each_call_returns_a_fresh_manager():
    a = make_plugin_manager(entry_points=False)
    b = make_plugin_manager([FakePlugin()], entry_points=False)
    assert a is not b
    assert "fake" not in Components(a).modalities
    assert "fake" in Components(b).modalities
    assert "fake" not in Components(make_plugin_manager(entry_points=False)).modalities


def test_builtins_register_through_hooks():
    pm = make_plugin_manager(entry_points=False)
    assert pm.has_plugin(BUILTIN)
    builtin = pm.get_plugin(BUILTIN)
    for caller in (pm.hook.selfflow_register_modalities, pm.hook.selfflow_register_backbones,
                   pm.hook.selfflow_register_timestep_schedulers,
                   pm.hook.selfflow_register_teachers, pm.hook.selfflow_register_trackers):
        assert builtin in [impl.plugin for impl in caller.get_hookimpls()]
    comps = Components(pm)
    entries = comps.by_plugin()[BUILTIN]
    for entry in ("modality:toy", "backbone:dit", "timestep scheduler:dual",
                  "timestep scheduler:single", "time distribution:uniform",
                  "time distribution:logit_normal", "teacher:ema", "teacher:none",
                  "tracker:jsonl"):
        assert entry in entries
    assert comps.backbones.provider("dit").distribution == "selfflow"
    # with the built-in plugin unregistered, nothing is left: nothing bypasses the hooks
    pm.unregister(name=BUILTIN)
    assert all(len(r) == 0 for r in Components(pm).registries())


def test_explicit_plugin_registers_a_modality():
    comps = Components(make_plugin_manager([FakePlugin()], entry_points=False))
    assert comps.modalities.get("fake") is FakeConfig
    assert "fake" in comps.modalities.describe()
    assert any("modality:fake" in v for v in comps.by_plugin().values())
    with pytest.raises(UnknownComponentError, match="installed: fake .*toy"):
        comps.modalities.get("image")


def test_misspelled_hook_fails_at_once():
    class Typo:
        @hookimpl
        def selfflow_register_modalitie(self, registry):
            pass

    with pytest.raises(pluggy.PluginValidationError, match="selfflow_register_modalitie"):
        make_plugin_manager([Typo()], entry_points=False)


def test_wrong_hook_arguments_fail_at_once():
    class BadArgs:
        @hookimpl
        def selfflow_register_modalities(self, registry, extra):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager([BadArgs()], entry_points=False)


def test_a_class_instead_of_an_instance_is_a_type_error_with_a_hint():
    with pytest.raises(TypeError, match=r"FakePlugin is a class.*\(\)"):
        make_plugin_manager([FakePlugin], entry_points=False)


def test_two_plugins_with_the_same_kind_name_both():
    pm = make_plugin_manager([FakePlugin(FakeConfig), FakePlugin(OtherFakeConfig)],
                             entry_points=False)
    with pytest.raises(DuplicateComponentError) as e:
        Components(pm)
    msg = str(e.value)
    assert "'fake'" in msg and "FakeConfig" in msg and "OtherFakeConfig" in msg

    @attrs.frozen(kw_only=True)
    class ToyClash(ModalityConfig):
        kind = "toy"

    with pytest.raises(DuplicateComponentError) as e:
        Components(make_plugin_manager([FakePlugin(ToyClash)], entry_points=False))
    msg = str(e.value)
    assert "selfflow 0" in msg and BUILTIN in msg and "ToyClash" in msg and __name__ in msg


def test_registering_a_non_config_fails():
    class Bad:
        @hookimpl
        def selfflow_register_modalities(self, registry):
            registry.add(dict)

    with pytest.raises(TypeError, match="ModalityConfig"):
        Components(make_plugin_manager([Bad()], entry_points=False))


# ---- installed plugins (entry points) ---------------------------------------------------------

GOOD_MODULE = """
import attrs
from selfflow_core import hookimpl
from selfflow_core.interfaces import ModalityConfig, TeacherConfig

@attrs.frozen(kw_only=True)
class GoodModality(ModalityConfig):
    kind = "goodfake"

@attrs.frozen(kw_only=True)
class GoodTeacher(TeacherConfig):
    kind = "goodteacher"

@hookimpl
def selfflow_register_modalities(registry):
    registry.add(GoodModality)

@hookimpl
def selfflow_register_teachers(registry):
    registry.add(GoodTeacher)
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """Two installed distributions: ``fakeplug`` (fails to import) and ``selfflow-goodplug``."""
    site = tmp_path / "site"
    site.mkdir()

    def dist(name, version, ep_name, module, source):
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[selfflow]\n{ep_name} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))

    dist("fakeplug", "0.1", "fakeplug", "fakeplug_mod",
         "raise RuntimeError('fakeplug is broken on purpose')\n")
    dist("selfflow-goodplug", "0.2", "goodplug", "goodplug_mod", GOOD_MODULE)
    monkeypatch.syspath_prepend(str(site))          # also invalidates importlib caches
    importlib.invalidate_caches()
    # other selfflow plugins installed here are not this test's business: block them
    others = sorted({ep.name for ep in md.entry_points(group="selfflow")}
                    - {"fakeplug", "goodplug"})
    yield types.SimpleNamespace(path=site, others=others)
    for mod in ("fakeplug_mod", "goodplug_mod"):
        sys.modules.pop(mod, None)


def test_a_broken_installed_plugin_names_its_distribution_and_error(fake_site):
    with pytest.raises(PluginLoadError) as e:
        make_plugin_manager(block=fake_site.others)
    msg = str(e.value)
    assert "fakeplug 0.1" in msg and "RuntimeError" in msg and "broken on purpose" in msg
    assert "SELFFLOW_BLOCK_PLUGINS=fakeplug" in msg
    assert isinstance(e.value.__cause__, RuntimeError)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_autoload_can_be_switched_off(fake_site, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
        pm = make_plugin_manager()
    else:
        pm = make_plugin_manager(entry_points=False)
    assert not pm.has_plugin("fakeplug") and not pm.has_plugin("goodplug")
    assert "goodfake" not in Components(pm).modalities
    assert "fakeplug_mod" not in sys.modules


@pytest.mark.parametrize("how", ["env", "argument"])
def test_blocking_the_broken_plugin_loads_the_good_one(fake_site, monkeypatch, how):
    if how == "env":
        blocked = ",".join([" nothing", " fakeplug ", *fake_site.others])
        monkeypatch.setenv("SELFFLOW_BLOCK_PLUGINS", blocked)
        pm = make_plugin_manager()
    else:
        pm = make_plugin_manager(block=["fakeplug", *fake_site.others])
    assert pm.has_plugin("goodplug") and not pm.has_plugin("fakeplug")
    comps = Components(pm)
    assert comps.by_plugin()["goodplug"] == ["modality:goodfake", "teacher:goodteacher"]
    provider = comps.modalities.provider("goodfake")
    assert (provider.distribution, provider.version) == ("selfflow-goodplug", "0.2")
    assert "goodfake (selfflow-goodplug 0.2, plugin 'goodplug')" in comps.modalities.describe()
    assert "goodteacher (selfflow-goodplug 0.2" in comps.teachers.describe()
    # built-ins are still there, with their own provider
    assert comps.modalities.provider("toy").distribution == "selfflow"
