"""``selfflow new-modality NAME``: write a new, working modality plugin package from a template.

The template (``selfflow_core/cli/templates/modality``, shipped with the core) is a complete
third-party plugin — pyproject with the entry point, adapter, plugin module, presets, contract
tests and README — for multichannel 1-D signals. ``docs/examples/selfflow-timeseries`` is exactly
what it renders for ``NAME = timeseries``. Rendering is :class:`string.Template` substitution of
file contents (``${name}``, ``${package}``, ``${dist}``, ``${Class}``) and of the placeholder words
``PACKAGE`` and ``NAME`` in file paths; template files end in ``.tmpl``.
"""

from __future__ import annotations

import importlib.metadata as md
import keyword
import re
import string
from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from selfflow_core.errors import ScaffoldError

TEMPLATE_PACKAGE = "selfflow_core"
TEMPLATE_DIR = ("cli", "templates", "modality")
SUFFIX = ".tmpl"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
#: ``toy``: the core's own modality (a plugin of that kind would be a duplicate); ``core``: the
#: package would be ``selfflow_core`` itself
RESERVED = frozenset({"toy", "core"})
MAX_NAME = 40


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a modality (lowercase ``snake_case`` starting with a letter,
    at most 40 characters, not ``toy`` or ``core``); raise :class:`ScaffoldError` saying what is
    wrong."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        hint = re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
        hint = hint if NAME_PATTERN.fullmatch(hint) else "my_modality"
        raise ScaffoldError(
            f"invalid modality name {name!r}: use lowercase letters, digits and single "
            f"underscores, starting with a letter (e.g. {hint!r}); it becomes the modality kind, "
            f"the entry-point name and the package selfflow_<name>")
    if len(name) > MAX_NAME:
        raise ScaffoldError(f"modality name {name!r} is longer than {MAX_NAME} characters")
    if keyword.iskeyword(name) or name in RESERVED:
        raise ScaffoldError(f"modality name {name!r} is reserved; pick another")
    return name


def names(name: str) -> dict[str, str]:
    """The substitutions for modality ``name``: ``name`` (kind, entry point), ``package``
    (import name), ``dist`` (distribution) and ``Class`` (CamelCase class-name prefix)."""
    validate_name(name)
    return {"name": name, "package": f"selfflow_{name}",
            "dist": f"selfflow-{name.replace('_', '-')}",
            "Class": "".join(part.capitalize() for part in name.split("_"))}


def template_root() -> Traversable:
    """The shipped template folder (works from a wheel, an sdist or an editable install)."""
    root = files(TEMPLATE_PACKAGE)
    for part in TEMPLATE_DIR:
        root = root / part
    return root


def _walk(node: Traversable, rel: tuple[str, ...] = ()
          ) -> Iterator[tuple[tuple[str, ...], Traversable]]:
    """``(path parts, file)`` of every template file under ``node``, sorted."""
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name == "__pycache__":
            continue
        if child.is_dir():
            yield from _walk(child, (*rel, child.name))
        elif child.name.endswith(SUFFIX):
            yield (*rel, child.name), child


def render_files(name: str) -> dict[str, str]:
    """The rendered package for ``name`` as ``{relative posix path: text}`` (nothing written)."""
    subs = names(name)
    out: dict[str, str] = {}
    for rel, node in _walk(template_root()):
        parts = [p.replace("PACKAGE", subs["package"]).replace("NAME", subs["name"]) for p in rel]
        parts[-1] = parts[-1][: -len(SUFFIX)]
        try:
            text = string.Template(node.read_text(encoding="utf-8")).substitute(subs)
        except (KeyError, ValueError) as exc:  # a broken template is a bug of the core
            raise RuntimeError(f"template {'/'.join(rel)}: bad placeholder {exc}") from exc
        out["/".join(parts)] = text
    if not out:
        raise RuntimeError(f"the modality template is missing from {template_root()}")
    return out


def default_directory(name: str) -> Path:
    """Where ``selfflow new-modality NAME`` writes without ``--dir``: ``./selfflow-<name>``."""
    return Path(names(name)["dist"])


def render(name: str, directory: str | Path | None = None) -> Path:
    """Write the package for modality ``name`` into ``directory`` (default
    :func:`default_directory`), which must not exist or be empty; return the directory.

    Does not check whether a plugin of that name is installed (see :func:`new_modality`)."""
    rendered = render_files(name)
    dest = Path(directory) if directory is not None else default_directory(name)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ScaffoldError(f"{dest} already exists and is not an empty directory; refusing to "
                            f"overwrite it (remove it or pass another --dir)")
    for rel, text in rendered.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return dest


def installed_plugin(name: str) -> str | None:
    """``"<distribution> <version>"`` if a plugin entry point called ``name`` is installed."""
    for ep in md.entry_points(group="selfflow"):
        if ep.name == name:
            return f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
    return None


def new_modality(name: str, directory: str | Path | None = None) -> Path:
    """:func:`render`, refusing a ``name`` that an installed plugin already uses (installing both
    would register the modality twice)."""
    validate_name(name)
    if (other := installed_plugin(name)) is not None:
        raise ScaffoldError(f"a selfflow plugin named {name!r} is already installed ({other}); "
                            f"a second one would register modality {name!r} twice; pick another "
                            f"name")
    return render(name, directory)
