"""The Python API (featx.train, compare, evaluate, predict, load_bundle): its
docstring examples run as doctests on a tiny generated dataset, and the
wrappers return what the CLI's library calls return."""

import doctest
import json

import pytest

import featx
import featx.api

from .conftest import make_split_dataset


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    make_split_dataset(root / "photos", file_name="{name}{i}.jpg")
    return root


def test_the_api_is_reachable_from_featx_and_submodules_do_not_shadow_it():
    import featx.evaluate
    import featx.extract
    import featx.train
    for name in ("train", "compare", "evaluate", "predict", "load_bundle"):
        assert getattr(featx, name) is getattr(featx.api, name), name
        assert name in featx.__all__
        assert getattr(featx, name).__doc__.count("Examples\n    --------") == 1, name
    assert featx.extract.__module__ == "featx.extract"   # the function, as before


def test_docstring_examples_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(featx.api) if t.examples]
    names = sorted(t.name.rsplit(".", 1)[-1] for t in tests)
    assert names == ["api", "audit", "compare", "evaluate", "load_bundle", "predict", "train"]
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted >= 25
    # the module example wrote a bundle and a report, as `featx evaluate -o report` does
    assert json.loads((workdir / "report" / "metrics.json").read_text())["n"] == 9
    assert (workdir / "report" / "report.html").is_file()


def test_predict_refuses_a_missing_path(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    if not (workdir / "model.featx").exists():
        featx.train("photos", "resnet18", weights="none", out="model.featx", progress=False)
    with pytest.raises(featx.FeatxError, match=r"^photos/neww: no such file or folder; give image files or folders that exist$"):
        featx.predict("model.featx", ["photos/test/red", "photos/neww"], progress=False)
