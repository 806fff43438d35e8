"""Tests of the selfflow-video plugin: the core's contract kit plus video-specific checks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from selfflow_video import MovingDigitsSource, VideoModality, tile, write_video_files
from selfflow_video.presets import debug_tiny, default

from selfflow_core import TILE_SEPARATOR, Components, LogitNormal, ModalitySpec
from selfflow_core.builtin.dit import DiT
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.interfaces import ModalityConfig
from selfflow_core.sampling import sample
from selfflow_core.testing import ModalityContract, ModalityPluginContract, randomize_parameters
from selfflow_core.timesteps import DualTimestep, Uniform

HAS_GYM = (importlib.util.find_spec("gymnasium") is not None
           and importlib.util.find_spec("pygame") is not None)
needs_gym = pytest.mark.skipif(not HAS_GYM, reason="gymnasium[classic-control] not installed")


class TestVideoContract(ModalityContract):
    config = VideoModality.Config()


class TestVideoImageToVideoContract(ModalityContract):
    config = VideoModality.Config(size=8, frames=4, temporal_patch=1, patch=4, channels=3,
                                  classes=0, condition_first_frame=True, digit_size=6)


@needs_gym
class TestVideoCartPoleContract(ModalityContract):
    config = VideoModality.Config(classes=2, frames=4, count=8)
    source = "cartpole"
    num_samples = 2


@pytest.fixture(scope="module")
def adapter() -> VideoModality:
    return VideoModality.Config().build()


def _fields(adapter: VideoModality, source: str, start: int, stop: int) -> dict[str, torch.Tensor]:
    out = adapter.encode(adapter.open_source(source).read(start, stop))
    return {k: torch.from_numpy(v) for k, v in out.items()}


# ---- config and registration ------------------------------------------------------------------

class TestVideoPlugin(ModalityPluginContract):
    """The kit's plugin checks (entry point, round trips, valid presets, debug_tiny lowers the
    loss), and what the run writes."""

    modality, distribution = "video", "selfflow-video"
    config_class = VideoModality.Config
    presets = ("video",)

    def test_debug_tiny_writes_samples(self, debug_tiny_run):
        step = debug_tiny_run.config.steps
        samples = debug_tiny_run.run_dir / "samples" / f"step-{step:08d}" / "video"
        assert (samples / "samples.gif").is_file() and (samples / "samples_frames.png").is_file()


def test_preset_schedules_and_widths():
    # paper App. A.2-A.3: mask ratio 0.1, logit-normal shift 2.95, 5 % low-SNR tail, and
    # App. E/F: a conditioning first frame noise-augmented at U[0, 0.2]; a spec naming no
    # scheduler gets it
    paper = DualTimestep.Config(
        distribution=LogitNormal.Config(shift=2.95, tail_fraction=0.05), mask_ratio=0.1,
        condition_noise=0.2)
    assert VideoModality.Config().default_scheduler() == paper
    assert ModalitySpec(modality=VideoModality.Config(), store="x.zarr").scheduler == paper
    for preset in (default(), debug_tiny()):
        spec = preset.modalities["video"]
        assert spec.scheduler == spec.modality.default_scheduler() == paper
    # a token wider than the backbone cannot carry its noise: samples keep a noise floor
    preset = default()
    assert preset.backbone.width > preset.modalities["video"].modality.build().token_dim


def test_config_through_the_converter():
    conv = make_converter(Components())
    cfg = structure(conv, {"kind": "video", "size": 24, "condition_first_frame": True},
                    ModalityConfig)
    assert cfg == VideoModality.Config(size=24, condition_first_frame=True)
    assert structure(conv, to_data(conv, cfg), ModalityConfig) == cfg
    for bad, where in (({"size": 18}, r"\$\.size"), ({"frames": 7}, r"\$\.frames"),
                       ({"channels": 2}, r"\$\.channels"), ({"digit_size": 32}, "digit_size"),
                       ({"prompt_source": "mnist"}, "prompt_source"),
                       ({"frames": 2, "condition_first_frame": True}, "frames")):
        with pytest.raises(ConfigError, match=where):
            structure(conv, {"kind": "video", **bad}, ModalityConfig)


def test_shapes(adapter: VideoModality):
    assert adapter.name == "video"
    assert adapter.latent_shape == (8, 1, 16, 16)
    assert adapter.grid == (4, 4, 4) and adapter.num_tokens == 64
    assert adapter.token_dim == 2 * 1 * 4 * 4
    assert adapter.sources() == ("moving_digits", "cartpole")
    assert adapter.fields()["latents"].shape == (8, 1, 16, 16)
    with pytest.raises(ValueError, match="moving_digits, cartpole"):
        adapter.open_source("ucf101")
    with pytest.raises(ValueError, match="10 classes"):
        VideoModality.Config(classes=3).build().open_source("moving_digits")


# ---- tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"temporal_patch": 1, "patch": 2},
                                {"channels": 3, "size": 12, "patch": 3, "frames": 6,
                                 "temporal_patch": 3}])
def test_patchify_roundtrip_and_layout(kw):
    m = VideoModality.Config(**kw).build()
    t, c, h, w = m.latent_shape
    x = torch.randn(3, t, c, h, w, generator=torch.Generator().manual_seed(0))
    batch = m.tokenize({"latents": x, "labels": torch.arange(3)})
    pt, p = m.config.temporal_patch, m.config.patch
    assert batch.tokens.shape == (3, m.num_tokens, m.token_dim)
    assert torch.equal(m.detokenize(batch.tokens), x)
    # token 0: frames 0..pt-1 of the top-left patch; token 1 its right neighbour; the token after
    # a whole frame-patch grid starts the next temporal patch
    assert torch.equal(batch.tokens[:, 0], x[:, :pt, :, :p, :p].reshape(3, -1))
    assert torch.equal(batch.tokens[:, 1], x[:, :pt, :, :p, p:2 * p].reshape(3, -1))
    k = m.tokens_per_frame_patch
    assert torch.equal(batch.tokens[:, k], x[:, pt:2 * pt, :, :p, :p].reshape(3, -1))
    gt, gh, gw = m.grid
    want = torch.tensor([[a, b, d] for a in range(gt) for b in range(gh) for d in range(gw)],
                        dtype=torch.float32)
    assert batch.positions.shape == (3, m.num_tokens, 3)
    assert torch.equal(batch.positions[1], want)
    assert not batch.condition.any() and batch.valid.all()


# ---- sources ----------------------------------------------------------------------------------

def test_moving_digits(adapter: VideoModality):
    src = adapter.open_source("moving_digits")
    assert isinstance(src, MovingDigitsSource) and len(src) == 2048
    raw = src.read(0, 20)
    x, labels = raw["videos"], raw["labels"]
    assert x.shape == (20, 8, 1, 16, 16) and x.dtype == np.float32
    assert labels.tolist() == [i % 10 for i in range(20)] and labels.dtype == np.int64
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.5
    # deterministic per index, whatever the read boundaries
    np.testing.assert_array_equal(src.read(7, 9)["videos"], x[7:9])
    np.testing.assert_array_equal(adapter.open_source("moving_digits").read(3, 4)["videos"],
                                  x[3:4])
    # the digits move: consecutive frames differ
    assert (np.abs(np.diff(x, axis=1)).reshape(20, 7, -1).sum(-1) > 0).mean() > 0.9
    other = VideoModality.Config(seed=1).build().open_source("moving_digits").read(0, 2)
    assert not np.array_equal(other["videos"], x[:2])


def test_moving_digits_first_digit_has_the_label():
    from selfflow_video.sources import _digits

    images, targets, _ = _digits()  # sklearn's digits / 16 (read from its bundled CSV)
    src = MovingDigitsSource(count=10, size=8, frames=2, digits=1, digit_size=8)
    raw = src.read(0, 10)
    for i in range(10):
        frame = (raw["videos"][i, 0, 0] + 1) / 2  # the digit fills the 8x8 canvas
        same = [np.allclose(frame, images[j], atol=1e-6)
                for j in np.flatnonzero(targets == raw["labels"][i])]
        assert any(same), f"clip {i} does not show a digit of class {raw['labels'][i]}"


@needs_gym
def test_cartpole_source():
    m = VideoModality.Config(classes=2, frames=4, count=4, channels=3).build()
    src = m.open_source("cartpole")
    raw = src.read(0, 4)
    x = raw["videos"]
    assert x.shape == (4, 4, 3, 16, 16) and x.dtype == np.float32
    assert raw["labels"].tolist() == [0, 1, 0, 1]
    assert x.min() >= -1 and x.max() <= 1 and (x > 0).any()  # the dark cart shows up bright
    np.testing.assert_array_equal(src.read(1, 2)["videos"], x[1:2])  # seeded per index
    src.close()


def test_cartpole_without_gymnasium_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now fails
    m = VideoModality.Config(classes=2).build()
    with pytest.raises(ImportError, match=r"gymnasium\[classic-control\]"):
        m.open_source("cartpole")


# ---- image-to-video conditioning --------------------------------------------------------------

def test_first_frame_conditioning():
    m = VideoModality.Config(condition_first_frame=True, temporal_patch=1, classes=10).build()
    fields = _fields(m, "moving_digits", 0, 4)
    batch = m.tokenize(fields)
    k = m.tokens_per_frame_patch
    assert batch.condition[:, :k].all() and not batch.condition[:, k:].any()
    assert batch.target_mask.sum() == 4 * (m.num_tokens - k)
    # the core holds conditioning tokens clean in every plan
    plan = DualTimestep(Uniform(), 0.5).plan(batch, generator=torch.Generator().manual_seed(0))
    assert (plan.student_t[:, :k] == 0).all() and (plan.teacher_t[:, :k] == 0).all()
    assert not plan.masked[:, :k].any()

    # prompt: the first frame from the clips, from a separate first frame, or from the source
    first = fields["latents"][:, 0]
    for given in ({"latents": fields["latents"]}, {"first_frame": first}):
        p = m.prompt(4, given)
        assert torch.equal(p.condition, batch.condition)
        assert torch.equal(m.detokenize(p.tokens)[:, 0], first)
        assert (p.tokens[:, k:] == 0).all()
    fallback = m.prompt(4)  # the first clips of the source: labels 0, 1, 2, 3 like the trainer's
    assert torch.equal(fallback.tokens, m.prompt(4, fields).tokens)
    with pytest.raises(ValueError, match="conditioning frames have shape"):
        m.prompt(4, {"first_frame": torch.zeros(4, 1, 8, 8)})

    # sampling keeps the conditioning frame exactly and generates the rest
    model = randomize_parameters(DiT.Config(depth=2, width=24, heads=2).build(
        token_dims=[m.token_dim], num_classes=10), 0)
    prompt = attrs.evolve(m.prompt(2, {"first_frame": first[:2]}), labels=torch.tensor([0, 1]))
    out = m.detokenize(sample(model, prompt, steps=3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(out[:, 0], first[:2])
    assert not torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))


def test_two_frame_conditioning_patch():
    m = VideoModality.Config(condition_first_frame=True, temporal_patch=2, classes=0).build()
    first = torch.rand(3, 1, 16, 16) * 2 - 1
    clips = m.detokenize(m.prompt(3, {"first_frame": first}).tokens)
    assert torch.equal(clips[:, 0], first) and torch.equal(clips[:, 1], first)
    assert (clips[:, 2:] == 0).all()


# ---- samples ----------------------------------------------------------------------------------

def test_save_samples_gif_and_strip(adapter: VideoModality, tmp_path: Path):
    fields = _fields(adapter, "moving_digits", 0, 5)
    paths = adapter.save_samples(fields["latents"], fields["labels"], tmp_path / "s")
    assert [p.name for p in paths] == ["samples.gif", "samples_frames.png"]
    with Image.open(paths[0]) as gif:
        assert gif.n_frames == 8
        assert gif.size == (3 * 66 + 2, 2 * 66 + 2)  # 5 clips in a 3-wide grid, cells x4
        assert abs(gif.info["duration"] - 125) <= 10  # 8 fps (GIF stores centiseconds)
    with Image.open(paths[1]) as strip:
        assert strip.size == (8 * 66 + 2, 5 * 66 + 2)  # one row per clip, one column per frame
        a = np.asarray(strip)
    want = np.round((fields["latents"][0, 3, 0].numpy() + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(a[2:66:4, 2 + 3 * 66:66 + 3 * 66:4], want)


def test_write_video_files_rgb_unlabelled(tmp_path: Path):
    paths = write_video_files(torch.zeros(2, 3, 3, 32, 32), tmp_path, fps=4.0, stem="x")
    assert [p.name for p in paths] == ["x.gif", "x_frames.png"]
    with Image.open(paths[1]) as im:
        assert im.mode == "RGB" and im.size == (3 * 66 + 2, 2 * 66 + 2)
    grid = tile(np.zeros((3, 2, 2, 1), np.uint8), 2)  # 2-px light lines
    assert grid.shape == (2 * 4 + 2, 2 * 4 + 2, 1) and grid[0, 0, 0] == TILE_SEPARATOR > 200
