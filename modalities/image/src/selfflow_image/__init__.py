"""selfflow-image: the image modality plugin for selfflow (sklearn digits or a folder of images;
pixel latents by default, a local diffusers VAE optionally)."""

from selfflow_image.adapter import DigitsSource, FolderSource, ImageModality, make_grid, to_uint8
from selfflow_image.encoders import (
    DiffusersVAEEncoder,
    EncoderConfig,
    ImageEncoder,
    PixelEncoder,
    build_encoder,
)

__all__ = [
    "DiffusersVAEEncoder", "DigitsSource", "EncoderConfig", "FolderSource", "ImageEncoder",
    "ImageModality", "PixelEncoder", "build_encoder", "make_grid", "to_uint8",
]
