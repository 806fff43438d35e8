"""selfflow-image: the image modality plugin for selfflow (sklearn digits, rendered words with
captions, or a folder of images with or without captions; pixel latents by default, a local
diffusers VAE optionally), and the OCR reader that scores prompt following on rendered words."""

from selfflow_image.adapter import (
    DigitsSource,
    FolderSource,
    ImageModality,
    UnreadableImageError,
    UnreadableImagesSkipped,
    make_grid,
    to_uint8,
)
from selfflow_image.captions import (
    CaptionMetadataError,
    MissingCaptionError,
    caption_array,
    captions_field,
    folder_captions,
)
from selfflow_image.encoders import (
    DiffusersVAEEncoder,
    ImageEncoder,
    ImageEncoderConfig,
    PixelEncoder,
)
from selfflow_image.ocr import (
    Reader,
    ReaderCacheError,
    ReaderConfig,
    char_accuracy,
    exact_match,
    load_reader,
    read_words,
    word_scores,
)
from selfflow_image.words import VOCABULARY, WordsSource, heldout_words, train_words

__all__ = [
    "VOCABULARY", "CaptionMetadataError", "DiffusersVAEEncoder", "DigitsSource", "FolderSource",
    "ImageEncoder", "ImageEncoderConfig", "ImageModality", "MissingCaptionError", "PixelEncoder",
    "Reader", "ReaderCacheError", "ReaderConfig", "UnreadableImageError",
    "UnreadableImagesSkipped", "WordsSource", "caption_array", "captions_field", "char_accuracy",
    "exact_match", "folder_captions", "heldout_words", "load_reader", "make_grid", "read_words",
    "to_uint8", "train_words", "word_scores",
]
