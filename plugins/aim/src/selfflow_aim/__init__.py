"""selfflow-aim: an aim (https://aimstack.io) tracker plugin for selfflow."""

from selfflow_aim.tracker import AimTracker, audio_sequence, images_sequence

__all__ = ["AimTracker", "audio_sequence", "images_sequence"]
