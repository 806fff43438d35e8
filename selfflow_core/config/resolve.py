"""From the command line to a validated ``TrainerConfig``: a preset name or a TOML/JSON file,
then ``dotted.key=value`` overrides, through the one strict converter and :func:`validate`."""

from __future__ import annotations

from pathlib import Path

from selfflow_core.config.converter import (
    apply_overrides,
    make_converter,
    read_file,
    structure,
    to_data,
)
from selfflow_core.config.run import TrainerConfig
from selfflow_core.config.validate import validate
from selfflow_core.plugins.manager import Components

__all__ = ["resolve_config"]


def resolve_config(components: Components, target: str | None,
                   overrides: list[str]) -> TrainerConfig:
    """A preset name (None: the installed default preset) or a TOML/JSON path, then
    ``overrides``; every problem raised at once as one :class:`ConfigError` naming the source."""
    conv = make_converter(components)
    if target and (target.endswith((".toml", ".json")) or Path(target).is_file()):
        data, source = read_file(target), target
    else:
        name = target or components.presets.default
        data, source = to_data(conv, components.presets.get(name)()), f"preset {name!r}"
    if overrides:
        data = apply_overrides(data, overrides)
    config = structure(conv, data, TrainerConfig, source=source)
    validate(config, components, source=source)  # cross-field rules, naming the file too
    return config
