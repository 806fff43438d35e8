"""The docs stay true: every Python block runs, every hook has a docs section and a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selfflow_core.plugins import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
TESTS = Path(__file__).resolve().parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PAGES = sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("selfflow_"))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write data/ and runs/
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(BLOCK.findall(page.read_text()), 1):
        code = compile(block, f"{page.name}[block {i}]", "exec")
        exec(code, namespace)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docs_section(hook):
    import inspect

    args = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"### {hook}({args})" in (DOCS / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    sources = [p.read_text() for p in TESTS.glob("test_*.py") if p.name != "test_docs.py"]
    assert any(hook in s for s in sources), f"no test mentions {hook}"
