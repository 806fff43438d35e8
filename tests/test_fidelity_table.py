"""Every row of docs/fidelity.md names a test that exists (file and test function)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}


def test_every_row_names_an_existing_test():
    rows = [line for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| paper choice")
            and not set(line) <= set("|- ")]
    assert len(rows) >= 15
    missing = []
    for row in rows:
        found = ROW_TEST.findall(row)
        assert found, f"row names no test: {row}"
        for file, name in found:
            path = ROOT / file
            if not path.is_file() or name not in defined_tests(path):
                missing.append(f"{file}::{name}")
    assert not missing, missing
