"""mkdocs hooks (``hooks:`` in ``mkdocs.yml``).

- ``on_config``: leave out of the nav the optional pages that other packages of the repository
  contribute (``OPTIONAL``) while they do not exist, so ``mkdocs build --strict`` passes in every
  checkout. A missing page that is not optional still fails the build.
- ``on_page_content``: the core's docstrings use Sphinx roles (``:class:`~a.b.C```); rendered as
  Markdown they would show the role. Keep the code span, shortened to ``C`` after a ``~``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")

OPTIONAL = {"modalities.md", "robotics.md", "scale.md", "reliability.md"}


def _prune(nav: list[Any], docs: Path) -> list[Any]:
    out: list[Any] = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _prune(value, docs)
                if value:
                    out.append({title: value})
            elif not (value in OPTIONAL and not (docs / value).is_file()):
                out.append(item)
        elif not (item in OPTIONAL and not (docs / item).is_file()):
            out.append(item)
    return out


def on_config(config: Any, **kwargs: Any) -> Any:
    config["nav"] = _prune(config["nav"] or [], Path(config["docs_dir"]))
    return config


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_role, html)
