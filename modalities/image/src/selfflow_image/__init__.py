"""selfflow-image: the image modality plugin for selfflow (sklearn digits or a folder of images;
pixel latents by default, a local diffusers VAE optionally)."""

from selfflow_image.adapter import (
    DigitsSource,
    FolderSource,
    ImageModality,
    UnreadableImageError,
    UnreadableImagesSkipped,
    make_grid,
    to_uint8,
)
from selfflow_image.encoders import (
    DiffusersVAEEncoder,
    ImageEncoder,
    ImageEncoderConfig,
    PixelEncoder,
)

__all__ = [
    "DiffusersVAEEncoder", "DigitsSource", "FolderSource", "ImageEncoder", "ImageEncoderConfig",
    "ImageModality", "PixelEncoder", "UnreadableImageError", "UnreadableImagesSkipped",
    "make_grid", "to_uint8",
]
