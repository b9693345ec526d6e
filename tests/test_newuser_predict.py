"""Issue 19, item 6: a mistyped path is an error; the exit status says whether any row failed."""

import pytest
from click.testing import CliRunner

import featx
from featx.cli import cli

from .conftest import make_split_dataset


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("newuser_predict")
    make_split_dataset(root / "photos", file_name="{name}{i}.jpg")
    featx.train(root / "photos", "resnet18", weights="none", cache=root / "cache", out=root / "m.featx",
                grid=[1.0], progress=False)
    return root


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_mistyped_path_is_a_usage_error_and_nothing_is_predicted(work):
    r = run("predict", work / "m.featx", work / "photos" / "test" / "red", work / "photos" / "neww",
            "--cache", work / "cache", "-q")
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.splitlines()[-1] == (f"Error: Invalid value for 'IMAGES...': Path "
                                         f"'{work / 'photos' / 'neww'}' does not exist.")


def test_every_row_labelled_exits_0_any_failed_row_exits_1(work):
    r = run("predict", work / "m.featx", work / "photos" / "test" / "red", "--cache", work / "cache", "-q")
    assert r.exit_code == 0, r.output
    assert [line.split()[1] for line in r.stdout.splitlines()[2:]] == ["red", "red", "red"]

    folder = work / "mixed"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((work / "photos" / "test" / "blue" / "blue0.jpg").read_bytes())
    (folder / "broken.jpg").write_text("not a jpeg")
    r = run("predict", work / "m.featx", folder, "--cache", work / "cache", "-q")
    assert r.exit_code == 1
    assert r.stdout.splitlines()[2:] == [
        f"{folder / 'a.jpg'}       blue   {r.stdout.splitlines()[2].split()[2]}",
        f"{folder / 'broken.jpg'}  error  -            not an image (unknown format)",
    ]
    assert r.stderr.splitlines()[-1] == "error: 1 of 2 images could not be read (exit status 1)"


def test_the_library_refuses_a_missing_path_too(work):
    with pytest.raises(featx.FeatxError) as e:
        featx.predict(work / "m.featx", [work / "photos" / "nope.jpg"], cache=work / "cache", progress=False)
    assert str(e.value) == f"{work / 'photos' / 'nope.jpg'}: no such file or folder; give image files or folders that exist"
