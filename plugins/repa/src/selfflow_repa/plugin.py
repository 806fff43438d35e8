"""Registers the REPA teacher with selfflow (entry point ``repa`` in group ``selfflow``)."""

from selfflow_core import hookimpl
from selfflow_repa.teacher import REPATeacher


@hookimpl
def selfflow_register_teachers(registry):
    registry.add(REPATeacher.Config)
