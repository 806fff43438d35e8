"""The fixed OCR reader (the prompt-following evaluator) and its metrics."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from selfflow_image import ocr
from selfflow_image.ocr import (
    ReaderCacheError,
    ReaderConfig,
    char_accuracy,
    decode_logits,
    edit_distance,
    exact_match,
    heldout_prompts,
    load_reader,
    read_words,
    word_scores,
)
from selfflow_image.words import VOCABULARY, WordsSource, heldout_words

from selfflow_core import SelfFlowError
from selfflow_core.testing.fixtures import one_thread as one_thread

pytestmark = pytest.mark.usefixtures("one_thread")

#: a reader small enough for the tests (~20-40 s on one thread); the default is bigger
TINY = ReaderConfig(steps=600, renders_per_word=16, width=8, lr=5e-3, eval_renders=400)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reader-cache")


@pytest.fixture(scope="module")
def reader(cache):
    from selfflow_core.testing.fixtures import torch_threads

    with torch_threads(1):
        return load_reader(TINY, cache_dir=cache, progress=False)


# ---- metrics ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("pred", "target", "exact", "chars"), [
    ("cat", "cat", 1.0, 1.0),
    ("CAT ", "cat", 1.0, 1.0),      # lower-cased and stripped
    ("cut", "cat", 0.0, 2 / 3),     # one substitution of 3
    ("cats", "cat", 0.0, 3 / 4),    # one insertion; the longer has 4
    ("ct", "cat", 0.0, 2 / 3),      # one deletion
    ("tac", "cat", 0.0, 1 / 3),     # two substitutions
    ("dog", "cat", 0.0, 0.0),
    ("", "cat", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("moon", "mon", 0.0, 3 / 4),
])
def test_metrics_by_hand(pred, target, exact, chars):
    assert exact_match(pred, target) == exact
    assert math.isclose(char_accuracy(pred, target), chars)


def test_edit_distance_and_word_scores():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    s = word_scores(["cat", "cut", "dog"], ["cat", "cat", "cat"])
    assert s["count"] == 3 and math.isclose(s["exact_match"], 1 / 3)
    assert math.isclose(s["char_accuracy"], (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        word_scores(["a", "b"], ["a"])


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    # columns: m m _ o _ o o n  ->  "moon"
    classes = [13, 13, 0, 15, 0, 15, 15, 14]
    log_probs = torch.full((len(classes), 1, 27), -10.0)
    log_probs[torch.arange(len(classes)), 0, torch.tensor(classes)] = 0.0
    assert decode_logits(log_probs) == ["moon"]


# ---- the reader -------------------------------------------------------------------------------

def test_reader_reads_real_heldout_renders(reader):
    """The ceiling: renders of held-out words it never saw in these styles (another seed and
    stream than its training renders) are read almost always right."""
    src = WordsSource("heldout", count=240, seed=3)
    out = src.read(0, 240)
    words = [VOCABULARY[i] for i in out["labels"]]
    scores = word_scores(reader.read(out["images"]), words)
    assert scores["exact_match"] > 0.9 and scores["char_accuracy"] > 0.95, scores
    recorded = reader.info["ceiling"]["heldout"]
    assert recorded["count"] == 400 and recorded["exact_match"] > 0.9, recorded


def test_reader_on_noise_reads_nothing_right(reader):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((200, 3, 32, 32), generator=g) * 2 - 1
    targets = [heldout_words()[i % 40] for i in range(200)]
    scores = word_scores(reader.read(noise), targets)
    assert scores["exact_match"] < 0.02 and scores["char_accuracy"] < 0.3, scores
    flat = torch.zeros((20, 3, 32, 32))  # a blank image holds no word
    assert sum(map(len, reader.read(flat))) <= 20
    assert reader.info["ceiling"]["noise"]["exact_match"] < 0.02


def test_reader_accepts_uint8_and_grey_images(reader):
    out = WordsSource("heldout", count=40, seed=5).read(0, 40)
    words = reader.read(out["images"])
    as_uint8 = np.rint((out["images"].transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    assert read_words(as_uint8, reader) == words
    assert reader.read(torch.from_numpy(out["images"])) == words
    grey = WordsSource("heldout", count=40, seed=5, channels=1).read(0, 40)
    target = [VOCABULARY[i] for i in grey["labels"]]
    assert word_scores(reader.read(grey["images"]), target)["exact_match"] > 0.8
    with pytest.raises(ValueError, match="reads 32x32 images"):
        reader.read(np.zeros((2, 3, 16, 16), np.float32))


def test_reader_is_cached_with_its_hash(reader, cache, monkeypatch):
    folder = cache / "ocr_reader" / "v1" / TINY.key()
    record = json.loads((folder / "reader.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / "reader.pt").read_bytes()).hexdigest()
    assert record["sha256"] == reader.info["sha256"] == ocr.weights_sha256(reader.net)
    assert record["settings"] == TINY.settings() and record["settings"]["seed"] == 1
    assert record["heldout_words"] == list(heldout_words())

    def no_training(config):
        raise AssertionError("trained again although the reader is cached")

    monkeypatch.setattr(ocr, "train_reader", no_training)
    again = load_reader(TINY, cache_dir=cache)
    for a, b in zip(again.net.state_dict().values(), reader.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # other settings, another folder
    assert ReaderConfig(seed=2).key() != ReaderConfig().key() != TINY.key()


def test_a_tampered_cache_is_refused(reader, cache, tmp_path):
    import shutil

    folder = cache / "ocr_reader" / "v1" / TINY.key()
    copy = tmp_path / "ocr_reader" / "v1" / TINY.key()
    shutil.copytree(folder, copy)
    data = bytearray((copy / "reader.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "reader.pt").write_bytes(bytes(data))
    with pytest.raises(ReaderCacheError, match="does not match its record") as info:
        load_reader(TINY, cache_dir=tmp_path)
    assert isinstance(info.value, SelfFlowError) and str(copy) in str(info.value)


def test_heldout_prompts_are_the_heldout_sources_captions():
    words, caps = heldout_prompts(12, k=2)
    src = WordsSource("heldout", count=12, captions=2).read(0, 12)
    assert words == [VOCABULARY[i] for i in src["labels"]]
    assert caps == src["captions"].tolist()
    assert all(f'"{w}"' in c for w, row in zip(words, caps) for c in row)


# ---- the image modality's prompt evaluator ----------------------------------------------------

def test_the_adapter_scores_renders_of_the_prompted_word(reader, monkeypatch):
    """``prompt_metrics``: the fixed reader on decoded samples against each prompt's quoted
    word. Real renders of held-out words score high; the same renders against other prompts
    score near zero."""
    import selfflow_image.ocr as ocr
    from selfflow_image import ImageModality
    from selfflow_image.adapter import quoted_word

    monkeypatch.setattr(ocr, "default_reader", lambda look=None: reader)
    adapter = ImageModality.Config(size=32, channels=3, patch=4, classes=0, captions=2).build()
    prompts = adapter.evaluation_prompts(24)
    assert len(prompts) == 24 and all(quoted_word(p) in ocr.heldout_words() for p in prompts)
    src = adapter.open_source("words_heldout")
    raw = src.read(0, 24)
    latents = torch.from_numpy(adapter.encode(raw)["latents"])
    right = adapter.prompt_metrics(latents, prompts)
    assert right["exact_match"] > 0.6 and right["char_accuracy"] > 0.85  # the tests' tiny reader
    shifted = prompts[1:] + prompts[:1]
    wrong = adapter.prompt_metrics(latents, shifted)
    assert wrong["exact_match"] < 0.2
    assert quoted_word('a sign that says "owl"') == "owl" and quoted_word(" owl ") == "owl"
    assert ImageModality.Config().build().evaluation_prompts(4) == []


def test_the_t2i_words_preset_trains_from_prompts(tmp_path, monkeypatch):
    import json

    from selfflow_image.presets import T2I_PROMPTS, t2i_words, t2i_words_debug_tiny

    from selfflow_core import ByteTextEncoder, Components, MMDiT, Trainer

    full = t2i_words()
    assert isinstance(full.backbone, MMDiT.Config) and isinstance(full.text_encoder,
                                                                  ByteTextEncoder.Config)
    assert full.modalities["image"].modality.captions == 4
    assert full.sampling.prompts == T2I_PROMPTS
    # the recipe that follows prompts at this budget (benchmarks/RESULTS.md)
    look = full.modalities["image"].modality.words
    assert (look.background, look.templates, look.placement) == ("black_or_white", "word_first",
                                                                 "grid")
    assert full.backbone.absolute_positions and full.backbone.prediction == "data"
    assert all(p.startswith('"') for p in T2I_PROMPTS)
    monkeypatch.chdir(tmp_path)
    tiny = t2i_words_debug_tiny()
    assert tiny.sampling.prompts == T2I_PROMPTS and isinstance(tiny.backbone, MMDiT.Config)
    trainer = Trainer(tiny, components=Components(), progress=False)
    trainer.fit()
    out = trainer.samples_dir() / "image"
    assert json.loads((out / "prompts.json").read_text())["000"] == T2I_PROMPTS[0]
    assert (out / "samples.png").is_file()
    # one file per sample, named after its prompt; the grid is taller than the images alone
    assert (out / "000-cat-on-a-sign.png").is_file()
    from PIL import Image

    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape[0] > 2 * 96


def test_a_reader_is_trained_and_cached_for_its_look():
    """The look of the renders is part of the reader's settings (a reader of the varied look
    misreads monospaced centred words); the default look leaves the settings, and so the
    default reader's cache folder, as they were before looks existed."""
    import attrs
    from selfflow_image.words import WordsLook

    plain = attrs.evolve(TINY, look=WordsLook.plain())
    assert "look" not in TINY.settings() and plain.settings()["look"]["font_sizes"] == [11, 11]
    assert plain.key() != TINY.key()
    assert "background" not in plain.settings()["look"]  # added later: old keys stay valid
    dark = attrs.evolve(TINY, look=attrs.evolve(WordsLook.plain(), background="black_or_white"))
    assert dark.settings()["look"]["background"] == "black_or_white" and dark.key() != plain.key()
    json.dumps(plain.settings())  # the cache record is JSON
    words = ["cat", "moon"]
    ours = ocr._renders(words, 1, "reader", 32, WordsLook.plain())
    want = WordsSource("train", count=1, look=WordsLook.plain())  # the same drawing code
    from selfflow_image.words import draw_style, render, sample_rng

    for i, w in enumerate(words):
        style = draw_style(w, sample_rng(1, "reader", i), 32, want.look)
        assert style.font == "dejavu-sans-mono-bold" and np.array_equal(ours[i], render(style, 32))
    assert not np.array_equal(ours, ocr._renders(words, 1, "reader", 32, WordsLook()))
