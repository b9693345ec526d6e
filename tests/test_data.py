"""Dataset layouts, content ids, splits and robust decoding."""


import numpy as np
import pytest
from PIL import Image

from featx.data import content_id, load_image, open_dataset
from featx.errors import DatasetError, ImageError

from .conftest import COLOURS, make_image


def test_folder_per_class_gets_a_stratified_seeded_split(folder_dataset):
    ds = open_dataset(folder_dataset)
    assert ds.layout == "folders"
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds) == 24
    assert ds.split_made["seed"] == 0
    for split in ("train", "val", "test"):
        counts = ds.counts(split)
        assert len(set(counts.values())) == 1, counts  # stratified: same per class
    assert sum(ds.counts("test").values()) == 3
    again = open_dataset(folder_dataset)
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in ds.samples]
    other = open_dataset(folder_dataset, seed=1)
    assert {s.path for s in other.subset("test")} != {s.path for s in ds.subset("test")}


def test_split_folders_with_validation_alias(split_dataset):
    ds = open_dataset(split_dataset)
    assert ds.layout == "split-folders"
    assert ds.splits == ["train", "val", "test"]
    assert ds.split_made is None
    assert ds.counts("train") == {"blue": 6, "green": 6, "red": 6}
    assert len(ds.subset("validation")) == 6


def test_split_folders_without_test_gets_one_carved_from_train(tmp_path):
    for name, colour in COLOURS.items():
        for i in range(5):
            make_image(tmp_path / "d" / "train" / name / f"{i}.png", colour, seed=i + len(name) * 10)
    ds = open_dataset(tmp_path / "d")
    assert ds.layout == "split-folders"
    assert "test" in ds.splits and ds.split_made is not None


def test_filename_labels_default_and_regex(tmp_path):
    root = tmp_path / "flat"
    for i in range(4):
        make_image(root / f"cat.{i}.jpg", COLOURS["red"], seed=i)
        make_image(root / f"dog.{i}.jpg", COLOURS["blue"], seed=10 + i)
    ds = open_dataset(root)
    assert ds.layout == "filenames"
    assert ds.classes == ["cat", "dog"]

    root2 = tmp_path / "flat2"
    for i in range(3):
        make_image(root2 / f"img_{i}_label-cat.png", COLOURS["red"], seed=20 + i)
        make_image(root2 / f"img_{i}_label-dog.png", COLOURS["blue"], seed=30 + i)
    ds2 = open_dataset(root2, label_regex=r"label-(?P<label>\w+)\.")
    assert ds2.classes == ["cat", "dog"]


def test_csv_manifest_with_splits_and_relative_paths(tmp_path):
    rows = ["path,label,split"]
    for i in range(4):
        make_image(tmp_path / "imgs" / f"a{i}.png", COLOURS["red"], seed=i)
        make_image(tmp_path / "imgs" / f"b{i}.png", COLOURS["green"], seed=50 + i)
        split = "test" if i == 0 else "train"
        rows += [f"imgs/a{i}.png,apple,{split}", f"imgs/b{i}.png,bean,{split}"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(tmp_path / "m.csv")
    assert ds.layout == "csv"
    assert ds.counts("test") == {"apple": 1, "bean": 1}
    assert all(s.path.is_absolute() and s.path.exists() for s in ds.samples)


def test_csv_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: needs a header with columns path,label\[,split\]; found file,class"):
        open_dataset(tmp_path / "bad.csv")
    make_image(tmp_path / "a.png", COLOURS["red"])
    (tmp_path / "bad2.csv").write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(DatasetError, match=r"bad2\.csv:2: unknown split 'holdout'"):
        open_dataset(tmp_path / "bad2.csv")


def test_missing_folder_and_single_class_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        open_dataset(tmp_path / "nope")
    make_image(tmp_path / "one" / "only" / "a.png", COLOURS["red"])
    with pytest.raises(DatasetError, match="need at least 2 to classify"):
        open_dataset(tmp_path / "one")


def test_content_id_is_stable_and_ignores_the_name(tmp_path):
    a = make_image(tmp_path / "a.png", COLOURS["red"], seed=3)
    b = tmp_path / "renamed.png"
    b.write_bytes(a.read_bytes())
    c = make_image(tmp_path / "c.png", COLOURS["red"], seed=4)
    assert content_id(a) == content_id(b) != content_id(c)
    assert len(content_id(a)) == 32


def test_hash_index_reuses_and_refreshes(tmp_path, folder_dataset):
    index = tmp_path / "hashes.sqlite"
    ds1 = open_dataset(folder_dataset, hash_index=index)
    assert index.exists()
    first = ds1.samples[0].path
    make_image(first, COLOURS["red"], seed=999)  # rewrite: new content, new mtime
    ds2 = open_dataset(folder_dataset, hash_index=index)
    changed = {s.path: s.id for s in ds2.samples}[first]
    assert changed == content_id(first) != {s.path: s.id for s in ds1.samples}[first]


# ---- decoding


def test_bad_files_are_reported_with_a_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a picture")
    good = make_image(tmp_path / "good.jpg", COLOURS["red"], size=(200, 200))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"text\.jpg: not an image \(unknown format\)"):
        load_image(text)
    with pytest.raises(ImageError, match=r"truncated\.jpg: (truncated|corrupt) image"):
        load_image(truncated)
    assert load_image(good).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_8bit_rgb(tmp_path, mode):
    base = Image.fromarray(np.full((20, 30, 3), (200, 100, 50), np.uint8))
    if mode == "I;16":
        im = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    elif mode == "RGBA":
        im = base.convert("RGBA")
    else:
        im = base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        assert abs(int(np.asarray(out)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((10, 40, 3), np.uint8))  # 40 wide, 10 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 40)


def test_jpeg_draft_decodes_big_photos_small_but_big_enough(tmp_path):
    path = make_image(tmp_path / "big.jpg", COLOURS["green"], size=(2000, 1500))
    im = load_image(path, draft_size=256)
    assert min(im.size) >= 256 and min(im.size) < 1500


def test_non_image_extension_is_skipped_at_discovery(folder_dataset):
    (folder_dataset / "red" / "notes.txt").write_text("hello")
    ds = open_dataset(folder_dataset)
    assert any(p.endswith("notes.txt") and "not an image extension" in r for p, r in ds.skipped)
    assert len(ds) == 24
