"""The built-in byte-level text encoder: a caption's UTF-8 bytes are its tokens.

Nothing is pretrained or downloaded: the encoder only turns text into ids (byte + 1; 0 is
padding) and a mask; the backbone embeds the ids with a table of ``vocab_size = 257`` rows that
is trained jointly with it (the text stream of the MMDiT then contextualises them). Every
character is visible to the model letter by letter, which is what rendering unseen words needs.
Captions longer than ``max_length`` bytes are cut (at a character boundary).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from attrs import validators as v

from selfflow_core.interfaces import TextEncoder, TextEncoderConfig, TextEncoding, TextSpec

PAD = 0
VOCAB = 257  # 256 byte values + padding


def utf8_prefix(text: str, limit: int) -> bytes:
    """``text``'s UTF-8 bytes, cut to at most ``limit`` without splitting a character."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", errors="ignore").encode("utf-8")


class ByteTextEncoder(TextEncoder):
    """Captions -> byte ids ``[B, max_length]`` (+1; 0 pads) and their mask."""

    trainable = True

    @attrs.frozen(kw_only=True)
    class Config(TextEncoderConfig):
        """``max_length``: bytes per caption (longer ones are cut)."""

        kind = "bytes"
        max_length: int = attrs.field(default=64, validator=[v.ge(1), v.le(4096)])

        def build(self) -> ByteTextEncoder:
            return ByteTextEncoder(self)

    def __init__(self, config: Config) -> None:
        self.config = config

    def spec(self) -> TextSpec:
        return TextSpec(max_length=self.config.max_length, vocab_size=VOCAB)

    def encode(self, captions: Sequence[str]) -> TextEncoding:
        n, length = len(captions), self.config.max_length
        ids = torch.full((n, length), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            data = utf8_prefix(str(caption), length)
            if data:
                ids[i, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1
        return TextEncoding(ids=ids, mask=ids != PAD)

    def info(self) -> dict:
        return {"name": "bytes", "version": "1", "max_length": self.config.max_length,
                "dtype": "int64", "vocab_size": VOCAB}

    @staticmethod
    def decode(ids: torch.Tensor) -> list[str]:
        """The captions back from ids ``[B, L]`` (padding dropped)."""
        return [bytes((row[row != PAD] - 1).tolist()).decode("utf-8", errors="replace")
                for row in ids]
