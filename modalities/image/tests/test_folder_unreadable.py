"""A folder source with files PIL cannot read: one clear error naming the file (``"stop"``, the
default), or ``on_unreadable = "skip"``: the same readable files every time, the skipped ones
listed once."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selfflow_image import (
    FolderSource,
    ImageModality,
    UnreadableImageError,
    UnreadableImagesSkipped,
)

from selfflow_core import Components, SelfFlowError, open_store
from selfflow_core.cli.main import main
from selfflow_core.config.converter import make_converter, structure, to_data
from selfflow_core.interfaces import ModalityConfig


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (12, 10), value).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/a.png, cat/b.png (not an image), dog/c.png (truncated), dog/d.png: two good files,
    one in each class, and two bad ones that fail at open and at decode."""
    root = tmp_path / "images"
    _png(root / "cat" / "a.png", 40)
    (root / "cat" / "b.png").write_bytes(b"this is not a PNG")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "PNG")
    (root / "dog" / "c.png").parent.mkdir(parents=True)
    (root / "dog" / "c.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png(root / "dog" / "d.png", 200)
    return root


def test_stop_names_the_unreadable_file(folder: Path):
    m = ImageModality.Config(size=4, classes=2).build()
    assert m.config.on_unreadable == "stop"
    src = m.open_source(str(folder))
    assert len(src) == 4  # nothing is decoded before reading
    with pytest.raises(UnreadableImageError) as e:
        src.read(0, 4)
    err = e.value
    assert isinstance(err, SelfFlowError) and isinstance(err, ValueError)
    msg = str(err)
    assert "\n" not in msg
    assert str(folder / "cat" / "b.png") in msg and "not an image PIL can identify" in msg
    assert 'on_unreadable = "skip"' in msg
    assert str(pickle.loads(pickle.dumps(err))) == msg
    # a file that opens but cannot be decoded is named too
    with pytest.raises(UnreadableImageError, match=r"dog.c\.png \(OSError: .*truncated"):
        src.read(2, 3)
    assert src.read(3, 4)["labels"].tolist() == [1]  # the files around it still read


def test_stop_is_one_error_line_from_the_cli(folder: Path, tmp_path: Path, capsys):
    rc = main(["encode", "image", str(folder), str(tmp_path / "s.zarr"), "size=4", "classes=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]  # the rest is the progress bar
    assert line.startswith("error: cannot read image file ") and err.endswith(line + "\n")
    assert str(folder / "cat" / "b.png") in line


def test_skip_leaves_out_unreadable_files_and_lists_them_once(folder: Path):
    m = ImageModality.Config(size=4, classes=2, on_unreadable="skip").build()
    src = m.open_source(str(folder))
    assert isinstance(src, FolderSource)
    with pytest.warns(UnreadableImagesSkipped) as record:
        n = len(src)
    assert n == 2 and len(record) == 1
    listed = str(record[0].message)
    assert "skipped 2 unreadable file(s) of 4" in listed
    assert listed.index(str(Path("cat", "b.png"))) < listed.index(str(Path("dog", "c.png")))
    assert "not an image PIL can identify" in listed and "truncated" in listed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # listed once: no second warning
        assert src.files == [folder / "cat" / "a.png", folder / "dog" / "d.png"]
        assert src.labels.tolist() == [0, 1]  # classes come from the folders: dog stays 1
        assert src.class_names == ["cat", "dog"]
        assert [p.name for p, _ in src.skipped] == ["b.png", "c.png"]
        raw = src.read(0, 2)
    np.testing.assert_allclose(raw["images"][:, 0, 0, 0], [40 / 127.5 - 1, 200 / 127.5 - 1],
                               atol=1e-5)
    # deterministic: a second source over the same folder reads the same samples
    with pytest.warns(UnreadableImagesSkipped):
        again = m.open_source(str(folder)).read(0, 2)
    np.testing.assert_array_equal(again["images"], raw["images"])
    np.testing.assert_array_equal(again["labels"], raw["labels"])
    assert "unreadable files skipped" in src.description


def test_skip_from_the_cli(folder: Path, tmp_path: Path, capsys):
    store = tmp_path / "s.zarr"
    with pytest.warns(UnreadableImagesSkipped) as record:
        rc = main(["encode", "image", str(folder), str(store), "size=4", "classes=2",
                   "on_unreadable=skip"])
    assert rc == 0, capsys.readouterr().err
    assert len(record) == 1 and "skipped 2 unreadable file(s)" in str(record[0].message)
    assert "2 samples" in capsys.readouterr().out
    stored = open_store(str(store))
    assert len(stored) == 2 and stored.read([0, 1])["labels"].tolist() == [0, 1]


def test_skip_with_nothing_readable(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"")
    src = ImageModality.Config(classes=0, on_unreadable="skip").build().open_source(str(tmp_path))
    with pytest.warns(UnreadableImagesSkipped), pytest.raises(
            UnreadableImageError, match=r"x\.png .*none of the 1 image files .* is readable"):
        len(src)


def test_on_unreadable_config():
    conv = make_converter(Components())
    cfg = structure(conv, {"kind": "image", "on_unreadable": "skip"}, ModalityConfig)
    assert cfg == ImageModality.Config(on_unreadable="skip")
    assert to_data(conv, cfg)["on_unreadable"] == "skip"
    with pytest.raises(ValueError, match="on_unreadable"):
        ImageModality.Config(on_unreadable="ignore")
    with pytest.raises(ValueError, match="on_unreadable"):
        FolderSource(".", 8, 1, on_unreadable="ignore")
