"""The rendered-word sources (``words``, ``words_heldout``) and the ``captions`` field."""

from __future__ import annotations

import re

import attrs
import numpy as np
import pytest
import torch
from selfflow_image import ImageModality
from selfflow_image.captions import caption_array, captions_field
from selfflow_image.words import (
    COLOURS,
    MAX_WORD_LENGTH,
    MIN_CONTRAST,
    TEMPLATES,
    VOCABULARY,
    WORD_FIRST_TEMPLATES,
    WordsLook,
    WordsSource,
    _luma,
    draw_style,
    font,
    heldout_words,
    render,
    sample_rng,
    to_float,
    train_words,
    word_index,
)

from selfflow_core import SelfFlowError, encode_store, make_converter, open_store, to_data
from selfflow_core.testing.fixtures import one_thread as one_thread

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTED = ImageModality.Config(size=32, channels=3, patch=4, classes=0, captions=4, count=64)
QUOTED = re.compile(r'"([a-z]+)"')


def _words_of(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+", caption))


# ---- vocabulary and split ---------------------------------------------------------------------

def test_vocabulary_and_split():
    assert len(VOCABULARY) == len(set(VOCABULARY)) == 200
    assert all(re.fullmatch(r"[a-z]{3,4}", w) for w in VOCABULARY)
    assert MAX_WORD_LENGTH == 4
    train, held = train_words(), heldout_words()
    assert len(train) == 160 and len(held) == 40 and not set(train) & set(held)
    assert set(train) | set(held) == set(VOCABULARY)
    assert sum(len(w) == 3 for w in held) == sum(len(w) == 4 for w in held) == 20
    # every letter of a held-out word is seen in training (only the combination is new)
    assert set("".join(held)) <= set("".join(train))
    # the split is fixed: these belong to it (a changed split would change every benchmark)
    assert {"arm", "owl", "door", "worm"} <= set(held) and "cat" in train


def test_no_template_or_colour_word_is_a_vocabulary_word():
    """Else a held-out word could reach the training captions through a template."""
    fixed = set().union(*(_words_of(t.format(w="", c=""))
                          for t in TEMPLATES + WORD_FIRST_TEMPLATES), COLOURS)
    assert not fixed & set(VOCABULARY)


def test_the_bundled_font_is_truetype():
    from PIL import ImageFont

    assert isinstance(font(12), ImageFont.FreeTypeFont)
    assert font(12).getbbox("cat") != font(13).getbbox("cat")


# ---- rendering --------------------------------------------------------------------------------

def test_rendering_is_deterministic_and_depends_on_the_word():
    a = WordsSource("train", count=40, captions=4).read(0, 40)
    b = WordsSource("train", count=40, captions=4).read(0, 40)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["captions"].tolist() == b["captions"].tolist()
    # reading in pieces, and in another order, gives the same samples
    src = WordsSource("train", count=40, captions=4)
    late, early = src.read(30, 40), src.read(0, 10)
    np.testing.assert_array_equal(late["images"], a["images"][30:])
    np.testing.assert_array_equal(early["images"], a["images"][:10])
    # another seed, other renders
    other = WordsSource("train", count=40, seed=1).read(0, 40)
    assert not np.array_equal(other["images"], a["images"])
    # the same style with another word: another image; the same word again: the same image
    style = draw_style("cat", sample_rng(0, "words", 5), 32)
    cat = render(style, 32)
    assert cat.shape == (32, 32, 3) and cat.dtype == np.uint8
    np.testing.assert_array_equal(cat, render(attrs.evolve(style), 32))
    for other_word in ("cot", "car", "bat", "cats"):
        assert not np.array_equal(cat, render(attrs.evolve(style, word=other_word), 32))
    # samples of different words differ; the ink covers more for a longer word
    assert len({a["images"][i].tobytes() for i in range(40)}) == 40
    ink = [np.abs(render(attrs.evolve(style, word=w), 32).astype(int) - cat[0, 0]).sum()
           for w in ("cat", "cats")]
    assert ink[1] > ink[0]


def test_samples_vary_in_size_position_colour_and_background():
    src = WordsSource("train", count=400)
    styles = [src.style(i) for i in range(400)]
    assert len({s.font_size for s in styles}) >= 3
    assert len({s.x for s in styles}) >= 5 and len({s.y for s in styles}) >= 5
    assert {s.colour for s in styles} == set(COLOURS)
    assert {s.gradient for s in styles} == {"none", "horizontal", "vertical"}
    assert len({s.background[0] for s in styles}) > 300


def test_black_or_white_backgrounds_are_solid_and_set_by_the_text_colour():
    """``background="black_or_white"``: black behind the light colours, white behind the
    others, never a gradient; every colour still appears, the text contrasts with its
    background, and the setting reaches the config data only when set."""
    look = attrs.evolve(WordsLook.plain(), background="black_or_white")
    src = WordsSource("train", count=200, look=look)
    styles = [src.style(i) for i in range(200)]
    assert {s.colour for s in styles} == set(COLOURS)
    light = {"yellow", "orange", "white"}
    for style in styles:
        want = (0, 0, 0) if style.colour in light else (255, 255, 255)
        assert style.background == (want, want) and style.gradient == "none", style
        assert abs(_luma(style.rgb) - _luma(want)) >= MIN_CONTRAST
    image = render(styles[0], 32)
    assert (image == styles[0].background[0]).mean() > 0.5  # mostly background
    # the word and the jitter are drawn as in the plain look: only the background differs
    plain = WordsSource("train", count=8, look=WordsLook.plain())
    assert [src.style(i).word for i in range(8)] == [plain.style(i).word for i in range(8)]
    conv = make_converter()
    assert "background" not in to_data(conv, ImageModality.Config(words=WordsLook.plain()))["words"]
    data = to_data(conv, ImageModality.Config(words=look))
    assert data["words"]["background"] == "black_or_white"
    with pytest.raises(ValueError, match="'gradients' must be false"):
        WordsLook(background="black_or_white")
    with pytest.raises(ValueError):
        WordsLook(gradients=False, background="grey")


def test_the_plain_look_centres_one_monospaced_size_on_solid_backgrounds():
    plain = WordsLook.plain()
    src = WordsSource("train", count=400, look=plain)
    styles = [src.style(i) for i in range(400)]
    assert {s.font for s in styles} == {"dejavu-sans-mono-bold"}
    assert {s.font_size for s in styles} == {11}
    assert {s.gradient for s in styles} == {"none"} and {s.colour for s in styles} == set(COLOURS)
    images = src.read(0, 400)["images"]
    for style, image in zip(styles, images):
        cx, cy = _ink_centre(image)
        # within the jitter (and a pixel of rounding) of the image's centre
        assert abs(cx - 15.5) <= 2.5 and abs(cy - 15.5) <= 3.5, style
    # the varied look spreads words over the image
    varied = WordsSource("train", count=400).read(0, 400)["images"]
    assert np.std([_ink_centre(x)[1] for x in varied]) > 2 * np.std(
        [_ink_centre(x)[1] for x in images])
    # monospaced: every letter has the same advance
    mono = font(11, "dejavu-sans-mono-bold")
    assert {mono.getlength(w) / len(w) for w in VOCABULARY} == {mono.getlength("m")}


def _ink_centre(image: np.ndarray) -> tuple[float, float]:
    """The centre (x, y) of the pixels that differ from the image's corner (the background)."""
    diff = np.abs(image - image[:, :1, :1]).sum(0) > 0.3
    ys, xs = np.nonzero(diff)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2


def test_looks_are_checked_and_a_missing_font_is_named(monkeypatch):
    import selfflow_image.words as words

    with pytest.raises(ValueError, match="font_sizes"):
        WordsLook(font_sizes=(12, 10))
    with pytest.raises(ValueError, match="font"):
        WordsLook(font="comic-sans")
    monkeypatch.setattr(words, "FONT_DIRS", ("/nonexistent",))
    with pytest.raises(SelfFlowError, match="fonts-dejavu-core"):  # the CLI's one line
        WordsSource("train", count=4, look=WordsLook.plain())
    WordsSource("train", count=4)  # the bundled font needs no file


def test_a_look_left_at_its_default_is_not_in_the_config_data():
    """``words`` came after stores and checkpoints were written: left at its default it is not
    in the config's data, so those still match (their configs are compared as data)."""
    from selfflow_core import structure

    conv = make_converter()
    default = to_data(conv, ImageModality.Config())
    assert "words" not in default
    plain = ImageModality.Config(words=WordsLook.plain())
    data = to_data(conv, plain)
    assert data["words"] == {"font": "dejavu-sans-mono-bold", "font_sizes": [11, 11],
                             "placement": "centred", "gradients": False}
    assert structure(conv, data, ImageModality.Config) == plain
    assert structure(conv, default, ImageModality.Config) == ImageModality.Config()
    adapter = attrs.evolve(PROMPTED, words=WordsLook.plain()).build()
    got = adapter.open_source("words").read(0, 8)
    want = WordsSource("train", count=8, captions=4, look=WordsLook.plain()).read(0, 8)
    assert np.array_equal(got["images"], want["images"])
    # evaluation prompts come from the same look's held-out renders (captions follow the style)
    from selfflow_image.ocr import heldout_prompts

    assert adapter.evaluation_prompts(6) == [c[0] for c in heldout_prompts(
        6, size=32, look=WordsLook.plain())[1]]


def test_read_gives_images_labels_and_captions():
    out = WordsSource("train", count=20, captions=3).read(0, 20)
    assert out["images"].shape == (20, 3, 32, 32) and out["images"].dtype == np.float32
    assert out["images"].min() >= -1.0 and out["images"].max() <= 1.0
    assert out["labels"].dtype == np.int64
    assert [VOCABULARY[i] for i in out["labels"]] == list(train_words()[:20])
    assert out["captions"].shape == (20, 3) and out["captions"].dtype == object
    grey = WordsSource("train", count=4, channels=1).read(0, 4)["images"]
    assert grey.shape == (4, 1, 32, 32)
    assert "captions" not in WordsSource("train", count=4).read(0, 4)


def test_heldout_words_never_appear_in_the_training_source():
    src = WordsSource("train", count=640, captions=8)  # every train word 4 times
    out = src.read(0, len(src))
    held = set(heldout_words())
    drawn = [VOCABULARY[i] for i in out["labels"]]
    assert set(drawn) == set(train_words())
    for i in range(len(src)):
        style = src.style(i)
        assert style.word not in held and style.word == drawn[i]
        for caption in out["captions"][i]:
            assert not _words_of(caption) & held, caption
    # and the images are the renders of those training words
    np.testing.assert_array_equal(out["images"][7:8], to_float(render(src.style(7), 32)[None], 3))
    # the held-out source draws exactly the held-out words, in another random stream
    h = WordsSource("heldout", count=80, captions=2).read(0, 80)
    assert {VOCABULARY[i] for i in h["labels"]} == held


def test_captions_name_the_rendered_word_and_its_colour():
    src = WordsSource("train", count=200, captions=len(TEMPLATES))
    named = 0
    for i in range(0, 200, 7):
        image, style, captions = src.sample(i)
        assert len(captions) == len(TEMPLATES) == len(set(captions))  # distinct templates
        for caption in captions:
            assert QUOTED.findall(caption) == [style.word], caption
            colours = _words_of(caption) & set(COLOURS)
            assert colours <= {style.colour}, (caption, style.colour)
            named += bool(colours)
        # the colour named is the colour drawn: the pixels most unlike the background
        px = image.reshape(-1, 3).astype(float)
        bg = np.median(px, axis=0)
        far = px[np.linalg.norm(px - bg, axis=1) > 0.9 * np.linalg.norm(px - bg, axis=1).max()]
        assert np.abs(far.mean(0) - np.asarray(style.rgb)).max() < 40, (style, far.mean(0))
    assert named > 0


def test_word_first_captions_put_the_word_at_the_same_bytes():
    """``templates="word_first"``: every caption begins with the quoted word (bytes 1 to
    len(word)), names only the drawn colour, and the renders are those of the default
    templates (the captions do not change the images or the reader)."""
    from selfflow_image.ocr import ReaderConfig

    look = attrs.evolve(WordsLook.plain(), templates="word_first")
    src = WordsSource("train", count=60, captions=len(WORD_FIRST_TEMPLATES), look=look)
    plain = WordsSource("train", count=60, captions=4, look=WordsLook.plain())
    seen = set()
    for i in range(60):
        image, style, captions = src.sample(i)
        assert len(set(captions)) == len(WORD_FIRST_TEMPLATES)
        for caption in captions:
            assert caption.startswith(f'"{style.word}"'), caption
            assert _words_of(caption) & set(COLOURS) <= {style.colour}
            seen.add(caption.replace(style.word, "{w}").replace(style.colour, "{c}"))
        np.testing.assert_array_equal(image, plain.sample(i)[0])
    assert seen == set(WORD_FIRST_TEMPLATES)
    assert ReaderConfig(look=look).key() == ReaderConfig(look=WordsLook.plain()).key()
    conv = make_converter()
    assert "templates" not in to_data(conv, ImageModality.Config(words=WordsLook.plain()))["words"]
    assert to_data(conv, ImageModality.Config(words=look))["words"]["templates"] == "word_first"
    with pytest.raises(ValueError):
        WordsLook(templates="first")


def test_captions_come_from_k_distinct_templates_then_repeat():
    _, _, caps = WordsSource("train", count=1, captions=4).sample(0)
    assert len(set(caps)) == 4
    _, _, many = WordsSource("train", count=1, captions=13).sample(0)
    assert len(many) == 13 and len(set(many)) == len(TEMPLATES)


# ---- the adapter ------------------------------------------------------------------------------

def test_adapter_sources_and_fields():
    adapter = PROMPTED.build()
    assert adapter.sources() == ("digits", "words", "words_heldout")
    fields = adapter.fields()
    assert set(fields) == {"latents", "labels", "captions"}
    assert fields["captions"].shape == (4,) and fields["captions"].dtype == "str"
    assert set(ImageModality.Config().build().fields()) == {"latents", "labels"}
    assert ImageModality.Config().captions == 0
    src = adapter.open_source("words_heldout")
    assert src.split == "heldout" and len(src) == 64


def test_adapter_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"200 classes\) but classes=10"):
        ImageModality.Config(size=32, channels=3, patch=4).build().open_source("words")
    ImageModality.Config(size=32, channels=3, patch=4, classes=200).build().open_source("words")
    with pytest.raises(ValueError, match="size >= 24"):
        ImageModality.Config(size=16, patch=4, classes=0).build().open_source("words")
    with pytest.raises(ValueError, match="built-in sources: digits, words, words_heldout"):
        PROMPTED.build().open_source("no-such-source")
    # a source without captions under a config that wants them
    with pytest.raises(ValueError, match="gave no captions"):
        PROMPTED.build().encode(WordsSource("train", count=2).read(0, 2))


def test_encode_passes_captions_through_and_tokenize_ignores_them():
    adapter = PROMPTED.build()
    raw = adapter.open_source("words").read(0, 6)
    out = adapter.encode(raw)
    assert out["captions"].dtype == object and out["captions"].shape == (6, 4)
    assert out["captions"].tolist() == raw["captions"].tolist()
    assert all(isinstance(c, str) for c in out["captions"].reshape(-1))
    np.testing.assert_array_equal(out["latents"], raw["images"])
    fields = {"latents": torch.from_numpy(out["latents"]),
              "labels": torch.from_numpy(out["labels"]), "captions": out["captions"]}
    with_text = adapter.tokenize(fields)
    without = adapter.tokenize({k: v for k, v in fields.items() if k != "captions"})
    torch.testing.assert_close(with_text.tokens, without.tokens)
    assert with_text.labels is None and with_text.text is None and with_text.text_ids is None


def test_caption_helpers():
    arr = caption_array([["a", "b", "c"], [], ["x"]], 2)
    assert arr.dtype == object and arr.tolist() == [["a", "b"], ["", ""], ["x", ""]]
    with pytest.raises(TypeError, match="not str"):
        caption_array([[3]], 1)
    with pytest.raises(ValueError, match=r"expected \[n, 2\]"):
        captions_field({"captions": np.array([["a"]], dtype=object)}, 2)
    with pytest.raises(TypeError, match="must be str"):
        captions_field({"captions": np.array([[None]], dtype=object)}, 1)


def test_digits_captions():
    adapter = ImageModality.Config(captions=3).build()
    out = adapter.encode(adapter.open_source("digits").read(0, 12))
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for label, caps in zip(out["labels"], out["captions"]):
        assert len(set(caps)) == 3
        for c in caps:
            assert str(label) in c.split() or names[label] in c.split(), (label, c)


def test_captions_round_trip_through_the_store(tmp_path):
    path = tmp_path / "words.zarr"
    adapter = PROMPTED.build()
    encode_store(adapter, "words", path, adapter_config=to_data(make_converter(), PROMPTED),
                 progress=False, batch_size=16)
    store = open_store(path)
    assert store.schema["fields"]["captions"] == {"shape": [4], "dtype": "str"}
    got = store.read([0, 5, 63])
    want = adapter.open_source("words").read(0, 64)
    assert [[str(c) for c in row] for row in got["captions"]] == \
        want["captions"][[0, 5, 63]].tolist()
    np.testing.assert_array_equal(got["latents"], want["images"][[0, 5, 63]])
    np.testing.assert_array_equal(got["labels"], [word_index(train_words()[i]) for i in (0, 5, 63)])


def test_the_grid_look_draws_each_letter_centred_in_its_own_cell():
    """A ``grid`` render is, cell by cell, the render of each of its letters alone in the
    first cell: no letter's ink crosses into another's cell, and where a letter sits depends
    only on its place in the word."""
    look = WordsLook(font="dejavu-sans-mono-bold", font_sizes=(12, 12), placement="grid",
                     gradients=False)
    src = WordsSource("train", count=40, look=look)
    cell = 32 // MAX_WORD_LENGTH
    for i in range(40):
        style = src.style(i)
        assert (style.cell, style.x) == (cell, 0) and style.gradient == "none"
        image = render(style, 32)
        for j, letter in enumerate(style.word):
            alone = render(attrs.evolve(style, word=letter), 32)
            np.testing.assert_array_equal(image[:, j * cell:(j + 1) * cell], alone[:, :cell])
        # the cells after the word are background
        assert (image[:, len(style.word) * cell:] == style.background[0]).all()
    # one line height for every word: the ink's rows do not depend on the word
    rows = {tuple(np.nonzero((np.abs(src.read(i, i + 1)["images"][0] - src.read(i, i + 1)[
        "images"][0][:, :1, :1]).sum(0) > 0.3).any(1))[0][[0, -1]]) for i in range(40)}
    assert max(r[1] for r in rows) - min(r[0] for r in rows) <= 14
    with pytest.raises(ValueError, match="does not fit"):   # letters wider than a cell
        draw_style("cat", sample_rng(0, "words", 0), 32, attrs.evolve(look, font_sizes=(20, 20)))
