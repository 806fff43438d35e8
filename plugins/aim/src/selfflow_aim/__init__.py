"""selfflow-aim: an aim (https://aimstack.io) tracker plugin for selfflow."""

from selfflow_aim.tracker import AimTracker

__all__ = ["AimTracker"]
