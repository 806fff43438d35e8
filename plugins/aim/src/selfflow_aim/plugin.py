"""Registers the aim tracker with selfflow (entry point ``aim`` in group ``selfflow``).

Importing this module does not import aim (about a second); :class:`AimTracker` does when built.
"""

from selfflow_aim.tracker import AimTracker
from selfflow_core import hookimpl


@hookimpl
def selfflow_register_trackers(registry):
    registry.add(AimTracker.Config)
    registry.set_default(AimTracker.Config.kind)  # installed, it is every run's tracker by default
