"""Registers the timeseries modality and its presets with selfflow.

This module is the plugin: ``pyproject.toml`` names it as entry point ``timeseries`` in the group
``selfflow``, and selfflow registers every ``@hookimpl`` function it holds.
"""

from __future__ import annotations

from selfflow_core import PresetRegistry, Registry, hookimpl

from selfflow_timeseries.adapter import TimeseriesModality


@hookimpl
def selfflow_register_modalities(registry: Registry) -> None:
    registry.add(TimeseriesModality.Config)


@hookimpl
def selfflow_register_presets(registry: PresetRegistry) -> None:
    from selfflow_timeseries.presets import debug_tiny, default

    registry.add("timeseries", default)
    registry.add("timeseries_debug_tiny", debug_tiny)
