"""Text to audio-video on moving spoken digits: the pair captions and their parser, the onset
measure, the fixed evaluator (hand-made right and wrong pairs) and the ``t2av_digits``
presets."""

from __future__ import annotations

import json
import math
import shutil

import attrs
import numpy as np
import pytest
import torch
from selfflow_audio import AudioModality
from selfflow_audio import evaluator as audio_ev
from selfflow_audio.evaluator import ClassifierConfig as WordConfig
from selfflow_audio_video import AudioVideoModality
from selfflow_audio_video.captions import (
    SPOKEN_TEMPLATES,
    Target,
    evaluation_prompts,
    pair_captions,
    parse_prompt,
    spoken_part,
)
from selfflow_audio_video.evaluator import Evaluator, ceiling, evaluator_for, onsets, real_pairs
from selfflow_video import MovingDigitsSource, VideoModality
from selfflow_video import evaluator as video_ev
from selfflow_video.captions import (
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    DIRECTION_NAMES,
    DIRECTIONS,
    PHRASES,
    canonical_prompt,
    digit_part,
)
from selfflow_video.evaluator import ClassifierConfig as DigitConfig

from selfflow_core.testing import ModalityContract
from selfflow_core.testing.fixtures import torch_threads

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; scripts/setup.sh does it)")
TWO_VOICES = AudioModality.Config(voices=("en-us", "en+f2"), speeds=(175,), pitches=(50,))
#: classifiers small enough for the tests (~45 s together on one thread, espeak-ng included)
TINY_DIGITS = DigitConfig(steps=400, positions=4, width=12, lr=5e-3, eval_clips=200)
TINY_WORDS = WordConfig(clips_per_triple=2, steps=300, width=24, eval_clips=30)


def t2av(frames: int = 8, **kw) -> AudioVideoModality:
    """The ``t2av_digits`` modality at a test size (seed 3: other pairs than the ceiling's)."""
    kw = {"classes": 0, "count": 160, "digits": 1, "digit_size": 10, "captions": 2, "seed": 3,
          "audio": TWO_VOICES, **kw}
    return AudioVideoModality.Config(video=VideoModality.Config(
        frames=frames, patch=8, temporal_patch=1, motion="compass"), **kw).build()


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, selfflow_cache) -> Evaluator:
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    cache = tmp_path_factory.mktemp("classifiers")
    with torch_threads(1):
        return Evaluator(video_ev.load_classifier(TINY_DIGITS, cache, progress=False),
                         audio_ev.load_classifier(TINY_WORDS, cache, progress=False), 1.0)


@pytest.fixture
def tiny_classifiers(evaluator, monkeypatch):
    """The default evaluator of any adapter is the tiny one."""
    monkeypatch.setattr(video_ev, "default_classifier", lambda size, digit_size: evaluator.digits)
    monkeypatch.setattr(audio_ev, "classifier_for", lambda config: evaluator.words)


@pytest.fixture(scope="module")
def pairs(selfflow_cache):
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    return real_pairs(t2av(), 0, 160)


# ---- captions ---------------------------------------------------------------------------------

def test_parse_prompt_by_hand():
    assert parse_prompt("a 4 bouncing to the left, and its name spoken") == (4, "left", "four")
    assert parse_prompt('a 4 moving left while a voice says "Seven"') == (4, "left", "seven")
    assert parse_prompt("the number eight sliding toward the top right") == (
        8, "up and right", "eight")
    assert parse_prompt("seven") == Target(7, None, "seven")
    assert parse_prompt("a 3 moving down and a 5 moving right") is None
    assert parse_prompt('the word "cat"') is None and parse_prompt("") is None


def test_every_template_parses_back():
    """Any video template, phrasing and spoken template: the digit, its direction and its name
    (the spoken parts never read as a digit or a direction)."""
    for d in range(10):
        for name in DIRECTIONS:
            for t in range(len(DIGIT_TEMPLATES)):
                for p in range(len(PHRASES[name])):
                    for s in range(len(SPOKEN_TEMPLATES)):
                        prompt = digit_part(d, name, t, p) + spoken_part(d, s)
                        assert parse_prompt(prompt) == (d, name, DIGIT_NAMES[d]), prompt


def test_pair_captions_are_deterministic_and_varied():
    video = ["a 4 moving left", "the digit 4 bouncing to the left", "digit 4 heading left"]
    caps = pair_captions(video, 4, seed=0, index=7)
    assert caps == pair_captions(video, 4, seed=0, index=7) != pair_captions(video, 4, 0, 8)
    assert [c[:len(v)] for c, v in zip(caps, video)] == video
    assert len({c[len(v):] for c, v in zip(caps, video)}) == 3  # distinct spoken parts
    assert len(pair_captions(video * 3, 4, 0, 7)) == 9  # more captions than spoken templates


def test_evaluation_prompts_hold_every_pair_in_the_source_order():
    prompts = evaluation_prompts(160)
    assert prompts[0] == "a 0 moving right, and its name spoken"
    targets = [parse_prompt(p) for p in prompts]
    assert len(set(targets[:80])) == 80 and targets[80:] == targets[:80]
    assert [t.direction for t in targets[:20:10]] == list(DIRECTION_NAMES[:2])
    assert t2av().evaluation_prompts(3) == prompts[:3]
    assert t2av(captions=0).evaluation_prompts(3) == []
    assert t2av(digits=2).evaluation_prompts(3) == []


@needs_espeak
def test_the_source_captions_name_the_digit_its_direction_and_its_name():
    m = t2av(count=40)
    assert m.fields()["captions"].shape == (2,) and m.fields()["captions"].dtype == "str"
    src = m.open_source("moving_spoken_digits")
    raw = src.read(0, 40)
    assert raw["captions"].shape == (40, 2) and "2 captions each" in src.description
    for i in range(40):
        motion = src.video.motions(i)[0]
        for caption in raw["captions"][i]:
            assert parse_prompt(caption) == (i % 10, motion.direction, DIGIT_NAMES[i % 10])
    np.testing.assert_array_equal(src.read(13, 17)["captions"], raw["captions"][13:17])
    # the clips are the compass source's, and captions change no clip and no wave
    compass = MovingDigitsSource(count=40, digits=1, digit_size=10, seed=3, motion="compass")
    np.testing.assert_array_equal(raw["videos"], compass.read(0, 40)["videos"])
    plain = t2av(count=40, captions=0).open_source("moving_spoken_digits").read(0, 40)
    assert "captions" not in plain
    np.testing.assert_array_equal(plain["waves"], raw["waves"])
    assert m.encode(raw)["captions"].tolist() == raw["captions"].tolist()
    with pytest.raises(ValueError, match="gave no captions"):
        m.encode(plain)
    with pytest.raises(ValueError, match="only 'moving_spoken_digits' has captions"):
        m.open_source("moving_tones")


@needs_espeak
class TestCaptionedPairsContract(ModalityContract):
    config = attrs.evolve(t2av().config, count=20)

    def test_detokenize_inverts_tokenize(self, adapter, fields, batch):
        video, audio = adapter.split(adapter.detokenize(batch.tokens))
        assert torch.equal(video, fields["video"]) and torch.equal(audio, fields["audio"])


# ---- the onset measure ------------------------------------------------------------------------

def test_onset_by_hand():
    """Log-mel latents at the encoder's floor but for a burst from frame 40 and a ramp before
    it: frame 38 is 30 dB under the burst (out), frame 39 10 dB under (in): the onset is frame
    39, 39 x 128 / 16000 = 0.312 s. A clip only 10 dB above the floor, or at it, is silent."""
    c = WordConfig()
    floor = math.log(c.log_eps)  # log mel power of silence, per band
    loud = floor + 40 * math.log(10) / 10  # 40 dB above it
    x = torch.full((3, 128, 32), floor)
    x[0, 38], x[0, 39], x[0, 40:60] = loud - 3 * math.log(10), loud - math.log(10), loud
    x[1, 70:90] = floor + math.log(10)  # +10 dB: under SILENCE_DB
    got = onsets((x - c.shift) / c.scale, c)
    assert got[0].item() == pytest.approx(0.312)
    assert math.isnan(got[1]) and math.isnan(got[2])


# ---- the evaluator ----------------------------------------------------------------------------

def test_real_pairs_score_high(evaluator, pairs):
    videos, audio, prompts = pairs
    s = evaluator.scores(videos, audio, prompts)
    assert s["word_acc"] > 0.95 and s["av_agreement"] > 0.95, s
    assert s["digit_acc"] > 0.95 and s["direction_acc"] > 0.95, s
    assert s["onset_in_clip"] == 1.0 and 0.0 < s["onset_s"] < 0.1, s


def test_wrong_pairs_score_low(evaluator, pairs):
    videos, audio, prompts = pairs
    # video of one digit, audio of another (the next pair's: always another digit)
    swapped = evaluator.scores(videos, audio.roll(1, 0), prompts)
    assert swapped["av_agreement"] < 0.05 and swapped["word_acc"] < 0.05, swapped
    assert swapped["digit_acc"] > 0.95 and swapped["onset_in_clip"] == 1.0, swapped
    # ... against prompts quoting the word that is heard: the prompt is followed, the pair is not
    heard = [canonical_prompt(t.digit, t.direction) + f', with "{DIGIT_NAMES[(i - 1) % 10]}" '
             'spoken' for i, t in enumerate(map(parse_prompt, prompts))]
    quoted = evaluator.scores(videos, audio.roll(1, 0), heard)
    assert quoted["word_acc"] > 0.95 and quoted["av_agreement"] < 0.05, quoted
    # a real pair against another pair's prompt: in sync with itself, not with the prompt
    other = evaluator.scores(videos, audio, prompts[1:] + prompts[:1])
    assert other["av_agreement"] > 0.95 and other["word_acc"] < 0.05, other
    assert other["digit_acc"] < 0.05, other
    # silent audio: no word, no onset
    c = evaluator.words.config
    silent = torch.full_like(audio, (math.log(c.log_eps) - c.shift) / c.scale)
    s = evaluator.scores(videos, silent, prompts)
    assert (s["word_acc"], s["av_agreement"], s["onset_in_clip"]) == (0.0, 0.0, 0.0), s
    assert math.isnan(s["onset_s"]) and s["digit_acc"] > 0.95
    # prompts it cannot read are left out
    assert all(math.isnan(v) for v in evaluator.scores(videos[:2], audio[:2],
                                                       ["a cat", "1 and 2"]).values())
    with pytest.raises(ValueError, match="3 prompts"):
        evaluator.scores(videos[:2], audio[:2], prompts[:3])


def test_audio_that_starts_after_the_clip(evaluator, tiny_classifiers):
    """A 4-frame clip lasts 0.5 s: the real word delayed by 0.2 s still starts within it, by
    0.6 s it starts after it."""
    m = t2av(frames=4, count=20)
    ev = evaluator_for(m)
    assert ev.clip_seconds == 0.5 and ev.digits is evaluator.digits
    videos, audio, prompts = real_pairs(m, 0, 20)
    c = ev.words.config
    floor = (math.log(c.log_eps) - c.shift) / c.scale

    def delayed(frames: int) -> torch.Tensor:
        out = torch.full_like(audio, floor)
        out[:, frames:] = audio[:, :audio.shape[1] - frames]
        return out

    early, late = ev.scores(videos, delayed(25), prompts), ev.scores(videos, delayed(75), prompts)
    assert early["onset_in_clip"] == 1.0 and late["onset_in_clip"] == 0.0, (early, late)
    real = ev.scores(videos, audio, prompts)
    assert early["onset_s"] - real["onset_s"] == pytest.approx(25 * 0.008)


def test_the_adapter_scores_packed_pairs(tiny_classifiers, pairs):
    m = t2av()
    videos, audio, _ = pairs
    prompts = m.evaluation_prompts(160)
    tokens = m.pack(videos, audio).tokens
    right = m.prompt_metrics(tokens, prompts)
    assert set(right) == {"digit_acc", "direction_acc", "class_flips", "word_acc",
                          "av_agreement", "onset_in_clip", "onset_s"}
    assert right["av_agreement"] > 0.95 and right["word_acc"] > 0.95, right
    wrong = m.prompt_metrics(m.pack(videos, audio.roll(3, 0)).tokens, prompts)
    assert wrong["av_agreement"] < 0.05 and wrong["digit_acc"] > 0.95, wrong


def test_the_ceiling(evaluator):
    got = ceiling(t2av(count=40), evaluator, 40)
    assert got["real"]["av_agreement"] > 0.95 and got["real"]["onset_in_clip"] == 1.0
    assert got["swapped_audio"]["av_agreement"] < 0.05
    assert got["silent"]["onset_in_clip"] == 0.0 and got["silent"]["word_acc"] == 0.0


# ---- presets ----------------------------------------------------------------------------------

def test_the_t2av_presets():
    from selfflow_audio_video.presets import T2AV_PROMPTS, t2av_digits, t2av_digits_debug_tiny

    from selfflow_core import ByteTextEncoder, MMDiT

    for preset in (t2av_digits(), t2av_digits_debug_tiny()):
        spec = preset.modalities["audio_video"]
        m = spec.modality
        assert spec.source == "moving_spoken_digits" and m.captions == 4 and m.classes == 0
        assert m.video.motion == "compass" and not m.video.condition_first_frame
        assert m.digits == 1 and m.video.frames == 8
        assert spec.scheduler == m.default_scheduler()  # each kind its modality's paper schedule
        assert isinstance(preset.backbone, MMDiT.Config)
        b = preset.backbone
        assert len(b.axes_dim) == 3 and sum(b.axes_dim) == b.width // b.heads
        assert isinstance(preset.text_encoder, ByteTextEncoder.Config)
        assert preset.sampling.prompts == T2AV_PROMPTS
    full = t2av_digits()
    assert full.sampling.evaluate and not t2av_digits_debug_tiny().sampling.evaluate
    assert full.backbone.width > max(full.modalities["audio_video"].modality.build().token_dims)
    longest = max(len((digit_part(d, n, t, p) + spoken_part(d, s)).encode())
                  for d in range(10) for n in DIRECTIONS for t in range(len(DIGIT_TEMPLATES))
                  for p in range(len(PHRASES[n])) for s in range(len(SPOKEN_TEMPLATES)))
    assert longest <= full.text_encoder.max_length
    targets = [parse_prompt(p) for p in T2AV_PROMPTS]
    assert {t.direction for t in targets} == set(DIRECTIONS)
    assert len({t.digit for t in targets}) == 8
    assert all(t.word == DIGIT_NAMES[t.digit] for t in targets)


@needs_espeak
def test_the_tiny_preset_trains_samples_and_evaluates(tmp_path, monkeypatch, tiny_classifiers):
    from selfflow_audio_video.presets import T2AV_PROMPTS, t2av_digits_debug_tiny

    from selfflow_core import Components, JsonlTracker, Trainer
    from selfflow_core.eval.evaluate import evaluate_run

    monkeypatch.chdir(tmp_path)
    tiny = t2av_digits_debug_tiny()
    tiny = attrs.evolve(tiny, tracker=JsonlTracker.Config(),
                        sampling=attrs.evolve(tiny.sampling, evaluate=True))
    trainer = Trainer(tiny, components=Components(), progress=False)
    assert trainer.fit()["step"] == tiny.steps
    out = trainer.samples_dir() / "audio_video"
    listing = json.loads((out / "prompts.json").read_text())
    assert listing == {f"{i:03d}": p for i, p in enumerate(T2AV_PROMPTS)}
    for ext in ("gif", "wav"):
        assert (out / f"000-a-4-bouncing-to-the-left-and-its-name-spoken.{ext}").is_file()
        assert len(list(out.glob(f"0*.{ext}"))) == len(T2AV_PROMPTS)
    assert {"samples.gif", "samples_frames.png", "spectrograms.png"} <= {
        p.name for p in out.iterdir()}
    logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").open()]
    scores = [r for r in logged if "eval/audio_video/av_agreement" in r]
    assert scores and {"eval/audio_video/word_acc", "eval/audio_video/onset_in_clip",
                       "eval/audio_video/digit_acc"} <= set(scores[-1])
    # `selfflow evaluate RUN`
    got = evaluate_run(trainer.run_dir, Components(), count=10, out_dir=tmp_path / "eval")
    scored = got["modalities"]["audio_video"]
    assert scored["prompts"] == 10 and 0.0 <= scored["av_agreement"] <= 1.0
    assert (tmp_path / "eval" / "audio_video" / "009-a-9-moving-right-and-its-name-spoken.wav"
            ).is_file()
