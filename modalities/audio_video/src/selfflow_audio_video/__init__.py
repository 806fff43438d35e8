"""selfflow-audio-video: joint audio-video for selfflow. One sequence holds a clip's video tokens
(selfflow-video) and audio tokens (selfflow-audio); moving digits paired with the spoken digit
of the same class, class-conditional or generated together from one caption (``t2av_digits``:
:mod:`selfflow_audio_video.captions`, :mod:`selfflow_audio_video.evaluator`)."""

from selfflow_audio_video.adapter import AudioVideoModality, PairSource

__all__ = ["AudioVideoModality", "PairSource"]
