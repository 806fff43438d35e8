"""The hooks of the common plugin, declared instead of written: a plugin that adds modalities and
their presets (and perhaps names its main job the default preset) needs no hook code."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from selfflow_core.plugins.hookspecs import hookimpl
from selfflow_core.plugins.registry import PresetRegistry, Registry

__all__ = ["modality_plugin_hooks"]


def modality_plugin_hooks(modalities: Sequence[type], presets: Mapping[str, Callable[[], Any]],
                          *, default_preset: str | None = None
                          ) -> tuple[Callable[[Registry], None], Callable[[PresetRegistry], None]]:
    """``selfflow_register_modalities`` and ``selfflow_register_presets`` hook implementations
    that register ``modalities`` (their config classes), ``presets`` (name -> function) and, when
    given, ``default_preset`` as what ``selfflow train`` runs without a target. In the plugin
    module::

        selfflow_register_modalities, selfflow_register_presets = modality_plugin_hooks(
            [ImageModality.Config], {"image": default, "image_debug_tiny": debug_tiny},
            default_preset="image")
    """
    modalities, presets = tuple(modalities), dict(presets)
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"default_preset {default_preset!r} is not among the presets "
                         f"{sorted(presets)}")

    @hookimpl
    def selfflow_register_modalities(registry: Registry) -> None:
        for config_class in modalities:
            registry.add(config_class)

    @hookimpl
    def selfflow_register_presets(registry: PresetRegistry) -> None:
        for name, fn in presets.items():
            registry.add(name, fn)
        if default_preset is not None:
            registry.set_default(default_preset)

    return selfflow_register_modalities, selfflow_register_presets
