"""Captions of image folders as datasets ship them: ``<stem>.txt`` beside each image, or a
``metadata.jsonl`` / ``metadata.csv``; a missing caption is an error naming the file unless
``missing_captions = "empty"``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selfflow_image import ImageModality
from selfflow_image.captions import (
    CaptionMetadataError,
    MissingCaptionError,
    folder_captions,
)

from selfflow_core import SelfFlowError


def _png(path: Path, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def _adapter(k: int = 2, **kw) -> ImageModality:
    return ImageModality.Config(size=8, classes=0, captions=k, **kw).build()


def _captions(root: Path, k: int = 2, **kw) -> list[list[str]]:
    adapter = _adapter(k, **kw)
    src = adapter.open_source(str(root))
    return adapter.encode(src.read(0, len(src)))["captions"].tolist()


def test_txt_beside_each_image_one_caption_per_line(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.jpg")
    (tmp_path / "a.txt").write_text("a red cat\n\n  on a mat  \nthird one\n")
    (tmp_path / "sub" / "b.txt").write_text("\ufeffa dog\n", encoding="utf-8")
    assert _captions(tmp_path, 2) == [["a red cat", "on a mat"], ["a dog", ""]]
    assert _captions(tmp_path, 4) == [["a red cat", "on a mat", "third one", ""],
                                      ["a dog", "", "", ""]]


def test_metadata_jsonl(tmp_path):
    for name in ("x.png", "y.png", "z.png"):
        _png(tmp_path / "imgs" / name)
    lines = [{"file_name": "imgs/x.png", "text": "an x"},
             {"file_name": "imgs/y.png", "text": ["a y", "the letter y"]},
             {"file_name": "imgs/z.png", "text": "a z"},
             {"file_name": "imgs/x.png", "text": "x again"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    assert _captions(tmp_path, 2) == [["an x", "x again"], ["a y", "the letter y"], ["a z", ""]]
    # other accepted column names, and a metadata file in a subfolder (names relative to it)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(json.dumps(d) for d in (
        {"image": "x.png", "caption": "ex"}, {"file": "y.png", "caption": "why"},
        {"image": "z.png", "caption": "zed"})))
    assert _captions(tmp_path, 1) == [["ex"], ["why"], ["zed"]]


def test_metadata_csv_and_txt_together(tmp_path):
    _png(tmp_path / "cats" / "a.png")
    _png(tmp_path / "dogs" / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'file,caption,other\ncats/a.png,"a cat, sitting",1\ndogs/b.png,a dog,2\n'
        "cats/a.png,another cat,3\n")
    (tmp_path / "dogs" / "b.txt").write_text("a dog from the txt\n")
    adapter = ImageModality.Config(size=8, classes=2, captions=3).build()
    src = adapter.open_source(str(tmp_path))
    out = adapter.encode(src.read(0, 2))
    assert out["captions"].tolist() == [["a cat, sitting", "another cat", ""],
                                        ["a dog", "a dog from the txt", ""]]
    np.testing.assert_array_equal(out["labels"], [0, 1])  # classes still from the subfolders
    assert "3 captions each" in src.description


def test_missing_caption_names_the_file(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("a caption\n")
    (tmp_path / "c.txt").write_text("   \n")  # blank: no caption
    with pytest.raises(MissingCaptionError) as info:  # when the source is opened
        _adapter(1).open_source(str(tmp_path))
    from selfflow_image import FolderSource

    src = FolderSource(tmp_path, 8, 1, captions=1)  # directly: at the first read
    with pytest.raises(MissingCaptionError, match="b.png has no caption"):
        src.read(2, 3)
    err = info.value
    assert isinstance(err, SelfFlowError) and isinstance(err, ValueError)
    assert err.path == str(tmp_path / "b.png") and err.missing == 2
    msg = str(err)
    assert f"image file {tmp_path / 'b.png'} has no caption" in msg
    assert "1 more of the 3 images" in msg and "b.txt" in msg
    assert 'missing_captions = "empty"' in msg
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is MissingCaptionError and str(again) == msg
    # allowed explicitly: empty captions
    assert _captions(tmp_path, 2, missing_captions="empty") == [
        ["a caption", ""], ["", ""], ["", ""]]


def test_captions_off_ignores_caption_files(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("not json at all\n")
    adapter = ImageModality.Config(size=8, classes=0).build()
    src = adapter.open_source(str(tmp_path))
    out = adapter.encode(src.read(0, 1))
    assert set(out) == {"latents", "labels"} and "captions each" not in src.description


@pytest.mark.parametrize(("name", "text", "match"), [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{oops\n', r"line 2 is not JSON"),
    ("metadata.jsonl", '{"path": "a.png", "text": "x"}\n',
     r"line 1 has no file key \(keys \['path', 'text'\]; one of file_name, file, image"),
    ("metadata.jsonl", '{"file_name": "a.png", "label": 3}\n', r"line 1 has no caption key"),
    ("metadata.jsonl", '{"file_name": "a.png", "text": 3}\n', r"line 1: a caption must be"),
    ("metadata.jsonl", '{"file_name": "nope.png", "text": "x"}\n',
     r"line 1 names 'nope.png', which is not an image of the folder"),
    ("metadata.csv", "file_name,label\na.png,3\n", r"no caption column in the header"),
    ("metadata.csv", "name,text\na.png,x\n", r"no file column in the header \['name', 'text'\]"),
])
def test_bad_metadata_names_the_file_and_line(tmp_path, name, text, match):
    _png(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(CaptionMetadataError, match=match) as info:
        folder_captions(tmp_path, [tmp_path / "a.png"])
    assert str(info.value).startswith(f"caption metadata {tmp_path / name}: ")
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_folder_captions_with_skipped_unreadable_files(tmp_path):
    """``on_unreadable = "skip"``: captions follow the readable files."""
    _png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    _png(tmp_path / "c.png")
    for stem in "abc":
        (tmp_path / f"{stem}.txt").write_text(f"caption {stem}\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert _captions(tmp_path, 1, on_unreadable="skip") == [["caption a"], ["caption c"]]
