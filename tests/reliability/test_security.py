"""Configs are data: no ``kind``, key or override can name code to import or run unless it is a
registered plugin component. (A crafted pickle checkpoint is refused without running:
tests/test_trainer.py::test_pickle_with_code_is_refused_and_never_runs and ..._on_resume; a plugin
that fails to import is reported by distribution: tests/test_plugins.py.)"""

from __future__ import annotations

import sys

import pytest
import tomli_w

import selfflow_core.cli.main as cli
from selfflow_core.builtin.presets import toy
from selfflow_core.config.converter import ConfigError, make_converter, to_data

IMPORT_PATHS = ["os.system", "subprocess:Popen", "builtins.eval", "posix:system",
                "selfflow_core.builtin.toy:ToyModality",
                "selfflow_core.builtin.toy.ToyModality.Config",
                "reliability_evil_module", "reliability_evil_module:run", "__import__",
                "torch.load", "../../etc/passwd"]
KIND_PATHS = ["backbone", "teacher", "tracker", "modalities.toy.modality",
              "modalities.toy.scheduler", "modalities.toy.scheduler.distribution"]


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / "reliability_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    assert "reliability_evil_module" not in sys.modules
    assert not marker.exists(), "a config imported a module"


@pytest.mark.parametrize("where", KIND_PATHS)
def test_a_kind_naming_an_import_path_is_an_unknown_kind(core_components, evil_module, where):
    path = "$." + where.replace("modalities.toy", "modalities['toy']")
    for kind in IMPORT_PATHS:
        with pytest.raises(ConfigError) as e:
            cli.resolve_config(core_components, "toy", [f'{where}.kind="{kind}"'])
        assert len(e.value.problems) == 1, e.value.problems
        problem = e.value.problems[0]
        assert problem.startswith(f"{path}: ") and repr(kind) in problem, problem
        assert "installed" in problem, problem  # the message lists what can be named


def toml_with(components, table: tuple[str, ...], key: str) -> str:
    """The toy preset as TOML with ``key = "reliability_evil_module:run"`` in ``table``."""
    data = to_data(make_converter(components), toy())
    node = data
    for name in table:
        node = node[name]
    node[key] = "reliability_evil_module:run"
    return tomli_w.dumps(cli._drop_none(data))


TABLES = [(), ("backbone",), ("optim",), ("modalities", "toy"), ("modalities", "toy", "modality"),
          ("modalities", "toy", "scheduler", "distribution")]


@pytest.mark.parametrize("key", ["__class__", "_target_", "__init__", "__reduce__", "__import__",
                                 "_partial_", "class_path", "module", "callable"])
def test_target_style_keys_in_toml_are_unknown_keys(tmp_path, core_components, capsys,
                                                    evil_module, key):
    path = tmp_path / "run.toml"
    for table in TABLES:
        path.write_text(toml_with(core_components, table, key))
        with pytest.raises(ConfigError) as e:
            cli.resolve_config(core_components, str(path), [])
        where = "$" + "".join(f"['{t}']" if table[:i] == ("modalities",) else f".{t}"
                              for i, t in enumerate(table))
        assert e.value.problems == [f"{where}: unknown key(s) [{key!r}]"], e.value.problems
        assert e.value.source == str(path)
    rc = cli.main(["config", "validate", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key" in err and key in err and "Traceback" not in err


def test_overrides_cannot_smuggle_code(core_components, capsys, evil_module, monkeypatch):
    monkeypatch.setenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", "1")
    for override in ['backbone._target_="reliability_evil_module:run"',
                     'backbone.kind="reliability_evil_module:run"',
                     '__class__="os.system"', 'optim.__init__="os.system"',
                     'optim.kind="torch.optim:SGD"', 'checkpoint.kind="pickle"',
                     'modalities.toy.modality.kind="os:system"']:
        rc = cli.main(["config", "validate", "toy", override])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and "Traceback" not in err, (override, err)
