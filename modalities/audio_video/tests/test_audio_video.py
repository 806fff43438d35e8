"""Tests of the selfflow-audio-video plugin: the core's contract kit (its round-trip check adapted
to a sample of two generated fields) plus joint-sequence checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from selfflow_audio import AudioModality, read_wav
from selfflow_audio_video import AudioVideoModality, PairSource
from selfflow_audio_video.presets import default
from selfflow_video import VideoModality

from selfflow_core import Components
from selfflow_core.builtin.dit import DiT
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.objective import ObjectiveConfig, SelfFlowObjective
from selfflow_core.sampling import sample
from selfflow_core.teachers import EMATeacher
from selfflow_core.testing import ModalityContract, ModalityPluginContract, randomize_parameters
from selfflow_core.timesteps import DualTimestep, PerKindTimestep, Uniform

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; scripts/setup.sh does it)")
TINY_AUDIO = AudioModality.Config(voices=("en-us",), speeds=(175,), pitches=(50,))


class _JointContract(ModalityContract):
    def test_detokenize_inverts_tokenize(self, adapter, fields, batch):
        """Both generated fields come back exactly: ``split(detokenize(tokens))``."""
        packed = adapter.detokenize(batch.tokens)
        assert isinstance(packed, torch.Tensor)
        video, audio = adapter.split(packed)
        assert torch.equal(video, fields["video"]) and torch.equal(audio, fields["audio"])


@needs_espeak
class TestSpokenPairsContract(_JointContract):
    config = AudioVideoModality.Config(audio=TINY_AUDIO, count=20)


class TestTonePairsConditionedContract(_JointContract):
    config = AudioVideoModality.Config(
        video=VideoModality.Config(size=8, frames=4, temporal_patch=1, patch=4,
                                   condition_first_frame=True),
        audio=AudioModality.Config(n_mels=16, frames=32, frames_per_token=8), classes=0,
        count=20, digit_size=6)
    source = "moving_tones"


@pytest.fixture(scope="module")
def adapter() -> AudioVideoModality:
    return AudioVideoModality.Config(classes=10, count=20).build()


@pytest.fixture(scope="module")
def tone_fields(adapter) -> dict[str, torch.Tensor]:
    out = adapter.encode(adapter.open_source("moving_tones").read(0, 4))
    return {k: torch.from_numpy(v) for k, v in out.items()}


# ---- config and registration ------------------------------------------------------------------

class TestAudioVideoPlugin(ModalityPluginContract):
    """The kit's plugin checks (entry point, round trips, valid presets, debug_tiny lowers the
    loss), with 4-frame audio tokens: two token widths in one sequence, padded and masked per
    channel; and what the run builds and writes."""

    modality, distribution = "audio_video", "selfflow-audio-video"
    config_class = AudioVideoModality.Config
    presets = ("audio_video",)
    train_skip = None if HAS_ESPEAK else "espeak-ng is not installed"

    @classmethod
    def debug_tiny_config(cls, components, root):
        config = super().debug_tiny_config(components, root)
        spec = config.modalities["audio_video"]
        modality = attrs.evolve(spec.modality,
                                audio=attrs.evolve(spec.modality.audio, frames_per_token=4))
        return attrs.evolve(config,
                            modalities={"audio_video": attrs.evolve(spec, modality=modality)})

    def test_debug_tiny_has_a_projection_per_part(self, debug_tiny_run):
        trainer = debug_tiny_run.trainer
        # one input/output projection per part: video tubes 1x8x8 (64), audio 4 frames x 32 mels
        assert trainer.backbone.token_dims == trainer.modalities[0].adapter.token_dims == (64, 128)
        assert trainer.modalities[0].adapter.token_dim == 128

    def test_debug_tiny_writes_samples(self, debug_tiny_run):
        step = debug_tiny_run.config.steps
        samples = debug_tiny_run.run_dir / "samples" / f"step-{step:08d}" / "audio_video"
        assert len(list(samples.glob("*.gif"))) == 4 and len(list(samples.glob("*.wav"))) == 4


def test_default_preset_settings():
    spec = default().modalities["audio_video"]
    assert spec.modality.video.condition_first_frame
    # each kind its own modality's schedule (App. B/C, F); a spec naming none gets it too
    assert spec.scheduler == spec.modality.default_scheduler() == PerKindTimestep.Config(
        kinds=(VideoModality.Config().default_scheduler(),
               AudioModality.Config().default_scheduler()))
    video, audio = spec.scheduler.kinds
    assert (video.mask_ratio, audio.mask_ratio) == (0.1, 0.5)
    assert (video.distribution.shift, audio.distribution.shift) == (2.95, 1.0)
    assert (video.condition_noise, audio.condition_noise) == (0.2, 0.0)
    assert attrs.evolve(spec, scheduler=None).scheduler == spec.scheduler
    # both token widths fit the backbone (a wider token leaves a noise floor in the samples)
    assert default().backbone.width > max(spec.modality.build().token_dims)


def test_the_docs_per_kind_toml_is_the_default_schedule():
    """docs/concepts.md's TOML for a per-kind schedule structures to audio_video's default."""
    import re
    import tomllib

    from selfflow_core.interfaces import SchedulerConfig

    page = (Path(__file__).resolve().parents[3] / "docs" / "concepts.md").read_text()
    block = re.search(r"```toml\n(\[modalities\.audio_video\.scheduler\].*?)```", page, re.S)
    data = tomllib.loads(block.group(1))["modalities"]["audio_video"]["scheduler"]
    got = structure(make_converter(Components()), data, SchedulerConfig)
    assert got == AudioVideoModality.Config().default_scheduler()


def test_config_through_the_converter():
    conv = make_converter(Components())
    data = {"kind": "audio_video", "video": {"frames": 4, "condition_first_frame": True},
            "audio": {"n_mels": 40, "voices": ["en-us"]}}
    cfg = structure(conv, data, ModalityConfig)
    assert cfg.video == VideoModality.Config(frames=4, condition_first_frame=True)
    assert (cfg.digits, cfg.digit_size) == (1, 10)
    assert cfg.audio == AudioModality.Config(n_mels=40, voices=("en-us",))
    assert structure(conv, to_data(conv, cfg), ModalityConfig) == cfg
    with pytest.raises(ConfigError, match=r"\$\.classes"):
        structure(conv, {"kind": "audio_video", "classes": 3}, ModalityConfig)
    with pytest.raises(ConfigError, match=r"\$\.video\.frames"):
        structure(conv, {"kind": "audio_video", "video": {"frames": 7}}, ModalityConfig)
    with pytest.raises(ConfigError, match="digit_size"):
        structure(conv, {"kind": "audio_video", "digit_size": 20}, ModalityConfig)


# ---- the joint sequence -----------------------------------------------------------------------

def test_token_dims_and_layout(adapter, tone_fields):
    assert adapter.name == "audio_video"
    assert adapter.token_dims == (2 * 16, 2 * 32) and adapter.token_dim == 64
    assert tuple(adapter.token_dims) == (32, 64)  # what the core builds projections from
    assert set(adapter.fields()) == {"video", "audio", "labels"}
    nv, na = adapter.num_video_tokens, adapter.num_audio_tokens
    assert (nv, na) == (64, 64)
    batch = adapter.tokenize(tone_fields)
    assert batch.tokens.shape == (4, nv + na, 64)
    assert (batch.modality_ids[:, :nv] == 0).all() and (batch.modality_ids[:, nv:] == 1).all()
    cv = batch.channel_valid
    assert cv[:, :nv, :32].all() and not cv[:, :nv, 32:].any() and cv[:, nv:].all()
    assert (batch.tokens[:, :nv, 32:] == 0).all()  # padding channels are zero
    assert batch.labels.tolist() == [0, 1, 2, 3]
    # the video part is exactly the video adapter's tokens, the audio part the audio adapter's
    video_tokens = adapter.video.tokenize({"latents": tone_fields["video"]}).tokens
    audio_tokens = adapter.audio.tokenize({"latents": tone_fields["audio"]}).tokens
    assert torch.equal(batch.tokens[:, :nv, :32], video_tokens)
    assert torch.equal(batch.tokens[:, nv:], audio_tokens)


def test_positions_share_the_time_axis(adapter):
    pos = adapter.positions(2)
    nv = adapter.num_video_tokens
    assert pos.shape == (2, adapter.num_tokens, 3)
    assert torch.equal(pos[0, :nv], adapter.video.positions(1)[0])
    audio = pos[0, nv:]
    assert (audio[:, 1:] == -1).all()
    # an audio token's t = its start time x fps / temporal_patch: token 8 starts at
    # 8 x 2 x 128 / 16000 s = 0.128 s = video temporal patch 0.128 x 8 / 2 = 0.512
    assert float(audio[8, 0]) == pytest.approx(0.512)
    # both span ~1 s: 8 frames at 8 fps (4 temporal patches), 127 hops of 8 ms (1.016 s)
    assert adapter.video.grid[0] - 0.5 < float(audio[-1, 0]) < adapter.video.grid[0] + 0.1


def test_pairs_match_by_class():
    m = AudioVideoModality.Config(count=30).build()
    src = m.open_source("moving_tones")
    assert isinstance(src, PairSource) and len(src) == 30
    raw = src.read(0, 12)
    assert raw["labels"].tolist() == [i % 10 for i in range(12)]
    tones = m.audio.open_source("tones").read(0, 12)
    np.testing.assert_array_equal(raw["waves"], tones["waves"])  # the same class, pair by pair
    np.testing.assert_array_equal(src.read(5, 7)["videos"], raw["videos"][5:7])


@needs_espeak
def test_spoken_pairs_cycle_the_voices():
    m = AudioVideoModality.Config(audio=AudioModality.Config(
        voices=("en-us", "en+f2"), speeds=(175,), pitches=(50,)), count=40).build()
    src = m.open_source("moving_spoken_digits")
    assert [src.audio_index(i) for i in (3, 13, 23, 33)] == [3, 13, 3, 13]
    raw = src.read(20, 24)
    want = src.audio.read(0, 4)["waves"]
    np.testing.assert_array_equal(raw["waves"], want)


def test_flow_loss_ignores_padded_channels(adapter, tone_fields):
    batch = adapter.tokenize(tone_fields)
    model = randomize_parameters(DiT.Config(depth=2, width=24, heads=2).build(
        token_dims=list(adapter.token_dims), num_classes=10), 1)
    teacher = EMATeacher(EMATeacher.Config())
    teacher.attach(model)
    objective = SelfFlowObjective(ObjectiveConfig(student_layer=1, teacher_layer=2), depth=2,
                                  width=24)
    g = torch.Generator().manual_seed(0)
    plan = DualTimestep(Uniform(), 0.5).plan(batch, generator=g)
    noise = torch.randn(batch.tokens.shape, generator=g)
    with torch.no_grad():
        ref = objective(model, teacher, batch, plan, noise)
        junk = torch.where(batch.channel_valid, batch.tokens, torch.randn_like(batch.tokens) * 50)
        noisy = torch.where(batch.channel_valid, noise, torch.randn_like(noise) * 50)
        got = objective(model, teacher, attrs.evolve(batch, tokens=junk), plan, noisy)
    assert got.flow.item() == pytest.approx(ref.flow.item(), rel=1e-5)
    assert got.rep.item() == pytest.approx(ref.rep.item(), rel=1e-5)


def test_first_frame_conditioning_and_sampling():
    m = AudioVideoModality.Config(
        video=VideoModality.Config(frames=4, temporal_patch=1, condition_first_frame=True),
        count=20).build()
    fields = {k: torch.from_numpy(v) for k, v in
              m.encode(m.open_source("moving_tones").read(0, 2)).items()}
    batch = m.tokenize(fields)
    k = m.video.tokens_per_frame_patch
    assert batch.condition[:, :k].all() and not batch.condition[:, k:].any()
    prompt = m.prompt(2, fields)
    assert torch.equal(prompt.condition, batch.condition)
    assert torch.equal(prompt.tokens[:, :k], batch.tokens[:, :k])
    assert torch.equal(m.prompt(2).tokens, prompt.tokens)  # fallback: the source's first clips
    first = fields["video"][:, 0]
    assert torch.equal(m.prompt(2, {"first_frame": first}).tokens, prompt.tokens)
    model = randomize_parameters(DiT.Config(depth=2, width=24, heads=2).build(
        token_dims=list(m.token_dims), num_classes=10), 0)
    out = sample(model, attrs.evolve(prompt, labels=fields["labels"]), steps=3,
                 generator=torch.Generator().manual_seed(0))
    video, audio = m.split(m.detokenize(out))
    assert torch.equal(video[:, 0], first)
    assert video.shape == (2, 4, 1, 16, 16) and audio.shape == (2, 128, 32)


def test_save_samples_gif_and_wav_per_sample(adapter, tone_fields, tmp_path: Path):
    packed = adapter.detokenize(adapter.tokenize(tone_fields).tokens)
    paths = adapter.save_samples(packed[:2], torch.tensor([4, 7]), tmp_path / "s")
    assert [p.name for p in paths] == ["sample-000-label4.gif", "sample-000-label4.wav",
                                       "sample-001-label7.gif", "sample-001-label7.wav",
                                       "samples_frames.png"]
    with Image.open(paths[0]) as gif:
        assert gif.n_frames == 8
    y, rate = read_wav(paths[1])
    assert rate == 16000 and len(y) == adapter.audio.clip_samples
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(p.name for p in paths)
