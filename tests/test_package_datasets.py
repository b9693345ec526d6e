"""featx:NAME, the datasets shipped inside the package, in every command that takes a dataset."""

import pytest
from click.testing import CliRunner

from featx.cli import cli
from featx.data import open_dataset


def test_open_dataset_takes_a_shipped_dataset(tmp_path):
    ds = open_dataset("featx:clothing-mini", hash_index=tmp_path / "h.sqlite")
    assert ds.name == "clothing-mini" and len(ds) == 400 and len(ds.classes) == 10


def test_commands_take_featx_names_and_say_which_exist(tmp_path):
    r = CliRunner().invoke(cli, ["extract", "featx:nope", "-b", "resnet18", "-w", "none", "--cache", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == "Error: featx:nope: featx ships no dataset 'nope'; it ships featx:clothing-mini"
    r = CliRunner().invoke(cli, ["train", "featx:nope", "-b", "resnet18", "-w", "none", "--cache", str(tmp_path),
                                 "-o", str(tmp_path / "m.featx")])
    assert r.exit_code == 1 and "featx ships no dataset 'nope'" in r.output


@pytest.mark.slow
def test_extract_train_and_predict_run_on_a_shipped_dataset(tmp_path):
    cache = str(tmp_path / "cache")
    model = str(tmp_path / "m.featx")
    r = CliRunner().invoke(cli, ["extract", "featx:clothing-mini", "-b", "resnet18", "-w", "none", "--cache", cache])
    assert r.exit_code == 0, r.output
    assert "dataset clothing-mini: 400 images, 10 classes, split-folders layout" in r.output
    assert "extracted 400 images" in r.output
    r = CliRunner().invoke(cli, ["train", "featx:clothing-mini", "-b", "resnet18", "-w", "none", "--cache", cache,
                                 "-o", model])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["predict", model, "featx:clothing-mini", "--format", "csv", "--cache", cache, "-q"])
    assert r.exit_code == 0, r.output
    assert "features: 400 cached, 0 extracted" in r.output
    r = CliRunner().invoke(cli, ["predict", model, "featx:nope", "--cache", cache])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == "Error: featx:nope: featx ships no dataset 'nope'; it ships featx:clothing-mini"
