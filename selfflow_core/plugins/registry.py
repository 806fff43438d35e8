"""Typed component registries handed to the ``selfflow_register_*`` hooks.

A registry maps a ``kind`` (the config's tag) to a config class, and remembers which plugin and
distribution provided it, so that errors can say where things come from. The provider is found
from the component itself (``credit``: the plugin whose package defines it), so the hooks are
called the ordinary pluggy way: once, for all plugins, with wrappers and tracing working.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

import attrs

from selfflow_core.errors import DuplicateComponentError, UnknownComponentError

C = TypeVar("C", bound=type)


@attrs.frozen
class Provider:
    """Who registered a component: the plugin's name and its distribution (name, version)."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}" + (
            "" if self.plugin == self.distribution else f", plugin {self.plugin!r}")


def close_names(word: object, choices: Iterable[str]) -> list[str]:
    """The ``choices`` close to a misspelled ``word`` (``difflib``), closest first; none for a
    ``_private`` or ``__dunder__`` name (``__class__`` is no typo of ``classes``)."""
    if not isinstance(word, str) or word.startswith("_"):
        return []
    # a little stricter than difflib's 0.6: "toi" -> "toy" (0.67), not "module" -> "modalities"
    return difflib.get_close_matches(word, list(choices), n=3, cutoff=0.65)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """A hint for a misspelled name, `` (did you mean 'image'?)``; empty when no choice is
    close."""
    close = close_names(word, choices)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def _direct(component: object) -> Provider:
    return Provider("<direct>", "<direct>", "")


class _Defaults:
    """A registry's default entry: what a config gets that names none. The core declares a
    fallback; an installed plugin's declaration replaces it; two plugins declaring different
    defaults of one category conflict (the error names both)."""

    _default: tuple[str, bool] | None = None

    def set_default(self, name: str, *, fallback: bool = False) -> None:
        """Declare ``name`` (already registered) the default; ``fallback``: only until a
        plugin declares another."""
        if name not in self:
            raise UnknownComponentError(f"cannot make {self.category} {name!r} the default: it is "
                                        f"not registered; installed: {self.describe()}")
        current = self._default
        if current is not None and not current[1] and not fallback and current[0] != name:
            raise DuplicateComponentError(
                f"default {self.category} declared twice: {current[0]!r} by "
                f"{self.provider(current[0])} and {name!r} by {self.provider(name)}; uninstall or "
                f"block one (SELFFLOW_BLOCK_PLUGINS=<plugin name>)")
        if current is None or current[1] or not fallback:
            self._default = (name, fallback)

    @property
    def default(self) -> str:
        """The name of the default entry (an :class:`UnknownComponentError` when none is)."""
        if self._default is None or self._default[0] not in self:
            raise UnknownComponentError(f"no default {self.category} is installed; installed: "
                                        f"{self.describe()}")
        return self._default[0]


class Registry(_Defaults, Generic[C]):
    """Config classes of one category (modalities, backbones, ...), keyed by their ``kind``."""

    def __init__(self, category: str, base: type, credit: Callable[[object], Provider] = _direct
                 ) -> None:
        self.category = category
        self.base = base
        self._entries: dict[str, tuple[type, Provider]] = {}
        self._credit = credit

    def add(self, config_cls: C) -> C:
        """Register ``config_cls`` (a subclass of this category's base with a ``kind``)."""
        provider = self._credit(config_cls)
        if not (isinstance(config_cls, type) and issubclass(config_cls, self.base)):
            raise TypeError(f"{provider}: {self.category} registry takes subclasses of "
                            f"{self.base.__qualname__}, got {config_cls!r}")
        kind = getattr(config_cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"{provider}: {config_cls.__qualname__} has no `kind` string")
        if kind in self._entries:
            other_cls, other = self._entries[kind]
            if other_cls is not config_cls:
                raise DuplicateComponentError(
                    f"{self.category} {kind!r} is registered twice: by {other} "
                    f"({other_cls.__module__}.{other_cls.__qualname__}) and by {provider} "
                    f"({config_cls.__module__}.{config_cls.__qualname__}); uninstall or block one "
                    f"(SELFFLOW_BLOCK_PLUGINS=<plugin name>)")
            return config_cls
        self._entries[kind] = (config_cls, provider)
        return config_cls

    def get(self, kind: str) -> type:
        """The config class for ``kind``; the error lists what is installed and from where."""
        try:
            return self._entries[kind][0]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.category} {kind!r}{did_you_mean(kind, self._entries)}; "
                f"installed: {self.describe()}") from None

    def provider(self, kind: str) -> Provider:
        return self._entries[kind][1]

    def describe(self) -> str:
        if not self._entries:
            return "(none)"
        return ", ".join(f"{k} ({p})" for k, (_, p) in sorted(self._entries.items()))

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


class PresetRegistry(_Defaults):
    """Named preset functions (``() -> TrainerConfig``) registered by plugins; the default is
    what ``selfflow train`` runs without a target."""

    category = "preset"

    def __init__(self, credit: Callable[[object], Provider] = _direct) -> None:
        self._entries: dict[str, tuple[object, Provider]] = {}
        self._credit = credit

    def add(self, name: str, fn) -> None:
        """Register ``fn`` (a function returning a ``TrainerConfig``) as preset ``name``."""
        provider = self._credit(fn)
        if not callable(fn):
            raise TypeError(f"{provider}: preset {name!r} must be a function, got {fn!r}")
        if name in self._entries and self._entries[name][0] is not fn:
            raise DuplicateComponentError(
                f"preset {name!r} is registered twice: by {self._entries[name][1]} and by "
                f"{provider}")
        self._entries[name] = (fn, provider)

    def get(self, name: str):
        if name not in self._entries:
            raise UnknownComponentError(f"unknown preset {name!r}{did_you_mean(name, self)}; "
                                        f"installed: {self.describe()}")
        return self._entries[name][0]

    def provider(self, name: str) -> Provider:
        return self._entries[name][1]

    def describe(self) -> str:
        return ", ".join(f"{k} ({p})" for k, (_, p) in sorted(self._entries.items())) or "(none)"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
