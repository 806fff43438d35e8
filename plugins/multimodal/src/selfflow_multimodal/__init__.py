"""selfflow-multimodal: composite presets over the image, video, audio and robotics plugins."""

from selfflow_multimodal.presets import MULTIMODAL_PARTS, multimodal_tiny

__all__ = ["MULTIMODAL_PARTS", "multimodal_tiny"]
