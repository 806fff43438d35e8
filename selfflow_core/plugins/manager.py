"""Building plugin managers and the component registries they fill.

Order: the core's built-in plugin, then the ``selfflow`` entry-point group (unless switched off
by ``entry_points=False`` or ``SELFFLOW_DISABLE_PLUGIN_AUTOLOAD=1``; ``SELFFLOW_BLOCK_PLUGINS``
names entry points to skip), then the plugin objects passed in. A fresh manager per call.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import types
from collections.abc import Iterable, Iterator

import pluggy

from selfflow_core.errors import PluginLoadError
from selfflow_core.interfaces import (
    BackboneConfig,
    ModalityConfig,
    SchedulerConfig,
    TeacherConfig,
    TextEncoderConfig,
    TimeDistributionConfig,
    TrackerConfig,
)
from selfflow_core.plugins import hookspecs
from selfflow_core.plugins.registry import PresetRegistry, Provider, Registry

ENTRY_POINT_GROUP = "selfflow"
BUILTIN_PLUGINS = ("selfflow_core.builtin.plugin",)


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers each plugin's distribution and version."""

    def __init__(self) -> None:
        super().__init__("selfflow")
        self.providers: dict[str, Provider] = {}

    def provider(self, plugin: object) -> Provider:
        return self.providers.get(self.get_name(plugin) or "", Provider("?", "?", ""))

    def credit(self, component: object) -> Provider:
        """The provider of a registered component: the plugin whose module shares the longest
        dotted prefix with the module defining ``component`` (``selfflow_image.adapter`` ->
        plugin ``selfflow_image.plugin``)."""
        where = (getattr(component, "__module__", None) or "").split(".")
        best, best_len = None, 0
        for _, plugin in self.list_name_plugin():
            home = (plugin.__name__ if isinstance(plugin, types.ModuleType)
                    else type(plugin).__module__).split(".")
            shared = next((i for i, (a, b) in enumerate(zip(home, where)) if a != b),
                          min(len(home), len(where)))
            if shared > best_len:
                best, best_len = plugin, shared
        return self.provider(best) if best is not None else Provider("?", ".".join(where), "")


def _core_version() -> str:
    try:
        return md.version("selfflow")
    except md.PackageNotFoundError:
        return "dev"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def make_plugin_manager(plugins: Iterable[object] = (), *, entry_points: bool | None = None,
                        block: Iterable[str] = ()) -> PluginManager:
    """A new plugin manager: built-ins, then entry points, then ``plugins``; hooks checked."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        pm.providers[modname] = Provider(modname, "selfflow", _core_version())
    blocked = set(block) | {b.strip() for b in os.environ.get(
        "SELFFLOW_BLOCK_PLUGINS", "").split(",") if b.strip()}
    if entry_points is None:
        entry_points = not _env_flag("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD")
    if entry_points:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else ""
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {ep.name!r} from distribution {dist} {version} failed to import "
                    f"({ep.value}): {type(exc).__name__}: {exc}. Fix or uninstall it, or skip it "
                    f"with SELFFLOW_BLOCK_PLUGINS={ep.name}") from exc
            pm.register(plugin, name=ep.name)
            pm.providers[ep.name] = Provider(ep.name, dist, version)
    for plugin in plugins:
        if isinstance(plugin, type):
            raise TypeError(f"plugin {plugin.__qualname__} is a class; register an instance "
                            f"(forgot the `()`?)")
        name = pm.register(plugin)
        pm.providers[name] = Provider(name, getattr(plugin, "__module__", None) or name, "")
    pm.check_pending()
    return pm


class Components:
    """Every registered component config, by category, filled from a plugin manager's hooks."""

    def __init__(self, pm: PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else make_plugin_manager()
        credit = self.pm.credit
        self.modalities: Registry = Registry("modality", ModalityConfig, credit)
        self.backbones: Registry = Registry("backbone", BackboneConfig, credit)
        self.schedulers: Registry = Registry("timestep scheduler", SchedulerConfig, credit)
        self.distributions: Registry = Registry("time distribution", TimeDistributionConfig,
                                                credit)
        self.teachers: Registry = Registry("teacher", TeacherConfig, credit)
        self.trackers: Registry = Registry("tracker", TrackerConfig, credit)
        self.text_encoders: Registry = Registry("text encoder", TextEncoderConfig, credit)
        self.presets = PresetRegistry(credit)
        # ordinary pluggy hook calls (all plugins at once: wrappers and tracing apply); pluggy
        # calls the last registered first, so the core's fallbacks are set after the plugins'
        hooks = self.pm.hook
        hooks.selfflow_register_modalities(registry=self.modalities)
        hooks.selfflow_register_backbones(registry=self.backbones)
        hooks.selfflow_register_timestep_schedulers(registry=self.schedulers,
                                                    distributions=self.distributions)
        hooks.selfflow_register_teachers(registry=self.teachers)
        hooks.selfflow_register_trackers(registry=self.trackers)
        hooks.selfflow_register_text_encoders(registry=self.text_encoders)
        hooks.selfflow_register_presets(registry=self.presets)

    def registries(self) -> Iterator[Registry]:
        yield from (self.modalities, self.backbones, self.schedulers, self.distributions,
                    self.teachers, self.trackers, self.text_encoders)

    def by_plugin(self) -> dict[str, list[str]]:
        """Plugin name -> ``category:kind`` entries it registered (for ``selfflow plugins``)."""
        out: dict[str, list[str]] = {name: [] for name in self.pm.providers}
        for reg in self.registries():
            for kind in reg:
                out.setdefault(reg.provider(kind).plugin, []).append(f"{reg.category}:{kind}")
        for name in self.presets:
            out.setdefault(self.presets.provider(name).plugin, []).append(f"preset:{name}")
        return out
