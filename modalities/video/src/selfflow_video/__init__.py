"""selfflow-video: the video modality plugin for selfflow (moving sklearn digits or headless
CartPole renders; spatio-temporal patch tokens with 3-D positions; optional first-frame
conditioning)."""

from selfflow_video.adapter import VideoModality, tile, to_uint8, write_video_files
from selfflow_video.sources import CartPoleSource, MovingDigitsSource

__all__ = ["CartPoleSource", "MovingDigitsSource", "VideoModality", "tile", "to_uint8",
           "write_video_files"]
