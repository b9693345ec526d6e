"""Odd inputs end in one line: names that are not UTF-8, bad CSVs and regexes,
unreadable folders, symlink loops, images too large to decode."""

import json
import os
import struct
import time
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

import featx.data
from featx.cli import cli
from featx.data import load_image, open_dataset
from featx.errors import DatasetError, ImageError

from .conftest import COLOURS, make_image

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q"]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _two_classes(root, n=3):
    for ci, cls in enumerate(("red", "blue")):
        for i in range(n):
            make_image(root / cls / f"{i}.png", COLOURS[cls], seed=ci * 10 + i)
    return root


def test_names_that_are_not_utf8_are_kept_and_shown_escaped(tmp_path):
    root = _two_classes(tmp_path / "d")
    bad_dir = os.fsencode(root) + b"/caf\xe9"
    os.mkdir(bad_dir)
    for i in range(3):
        make_image(tmp_path / "tmp.png", COLOURS["green"], seed=40 + i)
        os.rename(tmp_path / "tmp.png", bad_dir + b"/photo\xff" + str(i).encode() + b".png")
    index = tmp_path / "hashes.sqlite"
    ds = open_dataset(root, hash_index=index)
    assert ds.classes == ["blue", "caf\\xe9", "red"] and len(ds) == 9
    manifest = ds.manifest()
    json.dumps(manifest).encode("utf-8")
    assert {s["path"] for s in manifest["samples"] if s["label"] == "caf\\xe9"} == {
        f"caf\\xe9/photo\\xff{i}.png" for i in range(3)}
    # the second run finds the hashes in the index (no re-read), despite the odd names
    calls = []
    real = featx.data.content_id
    featx.data.content_id = lambda p: calls.append(p) or real(p)
    try:
        again = open_dataset(root, hash_index=index)
    finally:
        featx.data.content_id = real
    assert calls == [] and again.id == ds.id
    r = _cli("extract", root, *FAST, "--cache", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "dataset d: 9 images, 3 classes, folders layout;" in r.output and "extracted 9 images" in r.output


def test_a_csv_that_is_not_utf8_is_one_line(tmp_path):
    make_image(tmp_path / "a.png", COLOURS["red"])
    (tmp_path / "m.csv").write_bytes("path,label\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"m\.csv:2: not UTF-8 text \(byte 0xe9\); save the CSV as UTF-8$"):
        open_dataset(tmp_path / "m.csv")
    r = _cli("train", tmp_path / "m.csv", "-o", tmp_path / "x.featx", "--cache", tmp_path / "c")
    assert r.exit_code == 1
    assert r.output == f"Error: {tmp_path / 'm.csv'}:2: not UTF-8 text (byte 0xe9); save the CSV as UTF-8\n"


def test_csv_paths_may_point_outside_its_folder(tmp_path):
    for i in range(2):
        make_image(tmp_path / "elsewhere" / f"a{i}.png", COLOURS["red"], seed=i)
        make_image(tmp_path / "elsewhere" / f"b{i}.png", COLOURS["blue"], seed=9 + i)
    (tmp_path / "lists").mkdir()
    rows = ["path,label,split"] + [f"../elsewhere/{c}{i}.png,{c},{'test' if i else 'train'}"
                                   for c in "ab" for i in range(2)]
    (tmp_path / "lists" / "m.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(tmp_path / "lists" / "m.csv")
    assert len(ds) == 4 and all(s.path.resolve().parent == tmp_path / "elsewhere" for s in ds.samples)


def test_an_unreadable_class_folder_is_named_and_fatal_under_strict(tmp_path, monkeypatch):
    root = _two_classes(tmp_path / "d")
    _two_classes(tmp_path / "more")
    os.rename(tmp_path / "more" / "red", root / "green")
    real = os.scandir
    locked = str(root / "green")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)   # root reads everything, so emulate chmod 000
    ds = open_dataset(root)
    assert ds.classes == ["blue", "red"]
    assert ds.skipped == [(locked, "cannot read folder (Permission denied); its images are left out")]
    r = _cli("extract", root, *FAST, "--strict", "--cache", tmp_path / "c")
    assert r.exit_code == 1
    assert r.output.splitlines() == [
        "dataset d: 6 images, 2 classes, folders layout; train 4, test 2 (split made: stratified, seed 0); "
        "held out: test",
        f"skipped {locked}: cannot read folder (Permission denied); its images are left out",
        f"Error: {locked}: cannot read folder (Permission denied); its images are left out "
        "(--strict stops at the first bad image)"]


def test_symlink_loops_and_broken_links_are_named_when_left_out(tmp_path):
    root = _two_classes(tmp_path / "d")
    os.symlink(root / "red", root / "red" / "again")          # a folder that contains itself
    os.symlink(root / "blue" / "self.png", root / "blue" / "self.png")
    os.symlink(tmp_path / "gone.png", root / "blue" / "gone.png")
    ds = open_dataset(root)
    assert len(ds) == 6
    assert sorted(ds.skipped) == sorted([
        (str(root / "red" / "again"), f"symlink loop (leads back to {root / 'red'}); left out"),
        (str(root / "blue" / "self.png"), "symlink loop (Too many levels of symbolic links); left out"),
        (str(root / "blue" / "gone.png"), "broken symlink (No such file or directory); left out"),
    ])


def _png_header_only(path, w, h):
    """A valid PNG signature and header claiming w x h pixels, with next to no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_images_over_the_pixel_budget_are_refused_before_decoding(tmp_path):
    big = _png_header_only(tmp_path / "huge.png", 24000, 24000)   # under Pillow's own bomb limit
    assert 24000 * 24000 < 2 * Image.MAX_IMAGE_PIXELS
    t = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge\.png: too large to decode: 24000x24000 = 576 megapixels, above "
                                         r"featx's budget of 150 per image \(featx\.data\.MAX_PIXELS\); downscale it"):
        load_image(big)
    assert time.perf_counter() - t < 1.0


def test_big_jpegs_are_decoded_at_a_scale_within_the_budget(tmp_path, monkeypatch):
    jpg = make_image(tmp_path / "big.jpg", COLOURS["green"], size=(800, 600))
    png = make_image(tmp_path / "big.png", COLOURS["green"], size=(800, 600))
    monkeypatch.setattr(featx.data, "MAX_PIXELS", 150_000)
    im = load_image(jpg)
    assert im.size == (400, 300)                     # 1/2 scale: 120k pixels fit, full size (480k) would not
    assert load_image(jpg, draft_size=100).size == (200, 150)   # draft_size still picks the smallest that covers
    with pytest.raises(ImageError, match=r"big\.png: too large to decode: 800x600"):
        load_image(png)
    monkeypatch.setattr(featx.data, "MAX_PIXELS", 1_000)
    with pytest.raises(ImageError, match=r"big\.jpg: too large to decode: 800x600 = 0.48 megapixels, above featx.s budget of 0.001 "):
        load_image(jpg)                             # even 1/8 is over the budget


def test_an_image_over_the_budget_is_a_skip_with_its_reason_and_fatal_under_strict(tmp_path):
    root = _two_classes(tmp_path / "d")
    _png_header_only(root / "red" / "huge.png", 24000, 24000)
    r = _cli("extract", root, *FAST, "--cache", tmp_path / "c", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "too large to decode: 24000x24000" in r.output and "; 1 skipped" in r.output
    r = _cli("extract", root, *FAST, "--cache", tmp_path / "c2", "--workers", "0", "--strict")
    assert r.exit_code == 1 and "too large to decode: 24000x24000" in r.output.splitlines()[-1]
