"""README's "Using it" section works as written: its commands, in the order written, on a fresh
checkout after the Quickstart, and its Python example.

The commands run in-process through ``selfflow_core.cli.main.main`` in a temp working directory
(every path in them is relative), with tiny step counts appended as overrides so the whole
section runs in seconds; a later ``key=value`` or ``--option`` wins, so the README's own values
are replaced, not removed. How each line is adapted:

- ``. .venv/bin/activate`` is skipped (the test runs inside the environment already);
- ``torchrun ... -m selfflow_core.cli.main ARGS`` runs ``ARGS`` in this one process (the world
  size of 2 is not exercised here; ``tests/test_parallel.py`` covers DDP);
- ``> FILE`` writes the command's standard output to ``FILE``; a glob is expanded as a shell
  would (sorted, left as it is when nothing matches);
- the Quickstart's main job (``quickstart.sh`` ends with ``selfflow train``) runs first, so the
  section is tested in the state a reader who followed the README is in.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

import selfflow_core.cli.main as cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: appended to every `selfflow train`: a few steps, two checkpoints, two tiny samples, no tracker
TRAIN = ["steps=4", "checkpoint.every=2", "sampling.count=2", "sampling.steps=2", "log_every=2",
         "tracker.kind=none"]
EXTRA = {"train": TRAIN, "sample": ["--count", "2", "--steps", "2"]}


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in the order written."""
    return re.findall(r"```(\w+)\n(.*?)```", text, re.S)


def command_lines(block: str) -> list[str]:
    """The command lines of a bash block, continuation lines joined."""
    return [line for line in block.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


@pytest.fixture
def plugins_on(one_thread, tmp_path, monkeypatch):
    """The installed plugins (the README's presets come from them), cwd in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SELFFLOW_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS", raising=False)


def selfflow(capsys, argv: list[str], line: str) -> str:
    """Run one ``selfflow`` command line (argv without the program) with its tiny extras."""
    argv = [*argv, *EXTRA.get(argv[0], [])]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"README command failed: {line!r} (run as {argv})\n{err}"
    assert "Traceback" not in out + err
    return out


def run_line(capsys, line: str) -> str | None:
    argv = shlex.split(line, comments=True)
    if argv[:2] == [".", ".venv/bin/activate"]:
        return None  # the test already runs in the environment
    if argv[0] == "torchrun":  # its arguments, in one process
        argv = ["selfflow", *argv[argv.index("selfflow_core.cli.main") + 1:]]
    assert argv[0] == "selfflow", f"README line the test does not know how to run: {line!r}"
    redirect = None
    if ">" in argv:
        i = argv.index(">")
        argv, redirect = argv[:i], argv[i + 1]
    argv = [a for arg in argv[1:]
            for a in ((sorted(glob.glob(arg)) or [arg]) if glob.has_magic(arg) else [arg])]
    out = selfflow(capsys, argv, line)
    if redirect:
        Path(redirect).write_text(out)
    return out


def run_python(block: str, i: int, monkeypatch) -> dict:
    """A Python block as written, the core's jsonl tracker instead of aim's (no aim repo)."""
    monkeypatch.setenv("SELFFLOW_BLOCK_PLUGINS", "aim")
    namespace: dict = {"__name__": "readme"}
    try:
        exec(compile(block, f"README.md[Using it, block {i}]", "exec"), namespace)
    finally:
        monkeypatch.delenv("SELFFLOW_BLOCK_PLUGINS")
    return namespace


def test_using_it_runs_in_order_after_the_quickstart(plugins_on, capsys, tmp_path, monkeypatch):
    assert (ROOT / "quickstart.sh").read_text().rstrip().endswith('selfflow train "$@"')
    selfflow(capsys, ["train"], "quickstart.sh: selfflow train")  # the Quickstart's main job
    outputs, python = {}, []
    for i, (lang, code) in enumerate(blocks(section("Using it")), 1):
        if lang == "bash":
            outputs.update((line, run_line(capsys, line)) for line in command_lines(code))
        else:
            assert lang == "python", lang
            python.append((code, run_python(code, i, monkeypatch)))
    assert len(outputs) >= 10, list(outputs)

    # `selfflow sample` said what it sampled with, and wrote to a folder of its own
    header, *files = next(out for line, out in outputs.items()
                          if line.startswith("selfflow sample")).splitlines()
    assert "evaluation EMA weights" in header and "heun" in header, header
    assert files and all(Path(f).is_file() and "/samples/sample-" in f for f in files), files
    assert (tmp_path / "runs/digits/samples/step-00000004").is_dir()  # the training's own kept

    # the Python example ends with the run, and shows where a plugin's components come from
    (code, namespace), = python
    assert code.rstrip().endswith("Trainer(config).fit()")
    assert "from selfflow_image import" in code
    config = namespace["config"]
    assert (Path(config.run_dir) / "checkpoints" / f"step-{config.steps:08d}.pt").is_file()
