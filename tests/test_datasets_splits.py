"""Splits by content (split version 2), zero fractions and the held-out split."""

import shutil

import pytest
from click.testing import CliRunner

from featx.cli import _defaults_from_bundle, cli
from featx.data import SPLIT_VERSION, open_dataset
from featx.errors import ConfigError

from .conftest import COLOURS, make_image

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q"]


def _photos_with_copies(root, n=40):
    """n photos in two classes, and each copied once under another name."""
    for i in range(n):
        cls = "red" if i % 2 else "blue"
        a = make_image(root / cls / f"IMG_{i:04d}.jpg", COLOURS[cls], seed=i)
        shutil.copyfile(a, root / cls / f"copy of IMG_{i:04d} ({i}).jpg")
    return root


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_copies_under_other_names_always_share_a_split(tmp_path, seed):
    ds = open_dataset(_photos_with_copies(tmp_path / "p"), seed=seed)
    assert len(ds) == 80 and ds.split_made["version"] == SPLIT_VERSION == 2
    split_of = {}
    for s in ds.samples:
        split_of.setdefault(s.id, set()).add(s.split)
    assert len(split_of) == 40
    assert all(len(splits) == 1 for splits in split_of.values()), split_of
    # stratified by distinct contents: 20 per class -> 3 test, 3 val, 14 train each, twice over
    for split, n in (("test", 6), ("val", 6), ("train", 28)):
        assert ds.counts(split) == {"blue": n, "red": n}, (split, ds.counts(split))


def test_renaming_moves_no_image_to_another_split(tmp_path):
    root = tmp_path / "p"
    for cls in ("red", "blue"):
        for i in range(10):
            make_image(root / cls / f"{i}.png", COLOURS[cls], seed=hash(cls) % 100 + i)
    before = {s.id: s.split for s in open_dataset(root).samples}
    for p in sorted(root.rglob("*.png")):
        p.rename(p.with_name("renamed_" + p.name))
    after = {s.id: s.split for s in open_dataset(root).samples}
    assert after == before


def test_a_bundle_trained_on_a_version_1_split_is_noted_once(capsys):
    from click.core import ParameterSource

    class Ctx:
        def get_parameter_source(self, name):
            return ParameterSource.DEFAULT

    class Bundle:
        name = "old.featx"
        manifest = {"training": {"split_made": {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.1}}}

    assert _defaults_from_bundle(Ctx(), Bundle(), 0.15, 0.15, 0) == (0.2, 0.1, 3)
    err = capsys.readouterr().err
    assert err == ("note: old.featx was trained on a split of an earlier featx (version 1, which also hashed file "
                   "names); splits now follow image content only, so its test images may include some it trained "
                   "on: train again for a clean evaluation\n")
    Bundle.manifest["training"]["split_made"]["version"] = SPLIT_VERSION
    _defaults_from_bundle(Ctx(), Bundle(), 0.15, 0.15, 0)
    assert capsys.readouterr().err == ""


def _train_val(root):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            for i in range(4):
                make_image(root / split / cls / f"{i}.png", COLOURS["red" if cls == "cat" else "green"],
                           seed=(split == "val") * 50 + (cls == "dog") * 10 + i)
    return root


def test_zero_fractions_are_allowed_and_the_held_out_split_follows(tmp_path):
    tv = _train_val(tmp_path / "tv")
    carved = open_dataset(tv)
    assert carved.splits == ["train", "val", "test"] and carved.held_out == "test"
    assert carved.counts("val") == {"cat": 4, "dog": 4}   # val as given; test comes out of train
    no_test = open_dataset(tv, test_fraction=0)
    assert no_test.splits == ["train", "val"] and no_test.held_out == "val" and no_test.split_made is None
    assert no_test.counts("train") == {"cat": 4, "dog": 4}

    flat = tmp_path / "flat"
    for cls in ("cat", "dog"):
        for i in range(10):
            make_image(flat / cls / f"{i}.png", COLOURS["blue"], seed=(cls == "dog") * 20 + i)
    no_val = open_dataset(flat, val_fraction=0)
    assert no_val.splits == ["train", "test"] and no_val.counts("test") == {"cat": 2, "dog": 2}
    only_val = open_dataset(flat, test_fraction=0)
    assert only_val.splits == ["train", "val"] and only_val.held_out == "val"
    with pytest.raises(ConfigError, match=r"flat: --val-fraction 0 and --test-fraction 0 leave no images to "
                                          r"evaluate on \(the dataset has no val or test split\); give one of them a share"):
        open_dataset(flat, val_fraction=0, test_fraction=0)
    assert open_dataset(flat, val_fraction=0, test_fraction=0, labels=False).splits == ["train"]
    with pytest.raises(ConfigError, match=r"^--test-fraction 1: give a share of at least 0 and below 1$"):
        open_dataset(flat, test_fraction=1)
    with pytest.raises(ConfigError, match=r"^--val-fraction 0.5 \+ --test-fraction 0.5 = 1: must be below 1"):
        open_dataset(flat, val_fraction=0.5, test_fraction=0.5)


def test_the_dataset_line_names_the_held_out_split(tmp_path):
    tv = _train_val(tmp_path / "tv")
    runner = CliRunner()
    r = runner.invoke(cli, ["extract", str(tv), *FAST, "--cache", str(tmp_path / "c"), "--test-fraction", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "dataset tv: 16 images, 2 classes, split-folders layout; train 8, val 8; held out: val"
    r = runner.invoke(cli, ["extract", str(tv), *FAST, "--cache", str(tmp_path / "c")])
    assert r.output.splitlines()[0] == ("dataset tv: 16 images, 2 classes, split-folders layout; train 6, val 8, test 2 "
                                        "(test carved from train: stratified, seed 0); held out: test")
    r = runner.invoke(cli, ["extract", str(tv), *FAST, "--cache", str(tmp_path / "c"), "--test-fraction", "-0.1"])
    # the range comes from featx.options, checked by click before anything runs: a usage error
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        "Error: Invalid value for '--test-fraction': -0.1 is not in the range 0<=x<1.")
