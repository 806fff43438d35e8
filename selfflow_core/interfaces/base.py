"""The base of every component config: frozen, keyword-only, tagged by ``kind``, with
``build()``."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

#: the metadata key :func:`added_field` sets
OMIT_IF_DEFAULT = "selfflow.omit_if_default"


def added_field(**kwargs: Any) -> Any:
    """``attrs.field(**kwargs)`` for a config field (of a component or of a plain table) added
    after configs were saved: while it holds its default it is left out of the config's data,
    so a checkpoint or store written before the field existed still matches a config that
    leaves it alone (their recorded configs are compared as data)."""
    metadata = {**kwargs.pop("metadata", {}), OMIT_IF_DEFAULT: True}
    return attrs.field(metadata=metadata, **kwargs)


@attrs.frozen(kw_only=True)
class ComponentConfig:
    """Subclass with ``@attrs.frozen(kw_only=True)``, set ``kind``, implement ``build()``.

    ``kind`` is the tag that TOML/JSON configs use to pick the class; it is a class variable,
    not a field, so a Python user never passes it.
    """

    kind: ClassVar[str] = ""

    def build(self, **runtime: Any) -> Any:
        """Construct the component this config describes. ``runtime`` carries what only the
        trainer knows (e.g. token widths for a backbone)."""
        raise NotImplementedError(f"{type(self).__qualname__}.build()")

    def problems(self) -> list[str]:
        """What this config's fields together get wrong that their own validators cannot see
        (e.g. a file that does not exist): each ``"field: message"``. Checked with the run's
        other cross-field rules before anything is built."""
        return []
