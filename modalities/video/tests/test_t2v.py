"""Text to video on moving digits: the captions, their parser, the fixed evaluator (a cached
digit classifier, centroid motion, class flips) and the ``t2v_digits`` presets."""

from __future__ import annotations

import hashlib
import json
import math

import attrs
import numpy as np
import pytest
import torch
from selfflow_video import MovingDigitsSource, VideoModality
from selfflow_video import evaluator as ev
from selfflow_video.captions import (
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    DIRECTION_NAMES,
    DIRECTIONS,
    LEAD_FRAMES,
    PHRASES,
    canonical_prompt,
    digit_part,
    direction_of,
    parse_prompt,
)
from selfflow_video.evaluator import (
    ClassifierCacheError,
    ClassifierConfig,
    centroids,
    class_flips,
    clip_scores,
    load_classifier,
    motion_directions,
    real_clips,
)

from selfflow_core import SelfFlowError
from selfflow_core.testing import ModalityContract

#: a classifier small enough for the tests (~15 s on one thread); the default is bigger
TINY = ClassifierConfig(steps=400, positions=4, width=12, lr=5e-3, eval_clips=200)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def classifier(cache):
    from selfflow_core.testing.fixtures import torch_threads

    with torch_threads(1):
        return load_classifier(TINY, cache_dir=cache, progress=False)


def compass(count: int = 160, **kw) -> MovingDigitsSource:
    kw = {"size": 16, "frames": 8, "digits": 1, "digit_size": 10, "motion": "compass",
          "captions": 4, **kw}
    return MovingDigitsSource(count=count, **kw)


def _signs(step, tol: float = 0.0) -> tuple[int, int]:
    return tuple(int(np.sign(s)) if abs(s) > tol else 0 for s in step)


def _said(caption: str) -> tuple[int, int]:
    """The direction a caption says, by its words alone (independent of the parser)."""
    words = caption.replace(",", " ").split()
    vertical = (-1 if {"up", "upward", "top"} & set(words) else 0) + (
        1 if {"down", "downward", "bottom"} & set(words) else 0)
    horizontal = (-1 if {"left", "leftward"} & set(words) else 0) + (
        1 if {"right", "rightward"} & set(words) else 0)
    return vertical, horizontal


# ---- captions ---------------------------------------------------------------------------------

def test_captions_name_the_digit_and_its_true_direction():
    """Every caption of a one-digit compass clip names the digit shown (the label, and the
    class of the sklearn image drawn) and the way the digit's pixels actually move over its
    first frames (no bounce before LEAD_FRAMES)."""
    from selfflow_video.sources import _digits

    _, targets, _ = _digits()
    src = compass(160)
    raw = src.read(0, 160)
    x = (raw["videos"][:, :, 0] + 1) / 2  # [B, T, H, W] in [0, 1]
    rows, cols = np.arange(16)[:, None], np.arange(16)[None, :]
    mass = x.sum((-2, -1))
    cy, cx = (x * rows).sum((-2, -1)) / mass, (x * cols).sum((-2, -1)) / mass
    seen = set()
    for i in range(160):
        m = src.motions(i)[0]
        assert m.digit == raw["labels"][i] == i % 10 == targets[m.image]
        moved = [(_signs((cy[i, t + 1] - cy[i, t], cx[i, t + 1] - cx[i, t]), tol=0.5))
                 for t in range(LEAD_FRAMES)]
        assert len(set(moved)) == 1, f"clip {i} turns within its first {LEAD_FRAMES} frames"
        assert moved[0] == DIRECTIONS[m.direction] == _signs((m.velocity[0], m.velocity[1]))
        for caption in raw["captions"][i]:
            assert parse_prompt(caption) == [(m.digit, m.direction)], caption
            assert _said(caption) == moved[0], caption
            words = caption.split()
            assert str(m.digit) in words or DIGIT_NAMES[m.digit] in words, caption
        seen.add((m.digit, m.direction))
    assert len(seen) == 80  # every (digit, direction) pair within 80 clips
    assert m.direction == DIRECTION_NAMES[(159 // 10) % 8]


def test_two_digit_captions_say_which_is_which():
    for motion in ("compass", "diagonal"):
        src = compass(60, digits=2, motion=motion, captions=3)
        raw = src.read(0, 60)
        for i in range(60):
            ms = src.motions(i)
            want = [(m.digit, m.direction) for m in ms]
            for m in ms:  # the direction is the initial velocity's
                assert DIRECTIONS[m.direction] == _signs(m.velocity)
                assert m.rows[0] == round(m.start[0]) and m.cols[0] == round(m.start[1])
            for caption in raw["captions"][i]:
                assert parse_prompt(caption) == want, caption
    # the legacy diagonal motion always heads diagonally
    assert {m.direction for i in range(60) for m in src.motions(i)} <= {
        "up and right", "up and left", "down and left", "down and right"}
    assert parse_prompt("a 3 moving down and a 5 moving right") == [(3, "down"), (5, "right")]


def test_captions_are_deterministic_and_varied():
    src = compass(40)
    raw = src.read(0, 40)
    assert raw["captions"].shape == (40, 4) and raw["captions"].dtype == object
    np.testing.assert_array_equal(src.read(13, 17)["captions"], raw["captions"][13:17])
    assert src.clip_captions(5) == raw["captions"][5].tolist()
    for row in raw["captions"]:
        assert len(set(row)) == 4  # distinct templates per clip
    verbs = ("moving", "bouncing", "drifting", "sliding", "heading", "that moves")
    used = {v for row in raw["captions"] for c in row for v in verbs if v in c}
    assert len(used) == len(DIGIT_TEMPLATES) == len(verbs)
    other = compass(40, seed=1).read(0, 40)["captions"]
    assert other.tolist() != raw["captions"].tolist()
    text = " ".join(c for row in raw["captions"] for c in row)
    assert "a 8" not in text and "a eight" not in text
    assert "an 8" in text and "an eight" in text and "a one" in text
    # captions do not change the clips
    np.testing.assert_array_equal(compass(40, captions=0).read(0, 40)["videos"], raw["videos"])


def test_the_parser_reads_every_template():
    for d in range(10):
        for name in DIRECTIONS:
            for t in range(len(DIGIT_TEMPLATES)):
                for p in range(len(PHRASES[name])):
                    assert parse_prompt(digit_part(d, name, t, p)) == [(d, name)]
    assert parse_prompt("an eight moving toward the top left") == [(8, "up and left")]
    assert parse_prompt("the digit 7 bouncing up and right") == [(7, "up and right")]
    assert parse_prompt("seven") == [(7, None)]
    assert parse_prompt("a 4 moving up and down") == [(4, None)]  # contradictory
    assert parse_prompt("") == [] and parse_prompt("a cat") == []
    assert canonical_prompt(3, "left") == "a 3 moving left"
    assert direction_of((0, 2)) == "right" and direction_of((-1, -1)) == "up and left"
    assert direction_of((1.9, 1.0)) == "down and right" and direction_of((0, 0)) is None


def test_legacy_clips_are_unchanged():
    """``motion = "diagonal"`` and no captions: byte for byte the clips of the original source
    (the default video preset's data)."""
    raw = MovingDigitsSource(count=20).read(0, 20)
    assert set(raw) == {"videos", "labels"}
    digest = hashlib.sha256(np.ascontiguousarray(raw["videos"]).tobytes()).hexdigest()
    assert digest == "4cb3817c22e6647fd3d8d65abe05d58344b177dcd61c30f76bf6dc2b7f6de199"
    adapter = VideoModality.Config().build()
    assert set(adapter.fields()) == {"latents", "labels"}
    assert set(adapter.encode(adapter.open_source("moving_digits").read(0, 2))) == {
        "latents", "labels"}


# ---- the adapter with captions ----------------------------------------------------------------

class TestVideoCaptionsContract(ModalityContract):
    config = VideoModality.Config(classes=0, captions=3, motion="compass", digits=1,
                                  digit_size=10)


class TestVideoImageAndPromptContract(ModalityContract):
    """Image + prompt -> video: captions beside a conditioning first frame."""

    config = VideoModality.Config(classes=0, captions=2, motion="compass", digits=1,
                                  digit_size=10, condition_first_frame=True, temporal_patch=1)


def test_adapter_fields_and_errors():
    m = VideoModality.Config(classes=0, captions=3, motion="compass").build()
    assert m.fields()["captions"].shape == (3,) and m.fields()["captions"].dtype == "str"
    out = m.encode(m.open_source("moving_digits").read(0, 4))
    assert out["captions"].shape == (4, 3)
    with pytest.raises(ValueError, match="gave no captions"):
        m.encode({"videos": out["latents"], "labels": out["labels"]})
    with pytest.raises(ValueError, match="'cartpole' has no captions"):
        VideoModality.Config(classes=2, captions=1).build().open_source("cartpole")
    with pytest.raises(ValueError, match="motion"):
        VideoModality.Config(motion="spiral")


# ---- the evaluator: measures without a model --------------------------------------------------

def test_centroid_motion_by_hand():
    clip = -torch.ones(3, 6, 1, 16, 16)
    for t in range(6):
        clip[0, t, 0, 2 + t:5 + t, 10 - t:13 - t] = 1.0  # a 3x3 square: down and left
        clip[1, t, 0, 6:9, 2 + 2 * t:5 + 2 * t] = 1.0  # right, 2 px per frame
        clip[2, t, 0, 6:9, 6:9] = 1.0  # still
    c = centroids(clip)
    torch.testing.assert_close(c[0, :, 0], torch.arange(6.0) + 3)
    torch.testing.assert_close(c[0, :, 1], 11 - torch.arange(6.0))
    assert motion_directions(clip) == ["down and left", "right", None]
    assert motion_directions(-torch.ones(1, 4, 1, 16, 16)) == [None]  # no ink
    assert math.isclose(class_flips([[1, 1, 2, 2], [3, 3, 3, 3]]), 1 / 6)
    assert class_flips([[4, 5, 4, 5]]) == 1.0


# ---- the evaluator: the classifier ------------------------------------------------------------

def test_evaluator_scores_real_clips_high_and_mismatched_prompts_low(classifier):
    """Real clips of another seed than the ceiling's, against their own captions (every
    template): near perfect; against the captions of other clips (another digit and another
    direction): near zero."""
    videos, prompts = real_clips(160, 16, 10, seed=3)
    right = clip_scores(videos, prompts, classifier)
    assert right["digit_acc"] > 0.97 and right["direction_acc"] > 0.98, right
    assert right["class_flips"] < 0.02, right
    wrong = clip_scores(videos, prompts[11:] + prompts[:11], classifier)
    assert wrong["digit_acc"] < 0.1 and wrong["direction_acc"] < 0.15, wrong
    # only the digit wrong / only the direction wrong
    digit_only = [canonical_prompt((d + 1) % 10, n) for d, n in ev.prompt_targets(prompts)]
    s = clip_scores(videos, digit_only, classifier)
    assert s["digit_acc"] < 0.1 and s["direction_acc"] > 0.98, s
    turned = [canonical_prompt(d, DIRECTION_NAMES[(DIRECTION_NAMES.index(n) + 4) % 8])
              for d, n in ev.prompt_targets(prompts)]
    s = clip_scores(videos, turned, classifier)
    assert s["digit_acc"] > 0.97 and s["direction_acc"] < 0.05, s
    recorded = classifier.info["ceiling"]
    assert recorded["real"]["digit_acc"] > 0.97 and recorded["real"]["direction_acc"] == 1.0
    assert recorded["mismatched"]["digit_acc"] < 0.1


def test_class_flips_are_zero_on_real_clips_and_high_when_frames_are_shuffled(classifier):
    videos, prompts = real_clips(120, 16, 10, seed=4)
    real = clip_scores(videos, prompts, classifier)
    assert real["class_flips"] <= 0.01, real
    g = np.random.default_rng(0)
    b, t = videos.shape[:2]
    shuffled = videos[g.integers(0, b, size=(b, t)), np.arange(t)[None, :]]
    s = clip_scores(shuffled, prompts, classifier)
    assert s["class_flips"] > 0.7 and s["digit_acc"] < 0.3, s
    # every frame from one clip, in a shuffled order: the same digit, no flips
    same = videos[:, g.permutation(t)]
    assert clip_scores(same, prompts, classifier)["class_flips"] <= 0.01
    assert classifier.info["ceiling"]["shuffled"]["class_flips"] > 0.7


def test_prompts_the_evaluator_cannot_read_are_left_out(classifier):
    videos, prompts = real_clips(20, 16, 10)
    two = ["a 3 moving down and a 5 moving right"] * 20
    assert all(math.isnan(v) for v in clip_scores(videos, two, classifier).values())
    mixed = clip_scores(videos, prompts[:10] + two[10:], classifier)
    assert mixed == clip_scores(videos[:10], prompts[:10], classifier)
    undirected = clip_scores(videos, [str(d) for d, _ in ev.prompt_targets(prompts)], classifier)
    assert undirected["digit_acc"] > 0.9 and math.isnan(undirected["direction_acc"])
    with pytest.raises(ValueError, match="19 prompts for 20 clips"):
        clip_scores(videos, prompts[:19], classifier)
    with pytest.raises(ValueError, match="reads 16x16 frames"):
        classifier.classify(np.zeros((1, 2, 1, 8, 8), np.float32))


def test_classifier_is_cached_with_its_hash(classifier, cache, monkeypatch, tmp_path):
    import shutil

    folder = cache / "video_digit_classifier" / "v1" / TINY.key()
    record = json.loads((folder / "classifier.json").read_text())
    assert record["sha256"] == hashlib.sha256((folder / "classifier.pt").read_bytes()).hexdigest()
    assert record["sha256"] == classifier.info["sha256"] == ev.weights_sha256(classifier.net)
    assert record["settings"] == TINY.settings() and record["train_acc"] > 0.97

    def no_training(config):
        raise AssertionError("trained again although the classifier is cached")

    monkeypatch.setattr(ev, "train_classifier", no_training)
    again = load_classifier(TINY, cache_dir=cache)
    for a, b in zip(again.net.state_dict().values(), classifier.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ClassifierConfig(seed=2).key() != ClassifierConfig().key() != TINY.key()
    assert ClassifierConfig(digit_size=8).key() != ClassifierConfig().key()
    # a tampered copy is refused
    copy = tmp_path / "video_digit_classifier" / "v1" / TINY.key()
    shutil.copytree(folder, copy)
    data = bytearray((copy / "classifier.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "classifier.pt").write_bytes(bytes(data))
    with pytest.raises(ClassifierCacheError, match="does not match its record") as info:
        load_classifier(TINY, cache_dir=tmp_path)
    assert isinstance(info.value, SelfFlowError) and str(copy) in str(info.value)


def test_the_adapter_scores_clips_of_its_evaluation_prompts(classifier, monkeypatch):
    """``evaluation_prompts(80)``: every (digit, direction) pair once, in the order of the
    compass source's clips, so real clips 0..79 are exactly what the prompts ask for."""
    monkeypatch.setattr(ev, "default_classifier", lambda size, digit_size: classifier)
    m = VideoModality.Config(classes=0, captions=2, motion="compass", digits=1,
                             digit_size=10).build()
    prompts = m.evaluation_prompts(80)
    assert len({tuple(parse_prompt(p)) for p in prompts}) == 80
    raw = m.open_source("moving_digits").read(0, 80)
    latents = torch.from_numpy(m.encode(raw)["latents"])
    right = m.prompt_metrics(latents, prompts)
    assert set(right) == {"digit_acc", "direction_acc", "class_flips"}
    assert right["digit_acc"] > 0.97 and right["direction_acc"] == 1.0, right
    wrong = m.prompt_metrics(latents, prompts[11:] + prompts[:11])
    assert wrong["digit_acc"] < 0.1 and wrong["direction_acc"] < 0.15, wrong
    assert VideoModality.Config().build().evaluation_prompts(4) == []
    assert VideoModality.Config(captions=2, digits=2).build().evaluation_prompts(4) == []


# ---- presets ----------------------------------------------------------------------------------

def test_the_t2v_digits_preset(tmp_path, monkeypatch, classifier):
    from selfflow_video.presets import T2V_PROMPTS, t2v_digits, t2v_digits_debug_tiny

    from selfflow_core import ByteTextEncoder, Components, JsonlTracker, MMDiT, Trainer

    full = t2v_digits()
    spec = full.modalities["video"]
    video = spec.modality
    assert isinstance(full.backbone, MMDiT.Config) and isinstance(full.text_encoder,
                                                                  ByteTextEncoder.Config)
    assert video.classes == 0 and video.captions == 4 and video.motion == "compass"
    assert spec.scheduler == video.default_scheduler()  # the paper's video settings
    b = full.backbone
    assert len(b.axes_dim) == 3 and sum(b.axes_dim) == b.width // b.heads
    assert all(a % 2 == 0 for a in b.axes_dim)
    longest = max(len(digit_part(d, n, t, p).encode()) for d in range(10) for n in DIRECTIONS
                  for t in range(len(DIGIT_TEMPLATES)) for p in range(len(PHRASES[n])))
    assert longest <= full.text_encoder.max_length
    assert full.sampling.prompts == T2V_PROMPTS and full.sampling.evaluate
    assert {parse_prompt(p)[0][1] for p in T2V_PROMPTS} == set(DIRECTIONS)  # each direction

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "default_classifier", lambda size, digit_size: classifier)
    tiny = t2v_digits_debug_tiny()
    assert tiny.sampling.prompts == T2V_PROMPTS and isinstance(tiny.backbone, MMDiT.Config)
    tiny = attrs.evolve(tiny, tracker=JsonlTracker.Config(),
                        sampling=attrs.evolve(tiny.sampling, evaluate=True))
    trainer = Trainer(tiny, components=Components(), progress=False)
    trainer.fit()
    out = trainer.samples_dir() / "video"
    listing = json.loads((out / "prompts.json").read_text())
    assert listing["000"] == T2V_PROMPTS[0] and len(listing) == tiny.sampling.count
    assert (out / "samples.gif").is_file() and (out / "samples_frames.png").is_file()
    assert (out / "000-a-3-moving-to-the-left.gif").is_file()
    from PIL import Image

    with Image.open(out / "samples_frames.png") as strip:  # a prompt band above each clip row
        assert strip.size[1] > tiny.sampling.count * 48
    logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").open()]
    scores = [r for r in logged if "eval/video/digit_acc" in r]
    assert scores and {"eval/video/direction_acc", "eval/video/class_flips"} <= set(scores[-1])


def test_class_conditional_video_presets_are_unchanged():
    from selfflow_video.presets import debug_tiny, default

    from selfflow_core import DiT

    for preset in (default(), debug_tiny()):
        video = preset.modalities["video"].modality
        assert video.captions == 0 and video.motion == "diagonal" and video.classes == 10
        assert preset.text_encoder is None and isinstance(preset.backbone, DiT.Config)
        assert preset.sampling.prompts == ()
    assert default().modalities["video"].modality == VideoModality.Config(
        size=16, frames=8, patch=4, temporal_patch=2, classes=10, count=2048, digits=1,
        digit_size=10)
    assert default().backbone == DiT.Config(depth=4, width=96, heads=4)
    assert default().steps == 1000
