"""Tests of the selfflow-image plugin: the core's contract kit plus image-specific checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from selfflow_image import (
    DiffusersVAEEncoder,
    DigitsSource,
    FolderSource,
    ImageModality,
    PixelEncoder,
    make_grid,
)

from selfflow_core import (
    TILE_SEPARATOR,
    Components,
    DualTimestep,
    ModalitySpec,
    Uniform,
    tile_images,
)
from selfflow_core.config.converter import ConfigError, make_converter, structure, to_data
from selfflow_core.interfaces import ModalityConfig

try:
    from selfflow_core.testing import ModalityContract
except ImportError:  # an older core without the contract kit: the direct tests below still run
    ModalityContract = None
try:
    from selfflow_core.testing import ModalityPluginContract
except ImportError:  # a core without the plugin checks
    ModalityPluginContract = None


if ModalityContract is not None:
    class TestImageContract(ModalityContract):
        config = ImageModality.Config()

    class TestImageContractRGBUnconditional(ModalityContract):
        config = ImageModality.Config(size=16, patch=4, channels=3, classes=0)

if ModalityPluginContract is not None:
    class TestImagePlugin(ModalityPluginContract):
        """Entry point, round trips, valid presets, and image_debug_tiny lowers the loss."""

        modality, distribution = "image", "selfflow-image"
        config_class = ImageModality.Config
        presets = ("image",)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits()


@pytest.fixture(scope="module")
def adapter() -> ImageModality:
    return ImageModality.Config().build()


# ---- config and registration ------------------------------------------------------------------

def test_config_through_the_converter():
    components = Components()
    conv = make_converter(components)
    cfg = structure(conv, {"kind": "image", "size": 16, "patch": 4,
                           "encoder": {"kind": "pixel"}}, ModalityConfig)
    assert cfg == ImageModality.Config(size=16, patch=4)
    data = to_data(conv, cfg)
    assert data["kind"] == "image" and data["encoder"]["kind"] == "pixel"
    assert structure(conv, data, ModalityConfig) == cfg
    with pytest.raises(ConfigError, match=r"\$\.encoder: unknown image encoder 'vqgan'"):
        structure(conv, {"kind": "image", "encoder": {"kind": "vqgan"}}, ModalityConfig)
    with pytest.raises(ConfigError, match=r"\$\.channels: 'channels' must be 1"):
        structure(conv, {"kind": "image", "channels": 2}, ModalityConfig)
    with pytest.raises(ConfigError, match=r"\$\.size"):
        structure(conv, {"kind": "image", "size": 9}, ModalityConfig)
    with pytest.raises(ConfigError, match="path"):
        structure(conv, {"kind": "image", "encoder": {"kind": "diffusers_vae"}}, ModalityConfig)


def test_paper_schedule_is_the_default_and_the_presets():
    """Paper App. A.2-A.3: uniform p(t), mask ratio 0.25; a spec naming no scheduler gets it."""
    from selfflow_image.presets import debug_tiny, default

    paper = DualTimestep.Config(distribution=Uniform.Config(), mask_ratio=0.25)
    assert ImageModality.Config().default_scheduler() == paper
    assert ModalitySpec(modality=ImageModality.Config(), store="x.zarr").scheduler == paper
    for preset in (default(), debug_tiny()):
        spec = preset.modalities["image"]
        assert spec.scheduler == spec.modality.default_scheduler() == paper


def test_defaults(adapter: ImageModality):
    assert adapter.name == "image" and ImageModality.Config.kind == "image"
    assert adapter.num_classes == 10
    assert adapter.token_dim == 1 * 2 * 2
    assert adapter.num_tokens == 16
    assert adapter.sources() == ("digits", "words", "words_heldout")


# ---- encode -----------------------------------------------------------------------------------

def test_fields_schema(adapter: ImageModality):
    fields = adapter.fields()
    assert set(fields) == {"latents", "labels"}
    assert fields["latents"].shape == (1, 8, 8) and fields["latents"].dtype == "float32"
    assert fields["labels"].shape == () and fields["labels"].dtype == "int64"
    assert adapter.latent_field == "latents"
    info = adapter.encoder_info()
    assert info["name"] == "pixel" and info["version"] == "1"
    assert info["settings"]["image_size"] == 8
    rgb = ImageModality.Config(size=32, channels=3).build()
    assert rgb.fields()["latents"].shape == (3, 32, 32)


def test_encode_digits_equals_sklearn_scaled(adapter: ImageModality, digits):
    src = adapter.open_source("digits")
    assert len(src) == 1797
    out = adapter.encode(src.read(0, len(src)))
    want = (digits.images / 8.0 - 1.0).astype(np.float32)[:, None]
    assert out["latents"].dtype == np.float32 and out["latents"].shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(out["latents"], want)
    np.testing.assert_array_equal(out["labels"], digits.target)
    assert out["labels"].dtype == np.int64
    assert out["latents"].min() == -1.0 and out["latents"].max() == 1.0
    # deterministic order, and reading in pieces gives the same arrays
    part = adapter.encode(src.read(100, 110))
    np.testing.assert_array_equal(part["latents"], out["latents"][100:110])


def test_labels_range(adapter: ImageModality):
    labels = adapter.open_source("digits").read(0, 1797)["labels"]
    assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    batch = adapter.tokenize({"latents": torch.zeros(3, 1, 8, 8),
                              "labels": torch.tensor([0, 5, 9])})
    assert batch.labels.tolist() == [0, 5, 9] and batch.labels.dtype == torch.long
    uncond = ImageModality.Config(classes=0).build()
    assert uncond.num_classes == 0
    assert uncond.tokenize({"latents": torch.zeros(3, 1, 8, 8),
                            "labels": torch.zeros(3, dtype=torch.long)}).labels is None


@pytest.mark.parametrize("size", [16, 32])
def test_upscaled_digits(size: int, digits):
    m = ImageModality.Config(size=size, patch=4).build()
    out = m.encode(m.open_source("digits").read(0, 20))
    x = out["latents"]
    assert x.shape == (20, 1, size, size) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # bilinear upsampling keeps the picture: downsampling back is close to the original
    small = torch.nn.functional.avg_pool2d(torch.from_numpy(x), size // 8).numpy()
    assert np.abs(small - (digits.images[:20, None] / 8 - 1)).mean() < 0.15
    assert m.fields()["latents"].shape == (1, size, size)
    assert m.tokenize({k: torch.from_numpy(v) for k, v in out.items()}).tokens.shape == (
        20, (size // 4) ** 2, 16)


def test_rgb_replicates_grey():
    m = ImageModality.Config(channels=3).build()
    x = m.encode(m.open_source("digits").read(0, 4))["latents"]
    assert x.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(x[:, 0], x[:, 2])


# ---- tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"patch": 1}, {"patch": 4, "size": 16, "channels": 3},
                                {"patch": 8, "size": 32}])
def test_patchify_roundtrip_exact(kw):
    m = ImageModality.Config(**kw).build()
    c, h, w = m.latent_shape
    x = torch.randn(5, c, h, w, generator=torch.Generator().manual_seed(0))
    batch = m.tokenize({"latents": x, "labels": torch.arange(5)})
    p = m.config.patch
    assert batch.tokens.shape == (5, (h // p) * (w // p), c * p * p)
    assert batch.tokens.shape[-1] == m.token_dim
    assert torch.equal(m.detokenize(batch.tokens), x)
    # token 0 is the top-left patch, token 1 its right neighbour (row-major), channel-major inside
    assert torch.equal(batch.tokens[:, 0], x[:, :, :p, :p].reshape(5, -1))
    if w // p > 1:
        assert torch.equal(batch.tokens[:, 1], x[:, :, :p, p:2 * p].reshape(5, -1))


def test_positions_are_a_2d_grid():
    m = ImageModality.Config(size=16, patch=4).build()
    batch = m.tokenize({"latents": torch.zeros(2, 1, 16, 16), "labels": torch.zeros(2).long()})
    pos = batch.positions
    assert pos.shape == (2, 16, 2) and pos.dtype == torch.float32
    want = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float32)
    assert torch.equal(pos[0], want) and torch.equal(pos[1], want)
    assert batch.valid.all() and not batch.condition.any()
    assert (batch.modality_ids == 0).all()


def test_prompt():
    m = ImageModality.Config().build()
    prompt = m.prompt(6)
    assert prompt.tokens.shape == (6, 16, 4) and (prompt.tokens == 0).all()
    assert prompt.labels is None
    assert torch.equal(prompt.positions, m.positions(6))
    labelled = m.prompt(3, {"labels": torch.tensor([1, 2, 10])})
    assert labelled.labels.tolist() == [1, 2, 10]


# ---- samples ----------------------------------------------------------------------------------

def test_make_grid():
    imgs = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
    grid = make_grid(imgs, nrow=3)  # 2-px lines between and around the cells
    assert grid.shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:4, 2:5], imgs[0])
    np.testing.assert_array_equal(grid[6:8, 7:10], imgs[4])
    # a line and the empty cell
    assert grid[0, 0, 0] == TILE_SEPARATOR and (grid[6:8, 12:15] == TILE_SEPARATOR).all()


def test_save_samples_png(adapter: ImageModality, tmp_path: Path):
    src = adapter.open_source("digits")
    out = adapter.encode(src.read(0, 10))  # labels 0..9, one each
    latents, labels = torch.from_numpy(out["latents"]), torch.from_numpy(out["labels"])
    paths = adapter.save_samples(latents, labels, tmp_path / "s")
    assert paths == [tmp_path / "s" / "samples.png"]
    with Image.open(paths[0]) as im:
        assert im.mode == "L"
        # one row per class, 8x nearest upscaling, 2-px lines, a 30-px label margin on the left
        # (font pixels of 64 // 10 = 6 px: a 3-wide digit is 18 px, 6 px blank either side)
        assert im.size == (2 + 30 + 2 + 64 + 2, 10 * (64 + 2) + 2)
        a = np.asarray(im)
    # the first cell is digit 0, upscaled by 8, mapped from [-1, 1] to 0..255
    want = np.round((out["latents"][0, 0] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(a[2:66:8, 34:98:8], want)
    # rows are sorted by label: reversing the inputs gives the same picture
    adapter.save_samples(latents.flip(0), labels.flip(0), tmp_path / "r")
    with Image.open(tmp_path / "r" / "samples.png") as im:
        np.testing.assert_array_equal(np.asarray(im), a)
    # uneven classes: columns = the largest class; no labels: a near-square grid
    adapter.save_samples(latents[:3], torch.tensor([1, 1, 4]), tmp_path / "u")
    with Image.open(tmp_path / "u" / "samples.png") as im:
        assert im.size == (2 + 30 + 2 * 66 + 2, 2 * 66 + 2)
    rgb = ImageModality.Config(size=16, patch=4, channels=3).build()
    rgb.save_samples(torch.zeros(5, 3, 16, 16), None, tmp_path / "n")
    with Image.open(tmp_path / "n" / "samples.png") as im:
        assert im.mode == "RGB" and im.size == (3 * 66 + 2, 2 * 66 + 2)  # no labels: no margin


def test_save_samples_labels_rows_and_draws_light_lines(adapter: ImageModality, tmp_path: Path):
    """Rows and columns are apart by 2-px light lines; each row's class is drawn in the left
    margin, so the margins of two classes differ, and the same class draws the same mark."""
    src = adapter.open_source("digits")
    out = adapter.encode(src.read(0, 20))  # labels 0..9, twice
    latents, labels = torch.from_numpy(out["latents"]), torch.from_numpy(out["labels"])
    labels = labels.clone()
    labels[10:] = torch.tensor([3, 3, 3, 3, 3, 7, 7, 7, 7, 7])  # classes 0..9: 2 or 6 samples
    adapter.save_samples(latents, labels, tmp_path / "s")
    with Image.open(tmp_path / "s" / "samples.png") as im:
        a = np.asarray(im)
    margin, cell, ncol, rows = 30, 64, 6, 10
    assert a.shape == (rows * (cell + 2) + 2, 2 + margin + ncol * (cell + 2) + 2)
    line_ys = [y for r in range(rows + 1) for y in (r * 66, r * 66 + 1)]
    x0 = 2 + margin
    line_xs = [x for k in range(ncol + 1) for x in (x0 + k * 66, x0 + k * 66 + 1)]
    assert (a[line_ys, x0:] == TILE_SEPARATOR).all() and (a[:, line_xs] == TILE_SEPARATOR).all()
    assert TILE_SEPARATOR >= 200  # light
    strips = [a[2 + r * 66:2 + r * 66 + cell, 2:2 + margin] for r in range(rows)]
    for strip in strips:  # every row has a dark label on the light margin
        assert (strip == 0).sum() > 0 and (strip == TILE_SEPARATOR).sum() > strip.size // 2
    assert len({s.tobytes() for s in strips}) == rows  # ten classes, ten different labels
    # the margin is the class, not the row: drop class 0 and row 0 now shows class 1's label
    adapter.save_samples(latents[1:10], labels[1:10], tmp_path / "t")
    with Image.open(tmp_path / "t" / "samples.png") as im:
        b = np.asarray(im)
    np.testing.assert_array_equal(b[2:2 + cell, 2:2 + margin], strips[1])
    # the mark is the built-in font's digit, scaled by 64 // 10
    ink = strips[7] == 0
    ys, xs = np.nonzero(ink)
    glyph = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1][::6, ::6]
    assert glyph.astype(int).tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0, 1, 0]]
    np.testing.assert_array_equal(make_grid(np.zeros((2, 4, 4, 1), np.uint8), 1, row_labels=[0, 1]),
                                  tile_images(np.zeros((2, 4, 4, 1), np.uint8), 1,
                                              row_labels=[0, 1]))


# ---- sources ----------------------------------------------------------------------------------

def _write_png(path: Path, value: int, size: tuple[int, int] = (20, 12), mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (value, value // 2, 255 - value) if mode == "RGB" else value
    Image.new(mode, size, fill).save(path)


def test_folder_source_with_class_subfolders(tmp_path: Path):
    _write_png(tmp_path / "cat" / "b.png", 200)
    _write_png(tmp_path / "cat" / "a.png", 100)
    _write_png(tmp_path / "dog" / "x.jpg", 50, mode="L")
    m = ImageModality.Config(size=8, channels=3, classes=2).build()
    src = m.open_source(str(tmp_path))
    assert isinstance(src, FolderSource) and len(src) == 3
    assert src.class_names == ["cat", "dog"]
    out = m.encode(src.read(0, 3))
    assert out["latents"].shape == (3, 3, 8, 8) and out["latents"].dtype == np.float32
    assert out["labels"].tolist() == [0, 0, 1]
    # sorted by path: cat/a.png (value 100) first; a flat colour survives resizing
    np.testing.assert_allclose(out["latents"][0, :, 3, 3], [100 / 127.5 - 1, 50 / 127.5 - 1,
                                                            155 / 127.5 - 1], atol=1e-5)
    assert out["latents"].min() >= -1 and out["latents"].max() <= 1
    grey = ImageModality.Config(size=4, channels=1, classes=2).build()
    assert grey.encode(grey.open_source(str(tmp_path)).read(2, 3))["latents"].shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="classes"):
        ImageModality.Config(classes=1).build().open_source(str(tmp_path))


def test_folder_source_unlabelled(tmp_path: Path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.PNG", 60 * i, mode="L")
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageModality.Config(classes=0).build().open_source(str(tmp_path))
    assert len(src) == 4 and src.class_names == []
    raw = src.read(1, 4)
    assert raw["labels"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(raw["images"][:, 0, 0, 0], [60 / 127.5 - 1, 120 / 127.5 - 1,
                                                           180 / 127.5 - 1], atol=1e-5)


def test_unknown_source(adapter: ImageModality, tmp_path: Path):
    with pytest.raises(ValueError, match="digits"):
        adapter.open_source("mnist")
    with pytest.raises(ValueError, match="no PNG"):
        adapter.open_source(str(tmp_path))


def test_digits_source_is_shared_and_read_only():
    a, b = DigitsSource(), DigitsSource()
    assert a.images is b.images  # loaded once per process
    before = a.images[:2].copy()
    x = a.read(0, 2)["images"]
    x[...] = 0  # callers get copies
    np.testing.assert_array_equal(a.images[:2], before)
    assert not a.images.flags.writeable


# ---- encoders ---------------------------------------------------------------------------------

def test_pixel_encoder_is_identity():
    enc = PixelEncoder.Config().build()
    assert isinstance(enc, PixelEncoder) and enc.kind == "pixel"
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(enc.decode(enc.encode(x)), x)
    assert enc.latent_shape(3, 4) == (3, 4, 4)
    assert enc.info()["name"] == "pixel"


def test_diffusers_vae_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="path"):
        DiffusersVAEEncoder.Config(path="")
    cfg = DiffusersVAEEncoder.Config(path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist.*Nothing is downloaded"):
        cfg.build()
    # validation finds it before anything runs
    assert any("is not a directory" in p for p in cfg.problems())
    assert any(p.startswith("encoder.path: ") for p in ImageModality.Config(encoder=cfg).problems())
    # the adapter builds its encoder lazily: only using it raises
    m = ImageModality.Config(encoder=cfg).build()
    with pytest.raises(FileNotFoundError, match="nope"):
        m.fields()


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None,
                    reason="diffusers is installed")
def test_diffusers_vae_without_diffusers_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ImportError, match="diffusers.*not installed"):
        DiffusersVAEEncoder(tmp_path)


def test_encoders_are_tagged_components_selected_by_kind(tmp_path: Path):
    from selfflow_core import Components, ConfigError, make_converter, structure, to_data

    conv = make_converter(Components())
    vae = ImageModality.Config(encoder=DiffusersVAEEncoder.Config(path=str(tmp_path), scale=0.5))
    data = to_data(conv, vae)
    assert data["encoder"] == {"kind": "diffusers_vae", "path": str(tmp_path), "scale": 0.5}
    assert structure(conv, data, ImageModality.Config) == vae
    pixel = structure(conv, {"encoder": {"kind": "pixel"}}, ImageModality.Config)
    assert isinstance(pixel.encoder, PixelEncoder.Config)
    with pytest.raises(ConfigError, match=r"encoder: unknown image encoder 'vae'; known: "
                                          r"diffusers_vae, pixel"):
        structure(conv, {"encoder": {"kind": "vae"}}, ImageModality.Config)
    with pytest.raises(ConfigError, match=r"encoder: unknown key"):
        structure(conv, {"encoder": {"kind": "pixel", "path": "x"}}, ImageModality.Config)


def test_a_missing_vae_directory_is_one_line_from_the_cli(tmp_path, capsys, monkeypatch):
    from selfflow_core.cli.main import main

    monkeypatch.chdir(tmp_path)
    rc = main(["train", "image_debug_tiny", "modalities.image.modality.encoder.kind=diffusers_vae",
               f"modalities.image.modality.encoder.path={tmp_path / 'no-vae'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("error: ")
    assert "$.modalities.image.modality.encoder.path" in err and "no-vae" in err
    assert not (tmp_path / "data").exists()  # refused before encoding anything
