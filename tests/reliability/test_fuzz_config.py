"""Fuzzed configs: random mutations of the toy preset's data, of its TOML text and bytes, and of
``key=value`` overrides. Never a raw exception: success, or one ``ConfigError`` whose every
problem starts with its path (``$...``). Problems name only paths that were changed."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import selfflow_core.cli.main as cli
from selfflow_core.builtin.presets import toy
from selfflow_core.config.converter import (
    ConfigError,
    apply_overrides,
    make_converter,
    read_file,
    structure,
    to_data,
)
from selfflow_core.config.run import TrainerConfig
from selfflow_core.config.validate import validate
from selfflow_core.plugins.manager import Components, make_plugin_manager

COMPONENTS = Components(make_plugin_manager(entry_points=False))
CONV = make_converter(COMPONENTS)
BASE = to_data(CONV, toy())
TOML = tomli_w.dumps(cli._drop_none(BASE))
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KINDS = sorted({k for r in COMPONENTS.registries() for k in r})
WORDS = [*KINDS, "os.system", "subprocess:Popen", "", "kind", "stop", "skip", "cosine", "euler",
         "heun", "inf", "nan", "1e999", "-0", "[", "]", "{", "=", '"', "'", "\\u0000", "\n"]


def all_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from all_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from all_paths(v, (*prefix, i))


PATHS = [p for p in all_paths(BASE) if p]


def get(node, path):
    for k in path:
        node = node[k]
    return node


TABLE_PATHS = [p for p in [(), *PATHS] if isinstance(get(BASE, p), dict)]
KIND_TABLES = [p for p in TABLE_PATHS if "kind" in get(BASE, p)]
LEAVES = [p for p in PATHS if not isinstance(get(BASE, p), (dict, list))
          and p[-1] != "kind" and not isinstance(p[-1], int)]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10))
keys = st.sampled_from(["kind", "depth", "lr", "store", "modality", "toy", "steps", "_target_",
                        "__class__"]) | st.text(st.characters(blacklist_categories=("Cs",)),
                                                max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(keys, inner, max_size=3), max_leaves=6)
mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), values),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("add"), st.sampled_from(TABLE_PATHS), st.tuples(keys, values)),
    st.tuples(st.just("kind"), st.sampled_from(KIND_TABLES), st.sampled_from(KINDS) | scalars),
)


def render(path: tuple) -> str:
    """A data path as the converter writes it: ``$.modalities['toy'].batch_size``."""
    out = "$"
    for i, k in enumerate(path):
        if isinstance(k, int):
            out += f"[{k}]"
        elif path[:i] == ("modalities",):
            out += f"[{k!r}]"
        else:
            out += f".{k}"
    return out


def mutate(data: dict, ops) -> tuple[dict, list[str]]:
    """Apply ``ops`` where their path still exists; the rendered paths they touched."""
    data, touched = copy.deepcopy(data), []
    for op, path, arg in ops:
        if op == "add":
            value, path = arg[1], (*path, arg[0])
        elif op == "kind":
            value, path = arg, (*path, "kind")
        else:
            value = arg
        try:
            parent = get(data, path[:-1])
            if not isinstance(parent, (dict, list)):
                continue
            if op == "delete":
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
        touched.append(render(path))
    return data, touched


def outcome(data) -> ConfigError | None:
    """None when the data is a valid config; else its ConfigError (anything else propagates)."""
    try:
        config = structure(CONV, data, TrainerConfig, source="fuzz")
    except ConfigError as exc:
        exc.phase = "structure"
        return exc
    try:
        validate(config, COMPONENTS)
    except ConfigError as exc:
        exc.phase = "check"
        return exc
    return None


def assert_clear(exc: ConfigError) -> None:
    assert exc.problems, "a ConfigError without problems"
    assert str(exc).startswith(f"{len(exc.problems)} problem(s)")
    for p in exc.problems:
        assert p.startswith("$") and ": " in p, f"problem without a path: {p!r}"
        assert "Traceback" not in p


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_config_data_is_valid_or_one_clear_error(ops):
    data, touched = mutate(BASE, ops)
    exc = outcome(data)
    event("valid" if exc is None else f"ConfigError ({exc.phase})")
    if exc is None:
        return
    assert_clear(exc)
    if exc.phase == "structure":  # (build.check's cross-field rules may blame other tables)
        for p in exc.problems:
            assert any(related(p, t) for t in touched), (p, touched)


def parent(path: str) -> str:
    return path[: max(path.rfind("."), path.rfind("["))]


def related(problem: str, touched: str) -> bool:
    """Whether ``problem`` is about the changed path: at it, inside it, at a table holding it,
    or at a field next to it (validators comparing fields of one table, e.g. width and heads)."""
    path = problem.split(": ")[0]
    return (problem.startswith(touched) or touched.startswith(path)
            or parent(path) == parent(touched))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(chosen=st.lists(st.sampled_from(LEAVES), min_size=1, max_size=6, unique=True),
       bad=st.sampled_from([[], [1], {}, {"kind": "toy"}]))
def test_every_problem_is_listed_with_its_path(chosen, bad):
    """k fields given a value of the wrong type: exactly k problems, one at each path."""
    data, touched = mutate(BASE, [("set", p, bad) for p in chosen])
    exc = outcome(data)
    assert exc is not None and exc.phase == "structure"
    assert_clear(exc)
    assert sorted(p.split(": ")[0] for p in exc.problems) == sorted(touched), exc.problems


edits = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, len(TOML)),
              st.sampled_from(WORDS) | st.text(max_size=6)),
    st.tuples(st.just("delete"), st.integers(0, len(TOML)), st.integers(1, 12)),
    st.tuples(st.just("dup-line"), st.integers(0, TOML.count("\n")), st.none()),
    st.tuples(st.just("drop-line"), st.integers(0, TOML.count("\n")), st.none()),
)


def edit_text(text: str, ops) -> str:
    for op, at, arg in ops:
        lines = text.split("\n")
        if op == "insert":
            text = text[:at] + arg + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + arg:]
        elif op == "dup-line" and lines:
            i = at % len(lines)
            text = "\n".join([*lines[: i + 1], lines[i], *lines[i + 1:]])
        elif op == "drop-line" and lines:
            i = at % len(lines)
            text = "\n".join(lines[:i] + lines[i + 1:])
    return text


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(ops=st.lists(edits, min_size=1, max_size=4), flips=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=2))
def test_fuzzed_toml_file_is_valid_or_one_clear_error_naming_it(scratch, ops, flips):
    path = scratch / "run.toml"
    raw = bytearray(edit_text(TOML, ops).encode("utf-8", "surrogatepass"))
    for at, mask in flips:  # bytes too: a file need not be valid UTF-8
        if raw:
            raw[at % len(raw)] ^= mask
    path.write_bytes(bytes(raw))
    try:  # what cli.resolve_config does with a file, with one converter for all examples
        validate(structure(CONV, read_file(path), TrainerConfig, source=str(path)),
                    COMPONENTS, source=str(path))
        event("valid")
    except ConfigError as exc:
        event("ConfigError")
        assert exc.problems and all(p.strip() for p in exc.problems)
        if exc.problems[0].startswith("$"):  # parsed: problems of the data, with paths
            assert_clear(exc)
        assert exc.source == str(path) and str(path) in str(exc)


override_keys = st.sampled_from([".".join(map(str, p)) for p in PATHS]) | keys
override_values = st.sampled_from(WORDS) | st.text(
    st.characters(blacklist_categories=("Cs",)), max_size=12) | st.builds(
    lambda v: repr(v), scalars)


@FUZZ
@given(items=st.lists(st.tuples(override_keys, st.sampled_from(["=", ""]), override_values),
                      min_size=1, max_size=4))
def test_fuzzed_overrides_are_valid_or_one_clear_error(items):
    overrides = [f"{k}{sep}{v}" for k, sep, v in items]
    try:  # what cli.resolve_config does with a preset, with one converter for all examples
        data = apply_overrides(BASE, overrides)
        validate(structure(CONV, data, TrainerConfig, source="preset 'toy'"), COMPONENTS)
        event("valid")
    except ConfigError as exc:
        event("ConfigError")
        assert exc.problems
        for p in exc.problems:
            assert p.startswith(("$", "override ")), p


@pytest.mark.parametrize("overrides", [[], ["steps=5"], ["steps=x", "optim.lr=-1"]])
def test_the_shortcuts_above_match_resolve_config(overrides):
    try:
        expected = cli.resolve_config(COMPONENTS, "toy", overrides)
    except ConfigError as exc:
        expected = exc.problems
    try:
        got = structure(CONV, apply_overrides(BASE, overrides), TrainerConfig)
    except ConfigError as exc:
        got = exc.problems
    assert got == expected


def test_problem_paths_render_as_the_converter_writes_them():
    assert re.fullmatch(r"\$\.modalities\['toy'\]\.batch_size",
                        render(("modalities", "toy", "batch_size")))
    data, touched = mutate(BASE, [("set", ("modalities", "toy", "batch_size"), "x")])
    exc = outcome(data)
    assert exc.problems == ["$.modalities['toy'].batch_size: expected int, got str 'x'"]
    assert touched == ["$.modalities['toy'].batch_size"]
