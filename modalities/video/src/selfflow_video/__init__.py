"""selfflow-video: the video modality plugin for selfflow (moving sklearn digits or headless
CartPole renders; spatio-temporal patch tokens with 3-D positions; optional first-frame
conditioning; captions of which digit moves which way, with a fixed evaluator, for text to
video)."""

from selfflow_video.adapter import VideoModality, tile, to_uint8, write_video_files
from selfflow_video.captions import parse_prompt
from selfflow_video.sources import CartPoleSource, DigitMotion, MovingDigitsSource

__all__ = ["CartPoleSource", "DigitMotion", "MovingDigitsSource", "VideoModality",
           "parse_prompt", "tile", "to_uint8", "write_video_files"]
