"""The folder layout is the architecture: the core's top level holds the method's modules and
the subpackages; imports go only down the layers; plugins use only the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "selfflow_core"

TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "types.py", "flow.py", "timesteps.py",
                     "teachers.py", "objective.py", "sampling.py", "trainer.py", "tokens.py",
                     "prompts.py"}
SUBPACKAGES = {"interfaces", "plugins", "config", "builtin", "data", "runtime", "eval",
               "testing", "cli"}

#: module prefix -> layer; a module may import modules of its own layer or below. The
#: contracts, then the method (and the core's own components), then what reads configs, then
#: the plumbing, then evaluation, the trainer, and the entry points.
LAYERS = [
    ("errors", 0), ("types", 0), ("interfaces", 0),
    ("flow", 1), ("timesteps", 1), ("teachers", 1), ("objective", 1), ("sampling", 1),
    ("tokens", 1), ("prompts", 1), ("plugins.hookspecs", 1), ("plugins.registry", 1),
    ("plugins.declare", 1), ("builtin.dit", 1), ("builtin.text", 1),
    ("builtin.toy", 1), ("builtin.trackers", 1),
    ("plugins.manager", 2), ("plugins", 2), ("config.converter", 2), ("config.run", 2),
    ("data.blocks", 2),
    ("eval.media", 2), ("eval.cached", 2),
    ("config", 3), ("builtin", 3), ("data", 3), ("runtime", 3),
    ("eval", 4),
    ("trainer", 5),
    ("cli", 6), ("testing", 6), ("", 6),
]
#: the public API: what plugins, the template and the core's own plugin module import (and the
#: testing kit's modules, e.g. its opt-in pytest fixtures plugin)
PUBLIC = {"selfflow_core", "selfflow_core.tokens", "selfflow_core.testing"}


def layer(module: str) -> int:
    name = module.removeprefix("selfflow_core").lstrip(".")
    for prefix, rank in LAYERS:
        if name == prefix or name.startswith(prefix + ".") or prefix == "":
            return rank
    raise AssertionError(module)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``selfflow_core`` import in the file (including lazy ones)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "selfflow_core":  # `from selfflow_core import x`: x may be a module
                out += [(node.lineno, f"selfflow_core.{a.name}")
                        if (CORE / a.name).exists() or (CORE / f"{a.name}.py").exists()
                        else (node.lineno, "selfflow_core") for a in node.names]
            elif node.module.startswith("selfflow_core"):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names
                    if a.name.split(".")[0] == "selfflow_core"]
    return out


def test_the_top_level_holds_the_method_and_the_subpackages():
    files = {p.name for p in CORE.iterdir() if p.is_file() and p.suffix == ".py"}
    packages = {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    assert files == TOP_LEVEL_MODULES
    assert packages == SUBPACKAGES


def test_every_subpackage_says_what_it_holds():
    for pkg in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((CORE / pkg / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 5, pkg


def test_core_imports_go_only_down_the_layers():
    wrong = []
    for path in sorted(CORE.rglob("*.py")):
        me = module_name(path)
        for line, target in imports(path):
            if target == "selfflow_core" and me != "selfflow_core":
                # the top level imports everything: only modules loaded after it may use it
                if me not in ("selfflow_core.builtin.plugin", "selfflow_core.builtin.presets"):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports the package top level")
                continue
            if layer(target) > layer(me):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({me}, layer {layer(me)}) imports "
                             f"{target} (layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def plugin_sources() -> list[Path]:
    roots = [*ROOT.glob("modalities/*/src"), *ROOT.glob("plugins/*/src"),
             *ROOT.glob("docs/examples/*/src"), *ROOT.glob("docs/examples/*/tests")]
    # (the example plugin is the scaffold's template rendered: test_examples keeps them equal)
    files = [p for r in roots for p in r.rglob("*.py")]
    return sorted(files + [CORE / "builtin" / "plugin.py", CORE / "builtin" / "presets.py"])


@pytest.mark.parametrize("path", plugin_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path):
    own = {"selfflow_core.builtin.presets"}  # the core's plugin module and its presets module
    private = [f"line {line}: {target}" for line, target in imports(path)
               if target not in PUBLIC | own and not target.startswith("selfflow_core.testing.")]
    assert not private, f"{path.relative_to(ROOT)} imports non-public modules: {private}"


def test_the_layer_table_would_catch_an_upward_import():
    assert layer("selfflow_core.trainer") > layer("selfflow_core.runtime.parallel")
    assert layer("selfflow_core.errors") < layer("selfflow_core.flow") < layer("selfflow_core.cli")
