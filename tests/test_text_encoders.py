"""Text encoders: the registry and hook, and the built-in byte-level encoder."""

from __future__ import annotations

import pytest
import torch

from selfflow_core import ByteTextEncoder, Components, TextEncoder, hookimpl, make_plugin_manager
from selfflow_core.builtin.text import PAD, VOCAB, utf8_prefix


def test_the_byte_encoder_is_registered_through_the_hook(core_components):
    assert core_components.text_encoders.get("bytes") is ByteTextEncoder.Config
    assert "text encoder:bytes" in core_components.by_plugin()["selfflow_core.builtin.plugin"]


def test_a_plugin_registers_a_text_encoder_through_selfflow_register_text_encoders():
    class Mine(ByteTextEncoder):
        pass

    class MineConfig(ByteTextEncoder.Config):
        kind = "mine"

    class Plugin:
        @hookimpl
        def selfflow_register_text_encoders(self, registry):
            registry.add(MineConfig)

    components = Components(make_plugin_manager([Plugin()], entry_points=False))
    assert components.text_encoders.get("mine") is MineConfig


def test_byte_ids_are_utf8_bytes_plus_one_and_decode_back():
    enc = ByteTextEncoder.Config(max_length=12).build()
    assert isinstance(enc, TextEncoder) and enc.trainable
    out = enc.encode(['a "cat"', "", "héllo"])
    assert out.ids.shape == out.mask.shape == (3, 12) and out.embeddings is None
    assert out.ids[0, :7].tolist() == [b + 1 for b in b'a "cat"']
    assert out.mask.sum(1).tolist() == [7, 0, 6]          # é is two bytes; "" has no tokens
    assert bool((out.ids[~out.mask] == PAD).all()) and int(out.ids.max()) < VOCAB
    assert enc.decode(out.ids) == ['a "cat"', "", "héllo"]
    assert enc.spec().vocab_size == VOCAB and enc.spec().max_length == 12


def test_long_captions_are_cut_at_a_character_boundary():
    assert utf8_prefix("abcé", 4) == b"abc"                # not half of é
    enc = ByteTextEncoder.Config(max_length=4).build()
    assert enc.decode(enc.encode(["abcé", "abcdef"]).ids) == ["abc", "abcd"]


def test_info_names_the_encoder_and_what_changes_its_output():
    a, b = (ByteTextEncoder.Config(max_length=n).build().info() for n in (8, 16))
    assert a["name"] == "bytes" and a["max_length"] == 8 and a != b
    with pytest.raises(ValueError):
        ByteTextEncoder.Config(max_length=0)


def test_encoding_is_deterministic():
    enc = ByteTextEncoder.Config().build()
    x, y = enc.encode(["the word"]), enc.encode(["the word"])
    assert torch.equal(x.ids, y.ids) and torch.equal(x.mask, y.mask)
