"""Reading configs: one strict cattrs converter, tagged by ``kind``, with every error's path.

Python users compose frozen attrs configs directly. TOML/JSON and ``key=value`` overrides go
through :func:`make_converter`, built *after* plugins load, so a ``kind`` from any installed
plugin is known and an unknown one lists what is installed. Configs are data: nothing in them is
imported or executed.
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from selfflow_core.errors import ConfigError
from selfflow_core.interfaces.base import OMIT_IF_DEFAULT, ComponentConfig
from selfflow_core.interfaces.base import added_field as added_field  # re-exported
from selfflow_core.plugins.registry import close_names, did_you_mean

T = TypeVar("T")


def _strict(kind: type, name: str, accept: tuple[type, ...]):
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and bool not in accept:
            raise TypeError(f"expected {name}, got bool {value!r}")
        if not isinstance(value, accept):
            raise TypeError(f"expected {name}, got {type(value).__name__} {value!r}")
        return kind(value)
    return hook


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s) {sorted(exc.extra_fields)}{_close_keys(exc)}"
    if isinstance(exc, KeyError):  # cattrs: a required key is absent (the path names it)
        return "required key missing"
    if isinstance(exc, (TypeError, ValueError, LookupError)) and exc.args:
        return str(exc.args[0])  # attrs validators put extra context in args[1:]
    return cattrs.v.format_exception(exc, type_)


def _close_keys(exc: cattrs.ForbiddenExtraKeysError) -> str:
    """The class's closest field names: `` (did you mean 'lr'?)`` for one unknown key,
    `` (did you mean: lrr -> 'lr', stpes -> 'steps'?)`` for several."""
    fields = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    if len(exc.extra_fields) == 1:
        return did_you_mean(next(iter(exc.extra_fields)), fields)
    close = {k: c for k in sorted(exc.extra_fields) if (c := close_names(k, fields))}
    if not close:
        return ""
    return " (did you mean: " + ", ".join(
        f"{k} -> {' or '.join(map(repr, c))}" for k, c in close.items()) + "?)"


def _problems(exc: BaseException) -> list[str]:
    out = []
    for line in cattrs.transform_error(exc, path="$", format_exception=_format):
        msg, _, path = line.rpartition(" @ ")
        m = re.match(r"'(\w+)' must", msg)  # attrs validators report at the parent: add the field
        out.append(f"{path}.{m.group(1)}: {msg}" if m else f"{path}: {msg}")
    return out


def make_converter(components: Any | None = None) -> cattrs.Converter:
    """A strict converter. ``components`` (a :class:`~selfflow_core.Components`) supplies the
    registered ``kind`` of every category; without it, only concrete classes structure."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, "int", (int,)))
    conv.register_structure_hook(float, _strict(float, "float", (int, float)))
    conv.register_structure_hook(bool, _strict(bool, "bool", (bool,)))
    conv.register_structure_hook(str, _strict(str, "string", (str,)))
    conv.register_structure_hook_func(
        lambda t: t == (int | float),
        lambda v, _: _strict(type(v), "int or float", (int, float))(v, _))

    def structure_literal(value: Any, type_: Any) -> Any:
        allowed = typing.get_args(type_)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}; got {value!r}"
                             + did_you_mean(value, [a for a in allowed if isinstance(a, str)]))
        return value

    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal,
                                      structure_literal)

    structure_fns: dict[type, Any] = {}
    unstructure_fns: dict[type, Any] = {}

    def structure_concrete(data: Any, cls: type) -> Any:
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a table for {cls.kind or cls.__qualname__}, "
                            f"got {type(data).__name__} {data!r}")
        data = dict(data)
        tag = data.pop("kind", cls.kind)
        if tag != cls.kind:
            raise ValueError(f"kind {tag!r} does not match {cls.__qualname__} (kind {cls.kind!r})")
        if cls not in structure_fns:
            structure_fns[cls] = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)
        return structure_fns[cls](data, cls)

    def unstructure_fields(obj: Any) -> dict[str, Any]:
        cls = type(obj)
        if cls not in unstructure_fns:
            added = {f.name: override(omit_if_default=True) for f in attrs.fields(cls)
                     if f.metadata.get(OMIT_IF_DEFAULT)}
            unstructure_fns[cls] = make_dict_unstructure_fn(cls, conv, **added)
        return unstructure_fns[cls](obj)

    def unstructure_component(obj: Any) -> dict[str, Any]:
        return {"kind": type(obj).kind, **unstructure_fields(obj)}

    def structure_table(data: Any, cls: type) -> Any:
        # a plain attrs config (not a tagged component) from anything but a table is one clear
        # problem, not the TypeError of looking keys up in an int
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a table for {cls.__qualname__}, "
                            f"got {type(data).__name__} {data!r}")
        if cls not in structure_fns:
            structure_fns[cls] = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)
        return structure_fns[cls](data, cls)

    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and attrs.has(t) and not issubclass(t, ComponentConfig),
        structure_table)
    conv.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, ComponentConfig), unstructure_component)
    conv.register_unstructure_hook_func(  # a plain table with added fields (added_field)
        lambda t: (isinstance(t, type) and attrs.has(t) and not issubclass(t, ComponentConfig)
                   and any(f.metadata.get(OMIT_IF_DEFAULT) for f in attrs.fields(t))),
        unstructure_fields)
    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, ComponentConfig) and bool(t.kind),
        structure_concrete)

    def structure_by_subclass(data: Any, base: type) -> Any:
        # a component kind private to a plugin (e.g. an image encoder): its subclasses with a
        # ``kind`` are the catalog, no registry needed
        kinds = subclass_kinds(base)
        what = getattr(base, "category", "") or base.__qualname__
        known = ", ".join(sorted(kinds)) or "(none)"
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a table with a `kind` ({what}: {known}), "
                            f"got {type(data).__name__} {data!r}")
        kind = data.get("kind")
        if kind not in kinds:
            raise ValueError(f"{'missing `kind`' if kind is None else f'unknown {what} {kind!r}'}"
                             f"{did_you_mean(kind, kinds)}; known: {known}")
        return structure_concrete(data, kinds[kind])

    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, ComponentConfig) and not t.kind
        and t is not ComponentConfig, structure_by_subclass)

    for registry in (components.registries() if components is not None else ()):
        def structure_tagged(data: Any, _: Any, registry=registry) -> Any:
            if not isinstance(data, Mapping):
                raise TypeError(f"expected a table with a `kind` ({registry.category}: "
                                f"{registry.describe()}), got {type(data).__name__} {data!r}")
            if "kind" not in data:
                raise ValueError(f"missing `kind`; installed {registry.category}s: "
                                 f"{registry.describe()}")
            if not isinstance(data["kind"], str):
                raise TypeError(f"`kind` must be a string, got {data['kind']!r}")
            return structure_concrete(data, registry.get(data["kind"]))
        conv.register_structure_hook_func(lambda t, b=registry.base: t is b, structure_tagged)
    return conv


def subclass_kinds(base: type) -> dict[str, type]:
    """``kind`` -> class of every subclass of ``base`` (at any depth) that has a ``kind``."""
    out, todo = {}, list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.kind:
            out.setdefault(cls.kind, cls)
    return out


def structure(conv: cattrs.Converter, data: Any, cls: type[T], *, source: str | None = None) -> T:
    """``conv.structure`` that raises one :class:`ConfigError` listing every problem."""
    try:
        return conv.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError, LookupError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(_problems(exc), source) from None
        raise ConfigError([f"$: {exc}"], source) from None


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML or JSON config file into plain data (never executes anything)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # TOML and JSON files are UTF-8
    except OSError as exc:
        raise ConfigError([f"cannot read config: {exc.strerror}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text: byte {exc.start} ({exc.reason})"],
                          str(path)) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ConfigError([f"not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {what}"],
                          str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["$: expected a table at the top level"], str(path))
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are TOML literals; bare words are
    strings (``modality=image``); ``null`` unsets an optional field (``eval_ema_decay=null``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r}: expected dotted.key=value"])
    if raw.strip() == "null":
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to unstructured config data (a new dict). Setting a
    table's ``kind`` to another value starts that table afresh (the new kind's defaults)."""
    data = json.loads(json.dumps(data))
    problems = []
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except ConfigError as exc:
            problems += exc.problems
            continue
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                # an unset optional table (null) is started afresh, like a missing one
                node[k] = {} if node.get(k) is None else node[k]
                if not isinstance(node[k], dict):
                    problems.append(f"override {item!r}: {k!r} is not a table")
                    break
            node = node[k]
        else:
            if keys[-1] == "kind" and node.get("kind") != value:
                node.clear()  # another kind: its own defaults, not the old kind's keys
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def to_data(conv: cattrs.Converter, cfg: Any) -> dict[str, Any]:
    """Unstructure to JSON-safe data (tuples become lists)."""
    return json.loads(json.dumps(conv.unstructure(cfg)))
