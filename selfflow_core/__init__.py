"""selfflow: Self-Flow (self-supervised flow matching) on a small, pluggable core."""

from selfflow_core.hookspecs import hookimpl
from selfflow_core.plugins import Components, make_plugin_manager

__all__ = ["Components", "hookimpl", "make_plugin_manager"]
