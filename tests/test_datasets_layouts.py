"""Labels and layouts as a user meets them: extraction needs no labels,
labels that cannot be meant are errors with a hint (exact output)."""

import pytest
from click.testing import CliRunner

from featx.cli import cli
from featx.data import open_dataset
from featx.errors import DatasetError

from .conftest import COLOURS, make_image

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q"]


@pytest.fixture
def run(tmp_path):
    def _run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return _run


def _error(r):
    assert r.exit_code == 1, r.output
    assert len(r.output.splitlines()) == 1, r.output
    return r.output


def test_extract_needs_no_labels(tmp_path, run):
    one = tmp_path / "photos"
    for i in range(3):
        make_image(one / "batch1" / f"{i}.jpg", COLOURS["red"], seed=i)
    r = run("extract", one, *FAST, "--cache", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "dataset photos: 3 images, no labels (none layout)"
    assert r.output.splitlines()[1].startswith("extracted 3 images in ")
    flat = tmp_path / "camera"
    for i in range(20):
        make_image(flat / f"IMG_{i:04d}.jpg", COLOURS["blue"], seed=50 + i)
    r = run("extract", flat, *FAST, "--cache", tmp_path / "c")
    assert r.exit_code == 0 and r.output.splitlines()[0] == "dataset camera: 20 images, no labels (none layout)"
    r = run("extract", flat / "IMG_0003.jpg", *FAST, "--cache", tmp_path / "c")
    assert r.exit_code == 0 and r.output.splitlines()[:2] == [
        "dataset IMG_0003: 1 image, no labels (none layout)", "nothing to extract: all 1 images already cached"]
    r = run("extract", flat / "IMG_0001.jpg", flat / "IMG_0002.jpg", one, *FAST, "--cache", tmp_path / "c")
    assert r.exit_code == 0 and r.output.splitlines()[0] == f"dataset {tmp_path.name}: 5 images, no labels (none layout)"
    # labelled data keeps its labels when extracted
    r = run("extract", flat, "--label-regex", r"IMG_(?P<label>\d)", *FAST, "--cache", tmp_path / "c")
    assert r.output.splitlines()[0].startswith("dataset camera: 20 images, 1 classes, filenames layout;")


def test_only_commands_that_fit_or_evaluate_need_two_classes(tmp_path, run):
    one = tmp_path / "photos"
    for i in range(3):
        make_image(one / "batch1" / f"{i}.jpg", COLOURS["red"], seed=i)
    out = tmp_path / "m.featx"
    assert _error(run("train", one, "-o", out, "--cache", tmp_path / "c")) == (
        f"Error: {one}: found 1 class (batch1); need at least 2 to classify\n")
    assert _error(run("compare", one, "--cache", tmp_path / "c")) == (
        f"Error: {one}: found 1 class (batch1); need at least 2 to classify\n")
    assert _error(run("train", one / "batch1" / "0.jpg", "-o", out, "--cache", tmp_path / "c")) == (
        f"Error: {one / 'batch1' / '0.jpg'}: images without labels can be extracted, not trained on or evaluated; "
        "give a folder (CLASS/ folders, train/val/test/ folders, label.N.jpg files) or a .csv manifest "
        "(path,label[,split])\n")
    assert _error(run("train", one, "--layout", "none", "-o", out, "--cache", tmp_path / "c")) == (
        "Error: --layout none: images without labels can be extracted, not trained on or evaluated; "
        "give a folder (CLASS/ folders, train/val/test/ folders, label.N.jpg files) or a .csv manifest "
        "(path,label[,split])\n")
    with pytest.raises(DatasetError, match="need at least 2 to classify"):
        open_dataset(one)
    assert open_dataset(one, labels=False).layout == "none"


def _ants_and_bees(root, n=40):
    for i in range(n):
        make_image(root / f"ant_{i}.jpg", COLOURS["red"], seed=i)
        make_image(root / f"bee_{i}.jpg", COLOURS["blue"], seed=100 + i)
    return root


def test_one_class_per_file_is_an_error_that_suggests_a_regex_that_works(tmp_path, run):
    data = _ants_and_bees(tmp_path / "insects")
    assert _error(run("train", data, "-o", tmp_path / "m.featx", "--cache", tmp_path / "c")) == (
        f"Error: {data}: 80 images in 80 classes, 80 of them with a single image; the label is the text before "
        "the first dot: ant_0.jpg -> 'ant_0'; give --label-regex '(?P<label>[a-z]+)_' (ant_0.jpg -> 'ant')\n")
    ds = open_dataset(data, label_regex="(?P<label>[a-z]+)_")
    assert ds.classes == ["ant", "bee"] and ds.counts() == {"ant": 40, "bee": 40}


def test_split_names_as_classes_suggest_split_folders(tmp_path, run):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(3):
                make_image(tmp_path / "d" / split / cls / f"{i}.png", COLOURS["red"], seed=hash((split, cls)) % 97 + i)
    assert _error(run("train", tmp_path / "d", "--layout", "folders", "-o", tmp_path / "m.featx",
                      "--cache", tmp_path / "c")) == (
        f"Error: {tmp_path / 'd'}: classes train, val look like split folders, not labels; for "
        "train/val/test/CLASS/ folders use --layout split-folders (or auto)\n")
    assert open_dataset(tmp_path / "d").layout == "split-folders"


def test_label_regex_errors_name_the_regex(tmp_path, run):
    data = _ants_and_bees(tmp_path / "insects", n=3)
    out = tmp_path / "m.featx"
    assert _error(run("train", data, "--label-regex", "(", "-o", out, "--cache", tmp_path / "c")) == (
        "Error: --label-regex '(': not a valid regular expression (missing ), unterminated subpattern "
        "at position 0)\n")
    assert _error(run("train", data, "--label-regex", "^(?P<label>[a-z]+)-", "-o", out, "--cache", tmp_path / "c")) == (
        f"Error: --label-regex '^(?P<label>[a-z]+)-' matches none of the 6 image names in {data} (e.g. ant_0.jpg); "
        "it needs to match the file name, with a group 'label' for the class\n")
    assert _error(run("extract", data, "--label-regex", "[", *FAST, "--cache", tmp_path / "c")) == (
        "Error: --label-regex '[': not a valid regular expression (unterminated character set at position 0)\n")
