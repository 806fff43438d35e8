"""Text to speech: the spoken-words source and its captions, the fixed evaluator (word classifier,
pitch and speed measures), the adapter's prompt hooks and the t2a presets."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from selfflow_audio import AudioModality
from selfflow_audio import evaluator as ev
from selfflow_audio.evaluator import (
    ClassifierCacheError,
    ClassifierConfig,
    load_classifier,
    pitch_features,
    prompt_scores,
    real_latents,
    voiced_seconds,
)
from selfflow_audio.words import (
    COMBINATIONS,
    FULL_TEMPLATES,
    TEMPLATES,
    VOCABULARY,
    Prompt,
    SpokenWordsSource,
    caption,
    captions_for,
    draw_clip,
    evaluation_prompts,
    heldout_combination,
    parse_prompt,
    sample_rng,
    triples,
)

from selfflow_core import SelfFlowError
from selfflow_core.testing import ModalityContract
from selfflow_core.testing.fixtures import torch_threads

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; scripts/setup.sh does it)")

#: an evaluator small enough for the tests (480 clips, 300 steps); the default is bigger
TINY = ClassifierConfig(clips_per_triple=4, steps=300, width=24, eval_clips=120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("word-classifier-cache")


@pytest.fixture(scope="module")
def classifier(cache):
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    with torch_threads(1):
        return load_classifier(TINY, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def heldout_clips(cache):
    """Real clips of the held-out triples from another seed than the ceiling's (seed 3)."""
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    return real_latents(TINY, "heldout", 60, seed=3, cache_dir=cache)


def prompts_of(raw, template=FULL_TEMPLATES[0]):
    return [caption(template, Prompt(VOCABULARY[y], ("low", "high")[p], ("slow", "fast")[s]))
            for y, p, s in zip(raw["labels"], raw["pitch"], raw["speed"])]


# ---- vocabulary, split, captions (no espeak-ng needed) ----------------------------------------

def test_vocabulary_and_the_heldout_combinations():
    assert len(VOCABULARY) == len(set(VOCABULARY)) == 30
    assert VOCABULARY[:10] == ("zero", "one", "two", "three", "four", "five", "six", "seven",
                               "eight", "nine")  # the digits keep their spoken_digits labels
    train, held, every = triples("train"), triples("heldout"), triples("all")
    assert (len(train), len(held), len(every)) == (90, 30, 120)
    assert not set(train) & set(held) and set(train) | set(held) == set(every)
    assert {w for w, _, _ in train} == {w for w, _, _ in held} == set(VOCABULARY)
    for w, p, s in held:  # one combination per word, never in training
        assert heldout_combination(w) == (p, s)
        assert sum(t[0] == w for t in train) == 3
    counts = Counter((p, s) for _, p, s in held)  # each combination held out for ~1/4 the words
    assert set(counts) == set(COMBINATIONS) and min(counts.values()) >= 7
    assert heldout_combination("seven") == ("high", "fast")
    assert heldout_combination("cat") == ("low", "slow")
    with pytest.raises(ValueError, match="split must be"):
        triples("test")


@pytest.mark.parametrize(("prompt", "expected"), [
    ('"seven" said slowly by a low voice', ("seven", "low", "slow")),
    ('the word "cat"', ("cat", None, None)),
    ('a high voice saying "dog"', ("dog", "high", None)),
    ('a fast "water" in a high voice', ("water", "high", "fast")),
    ('someone saying "no" quickly', ("no", None, "fast")),
    ('"Hello " spoken in a deep voice', ("hello", "low", None)),
    ('a slow voice saying "up"', ("up", None, "slow")),
    ('say seven slowly', ("seven", None, "slow")),       # no quotes: the first vocabulary word
    ('the word "owl"', (None, None, None)),             # not a vocabulary word
    ('"high" said by a low voice', (None, "low", None)),  # attributes only outside the quotes
])
def test_parse_prompt_by_hand(prompt, expected):
    assert tuple(parse_prompt(prompt)) == expected


def test_captions_name_the_word_and_the_true_attributes():
    """Every template, for every combination, parses back to the clip's word and exactly the
    attributes it names (the true ones); K captions use distinct templates."""
    for i, (w, p, s) in enumerate(triples("all")):
        clip = draw_clip(w, p, s, sample_rng(0, "train", i))
        for t in TEMPLATES:
            got = parse_prompt(caption(t, clip))
            assert got.word == w
            assert got.pitch == (p if "{p}" in t else None)
            assert got.speed == (s if "{s}" in t or "{a}" in t else None)
        caps = captions_for(clip, sample_rng(0, "train", i), 4)
        assert len(set(caps)) == 4 and all(f'"{w}"' in c for c in caps)
    assert caption('"{w}" said {s} by a {p} voice', Prompt("seven", "low", "slow")) == (
        '"seven" said slowly by a low voice')
    # a drawn clip's voice and espeak settings are those of its attributes
    clip = draw_clip("cat", "high", "fast", np.random.default_rng(0))
    assert clip.voice.startswith("en") and "+f" in clip.voice
    assert 220 <= clip.espeak_speed <= 280 and 70 <= clip.espeak_pitch <= 95


def test_evaluation_prompts_ask_for_heldout_triples_with_both_attributes():
    prompts = evaluation_prompts(60)
    held = set(triples("heldout"))
    parsed = [parse_prompt(p) for p in prompts]
    assert all(tuple(p) in held for p in parsed)
    assert {tuple(p) for p in parsed} == held  # all 30, in 30 prompts
    assert len({p.split('"')[0] + p.split('"')[2] for p in prompts[:3]}) == 3  # templates vary
    assert prompts == evaluation_prompts(60) and evaluation_prompts(5) == prompts[:5]


# ---- the source -------------------------------------------------------------------------------

@needs_espeak
class TestSpokenWordsContract(ModalityContract):
    """The core's contract kit on the captioned layout (a ``captions`` text field)."""

    config = AudioModality.Config(classes=0, captions=3, count=16)
    source = "spoken_words"


@needs_espeak
def test_spoken_words_source(tmp_path, monkeypatch):
    src = SpokenWordsSource("train", count=12, samples=16256, captions=3, cache_dir=tmp_path)
    out = src.read(0, 12)
    assert out["waves"].shape == (12, 16256) and out["waves"].dtype == np.float32
    assert np.abs(out["waves"]).max() == pytest.approx(0.8, abs=1e-3)
    assert out["captions"].shape == (12, 3)
    for i in range(12):
        clip = src.clip(i)
        assert (clip.word, clip.pitch, clip.speed) == triples("train")[i]
        assert out["labels"][i] == VOCABULARY.index(clip.word)
        assert out["pitch"][i] == (clip.pitch == "high") and out["speed"][i] == (
            clip.speed == "fast")
        for c in out["captions"][i]:  # the captions name this clip's word and true attributes
            got = parse_prompt(c)
            assert got.word == clip.word and got.pitch in (None, clip.pitch)
            assert got.speed in (None, clip.speed)
    # cached: a second read runs no espeak-ng, and gives the same clips
    import subprocess

    def no_espeak(*args, **kwargs):
        raise AssertionError("espeak-ng ran although the clip is cached")

    monkeypatch.setattr(subprocess, "run", no_espeak)
    again = SpokenWordsSource("train", count=12, samples=16256, captions=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.read_indices([3, 0])["waves"], out["waves"][[3, 0]])
    assert again.read(0, 12)["captions"].tolist() == out["captions"].tolist()
    # the held-out split speaks only held-out triples; another stream draws other voices
    held = SpokenWordsSource("heldout", count=30, samples=16256, cache_dir=tmp_path)
    assert [tuple(held.clip(i))[:3] for i in range(30)] == list(triples("heldout"))
    other = SpokenWordsSource("all", count=120, samples=16256, stream="evaluator", seed=1,
                              cache_dir=tmp_path)
    ours = SpokenWordsSource("all", count=120, samples=16256, cache_dir=tmp_path)
    assert sum(other.clip(i) == ours.clip(i) for i in range(120)) < 5


# ---- the evaluator ----------------------------------------------------------------------------

def test_the_classifier_hears_the_prompted_word(classifier, heldout_clips):
    """The ceiling: real clips of the held-out triples (a seed the evaluator never heard)
    score high against their own prompts, and low against other words' prompts."""
    latents, raw = heldout_clips
    prompts = prompts_of(raw)
    right = classifier.score(latents, prompts)
    assert right["word_acc"] > 0.85, right
    assert right["pitch_acc"] > 0.95 and right["speed_acc"] > 0.9, right
    assert right["word_count"] == right["pitch_count"] == right["speed_count"] == 60
    wrong = classifier.score(latents, prompts[7:] + prompts[:7])  # other words
    assert wrong["word_acc"] < 0.1, wrong
    flipped = [caption(FULL_TEMPLATES[0], Prompt(VOCABULARY[y], ("high", "low")[p],
                                                   ("fast", "slow")[s]))
               for y, p, s in zip(raw["labels"], raw["pitch"], raw["speed"])]
    opposite = classifier.score(latents, flipped)  # the same words, the other attributes
    assert opposite["word_acc"] == right["word_acc"]
    assert opposite["pitch_acc"] < 0.05 and opposite["speed_acc"] < 0.1, opposite
    noise = classifier.score(torch.randn(latents.shape, generator=torch.Generator()
                                         .manual_seed(0)), prompts)
    assert noise["word_acc"] < 0.15
    recorded = classifier.info["ceiling"]
    assert recorded["heldout"]["word_acc"] > 0.85 and recorded["train"]["word_acc"] > 0.85
    assert recorded["mismatched_word"]["word_acc"] < 0.1


def test_prompt_scores_only_report_what_prompts_ask(classifier, heldout_clips):
    latents, raw = heldout_clips
    words_only = [f'the word "{VOCABULARY[y]}"' for y in raw["labels"][:6]]
    scores = prompt_scores(latents[:6], words_only, classifier)
    assert set(scores) == {"word_acc", "word_count"}
    mixed = [words_only[0], 'a high voice saying "cat"', "hum something"]
    assert set(prompt_scores(latents[:3], mixed, classifier)) == {
        "word_acc", "word_count", "pitch_acc", "pitch_count"}
    assert prompt_scores(latents[:3], mixed, classifier)["word_count"] == 2
    with pytest.raises(ValueError, match="3 clips for 2 prompts"):
        prompt_scores(latents[:3], mixed[:2], classifier)
    with pytest.raises(ValueError, match=r"latents \[B, 128, 32\]"):
        classifier.judge(torch.zeros(2, 64, 32))


@needs_espeak
def test_pitch_and_speed_measures_separate_real_clips(classifier, cache):
    """The signal measures alone on real clips of a seed the evaluator never heard: the pitch
    discriminant puts high voices above zero and low ones below; the duration is longer slowly
    than fast for every word; and within one voice the pitch score rises with espeak's pitch
    (it hears F0, not only which voice speaks)."""
    latents, raw = real_latents(TINY, "all", 120, seed=5, cache_dir=cache)
    score = classifier.net.pitch_score(pitch_features(latents, TINY))
    high = torch.from_numpy(raw["pitch"]).bool()
    assert float(((score > 0) == high).float().mean()) > 0.97
    assert float(score[high].median()) > 1 > -1 > float(score[~high].median())
    seconds = voiced_seconds(latents, TINY)
    fast = torch.from_numpy(raw["speed"]).bool()
    labels = torch.from_numpy(raw["labels"])
    for k in range(len(VOCABULARY)):
        slow_k, fast_k = seconds[(labels == k) & ~fast], seconds[(labels == k) & fast]
        assert float(slow_k.min()) > float(fast_k.max()), VOCABULARY[k]
    assert 0.45 < float(seconds[~fast].median()) < 0.9 and 0.15 < float(
        seconds[fast].median()) < 0.4
    # F0, not only the voice: one voice at espeak's lowest and highest pitch (the same speed)
    from selfflow_audio.sources import espeak_binary, synthesise
    from selfflow_audio.words import Clip

    audio = AudioModality.Config(classes=0).build()
    src = SpokenWordsSource("all", count=1, samples=audio.clip_samples, cache_dir=cache)
    for voice in ("en-us", "en+f2"):
        clips = [Clip("seven", "low", "slow", voice, 160, p) for p in (5, 95)]
        for c in clips:
            synthesise(espeak_binary(), c.word, c.voice, c.espeak_speed, c.espeak_pitch,
                       src.path(c), 16000)
        from selfflow_audio.features import read_wav
        from selfflow_audio.sources import fit_clip

        waves = np.stack([fit_clip(read_wav(src.path(c))[0], audio.clip_samples, 16000)
                          for c in clips])
        lat = torch.from_numpy(audio.encode({"waves": waves, "labels": np.zeros(2)})["latents"])
        s = classifier.net.pitch_score(pitch_features(lat, TINY)).tolist()
        assert s[1] > s[0] + 1.0, (voice, s)
        if voice == "en+f2":  # a female voice at espeak's lowest pitch is heard as low
            assert s[0] < 0, s


def test_the_classifier_is_cached_with_its_hash(classifier, cache, monkeypatch):
    folder = cache / "word_classifier" / "v1" / TINY.key()
    record = json.loads((folder / "classifier.json").read_text())
    data = (folder / "classifier.pt").read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest() == classifier.info["sha256"]
    assert record["sha256"] == ev.weights_sha256(classifier.net)
    assert record["settings"] == TINY.settings() and record["settings"]["seed"] == 1
    assert record["clips"] == 480 and record["heldout_triples"] == [list(t) for t in
                                                                     triples("heldout")]
    # the pitch discriminant and the speed thresholds are in the hashed state
    assert {"pitch_weight", "speed_threshold"} <= set(classifier.net.state_dict())

    def no_training(*args, **kwargs):
        raise AssertionError("fitted again although the evaluator is cached")

    monkeypatch.setattr(ev, "train_classifier", no_training)
    again = load_classifier(TINY, cache_dir=cache)
    for a, b in zip(again.net.state_dict().values(), classifier.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ClassifierConfig(seed=2).key() != ClassifierConfig().key() != TINY.key()
    assert ClassifierConfig.for_audio(AudioModality.Config()) == ClassifierConfig()
    assert ClassifierConfig.for_audio(AudioModality.Config(n_mels=40)).key() != (
        ClassifierConfig().key())


def test_a_tampered_cache_is_refused(classifier, cache, tmp_path):
    folder = cache / "word_classifier" / "v1" / TINY.key()
    copy = tmp_path / "word_classifier" / "v1" / TINY.key()
    shutil.copytree(folder, copy)
    data = bytearray((copy / "classifier.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "classifier.pt").write_bytes(bytes(data))
    with pytest.raises(ClassifierCacheError, match="does not match its record") as info:
        load_classifier(TINY, cache_dir=tmp_path)
    assert isinstance(info.value, SelfFlowError) and str(copy) in str(info.value)


# ---- the adapter ------------------------------------------------------------------------------

def test_captions_option_of_the_adapter():
    plain = AudioModality.Config().build()
    assert set(plain.fields()) == {"latents", "labels"}  # captions = 0: today's layout
    assert plain.evaluation_prompts(4) == []
    captioned = AudioModality.Config(classes=0, captions=4).build()
    assert captioned.fields()["captions"].shape == (4,)
    assert captioned.fields()["captions"].dtype == "str"
    assert captioned.evaluation_prompts(3) == evaluation_prompts(3)
    raw = {"waves": np.zeros((2, 100), np.float32), "labels": np.zeros(2, np.int64)}
    with pytest.raises(ValueError, match="gave no captions"):
        captioned.encode(raw)
    out = captioned.encode({**raw, "captions": np.array([["a"] * 4, ["b"] * 4], dtype=object)})
    assert out["captions"].tolist() == [["a"] * 4, ["b"] * 4]
    with pytest.raises(ValueError, match="has no captions"):
        captioned.open_source("spoken_digits")
    with pytest.raises(ValueError, match="30 classes"):
        AudioModality.Config(classes=10).build().open_source("spoken_words")


@needs_espeak
def test_the_adapter_scores_real_clips_of_the_prompted_word(classifier, cache, monkeypatch):
    """``prompt_metrics`` through the adapter: the store's own clips of the held-out split,
    encoded by the adapter, against the evaluation prompts (the same triples in order)."""
    monkeypatch.setattr(ev, "classifier_for", lambda config: classifier)
    adapter = AudioModality.Config(classes=0, captions=2, count=30, cache_dir=str(cache)).build()
    src = adapter.open_source("spoken_words_heldout")
    raw = src.read(0, 30)
    assert raw["captions"].shape == (30, 2)
    latents = torch.from_numpy(adapter.encode(raw)["latents"])
    prompts = adapter.evaluation_prompts(30)
    right = adapter.prompt_metrics(latents, prompts)
    assert set(right) == {"word_acc", "pitch_acc", "speed_acc"}
    assert right["word_acc"] > 0.8 and right["pitch_acc"] > 0.9 and right["speed_acc"] > 0.85
    assert adapter.prompt_metrics(latents, prompts[7:] + prompts[:7])["word_acc"] < 0.15


# ---- presets ----------------------------------------------------------------------------------

def test_the_t2a_presets():
    from selfflow_audio.presets import T2A_PROMPTS, t2a_words, t2a_words_debug_tiny

    from selfflow_core import ByteTextEncoder, DualTimestep, LogitNormal, MMDiT

    paper = DualTimestep.Config(distribution=LogitNormal.Config(shift=1.0), mask_ratio=0.5)
    for preset in (t2a_words(), t2a_words_debug_tiny()):
        spec = preset.modalities["audio"]
        assert spec.source == "spoken_words" and spec.scheduler == paper
        assert spec.modality.classes == 0 and spec.modality.captions == 4
        assert isinstance(preset.backbone, MMDiT.Config)
        b = preset.backbone
        assert sum(b.axes_dim) == b.width // b.heads and len(b.axes_dim) == 1  # 1-D positions
        assert isinstance(preset.text_encoder, ByteTextEncoder.Config)
        assert preset.sampling.prompts == T2A_PROMPTS
    full = t2a_words()
    assert full.backbone.width > full.modalities["audio"].modality.build().token_dim
    # the longest caption fits the text encoder
    longest = max(len(caption(t, Prompt(w, "high", "fast")).encode())
                  for t in TEMPLATES for w in VOCABULARY)
    assert longest <= full.text_encoder.max_length
    parsed = [parse_prompt(p) for p in T2A_PROMPTS]
    assert all(p.word for p in parsed)
    held = set(triples("heldout"))
    assert sum(tuple(p) in held for p in parsed) == 3


def test_the_class_conditional_presets_are_unchanged():
    from selfflow_audio.presets import debug_tiny, default

    from selfflow_core import DiT

    for preset in (default(), debug_tiny()):
        spec = preset.modalities["audio"]
        assert spec.source == "spoken_digits" and spec.modality.captions == 0
        assert spec.modality.classes == 10 and preset.text_encoder is None
        assert isinstance(preset.backbone, DiT.Config) and preset.sampling.prompts == ()
        assert set(spec.modality.build().fields()) == {"latents", "labels"}
    assert default().modalities["audio"].modality == AudioModality.Config(classes=10,
                                                                          frames_per_token=2)


@needs_espeak
def test_the_t2a_words_tiny_preset_trains_and_samples_from_prompts(tmp_path, monkeypatch):
    from selfflow_audio.presets import T2A_PROMPTS, t2a_words_debug_tiny

    from selfflow_core import Components, Trainer

    monkeypatch.chdir(tmp_path)
    tiny = t2a_words_debug_tiny()
    trainer = Trainer(tiny, components=Components(), progress=False)
    summary = trainer.fit()
    assert summary["step"] == tiny.steps
    out = trainer.samples_dir() / "audio"
    listing = json.loads((out / "prompts.json").read_text())
    assert listing == {f"{i:03d}": T2A_PROMPTS[i] for i in range(4)}
    assert (out / "000-the-word-seven.wav").is_file()
    assert (out / "003-three-said-slowly-by-a-low-voice.wav").is_file()
    assert (out / "spectrograms.png").is_file()
