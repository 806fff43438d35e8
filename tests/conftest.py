"""Shared set-up of the core's tests: the helpers beside the tests and the benchmark modules are
importable (``--import-mode=importlib`` puts no test folder on ``sys.path``), and the contract
kit's fixtures (``one_thread``, ``components``, ``core_components``, ``toy_store``, ...) are
available; none is autouse."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests", ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

pytest_plugins = ["selfflow_core.testing.fixtures"]
