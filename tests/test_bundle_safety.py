"""Bundles carry no code: the classifier is arrays + JSON, pickles load only when trusted, and a planted
pickle does not run.

Measured here: every registered classifier (with and without PCA, 2 and 3 classes, string labels, an
ensemble calibration) gives bit-identical predict_proba after a save/load through the bundle; a bundle
made by ``featx train`` predicts exactly what the same model stored the old way (format 1, joblib) does.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import joblib
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featx import safemodel
from featx.bundle import (BundleError, Pickled, bundle_probabilities, load_bundle, read_manifest, save_bundle,
                          upgrade_bundle)
from featx.cache import FeatureCache
from featx.classify import CLASSIFIERS, make_pipeline_for
from featx.cli import cli
from featx.data import open_dataset
from featx.train import train

from .conftest import make_split_dataset

SMALL = dict(batch_size=8, workers=0, progress=False)
FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q", "-j", "1"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data(n_classes, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(90, 12))
    y = np.arange(90) % n_classes
    X[:, 0] += 1.5 * y
    X[:, 1] -= 0.7 * y
    X_new = rng.normal(size=(50, 12)) * 1.5
    return X, (y if labels is None else np.asarray(labels)[y]), X_new


def _rewrite_model_json(path: Path, structure: dict) -> None:
    """Replace model.json and its sha256 in manifest.json, as an attacker would."""
    (path / "model.json").write_text(json.dumps(structure))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.json"]["sha256"] = _sha(path / "model.json")
    (path / "manifest.json").write_text(json.dumps(manifest))


def _round_trip(tmp_path, model, classes):
    path = save_bundle(tmp_path / "m.featx", {"kind": "linear", "classes": classes}, model)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.json", "model.safetensors"]
    return load_bundle(path)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_every_classifier_loads_back_with_identical_probabilities(tmp_path, name, n_classes):
    X, y, X_new = _data(n_classes)
    for pca in (None, 5, 0.8):
        pipe = make_pipeline_for(name, pca=pca, seed=3).fit(X, y)
        back = _round_trip(tmp_path, pipe, [str(c) for c in range(n_classes)]).payload
        assert isinstance(back, Pipeline) and back is not pipe
        assert [type(s) for _, s in back.steps] == [type(s) for _, s in pipe.steps]
        assert np.array_equal(back.predict_proba(X_new), pipe.predict_proba(X_new)), (name, pca)
        assert np.array_equal(back.predict(X_new), pipe.predict(X_new))
        assert back.get_params(deep=False).keys() == pipe.get_params(deep=False).keys()
        assert safemodel.equal_models(back, pipe)


def test_calibration_internals_are_rebuilt_for_an_ensemble_and_string_labels(tmp_path):
    X, y, X_new = _data(3, labels=["cat", "dog", "eel"])
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4, random_state=0)),
                     ("clf", CalibratedClassifierCV(LinearSVC(C=0.1), method="sigmoid", ensemble=True, cv=3))]).fit(X, y)
    back = _round_trip(tmp_path, pipe, ["cat", "dog", "eel"]).payload
    cal = back.named_steps["clf"]
    assert len(cal.calibrated_classifiers_) == 3 and cal.classes_.tolist() == ["cat", "dog", "eel"]
    first = cal.calibrated_classifiers_[0]
    assert type(first.estimator) is LinearSVC and first.estimator.coef_.shape == (3, 4)
    assert [type(c).__name__ for c in first.calibrators] == ["_SigmoidCalibration"] * 3
    assert first.calibrators[0].a_ == pipe.named_steps["clf"].calibrated_classifiers_[0].calibrators[0].a_
    assert np.array_equal(back.predict_proba(X_new), pipe.predict_proba(X_new))
    assert back.predict(X_new).tolist() == pipe.predict(X_new).tolist()


def test_a_model_featx_cannot_store_as_data_needs_pickled_and_then_trust(tmp_path):
    X, y, X_new = _data(2)
    forest = Pipeline([("scale", StandardScaler()), ("clf", RandomForestClassifier(3, random_state=0))]).fit(X, y)
    with pytest.raises(BundleError) as e:
        save_bundle(tmp_path / "f.featx", {"kind": "linear", "classes": ["0", "1"]}, forest)
    assert "\n" not in str(e.value) and "RandomForestClassifier is not one of the types" in str(e.value)
    assert "featx.bundle.Pickled(model)" in str(e.value) and not (tmp_path / "f.featx").exists()
    path = save_bundle(tmp_path / "f.featx", {"kind": "linear", "classes": ["0", "1"]}, Pickled(forest))
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == ["model.joblib"]
    with pytest.raises(BundleError, match=r"--trust-bundle \(trust=True\)"):
        load_bundle(path)
    said = []
    back = load_bundle(path, trust=True, notify=said.append).payload
    assert np.array_equal(back.predict_proba(X_new), forest.predict_proba(X_new))
    assert said == ["warning: f.featx: loading model.joblib, a pickle that can run any code (--trust-bundle was given)"]


@pytest.mark.parametrize("node, why", [
    ({"class": "Popen", "params": {"args": "touch x"}}, "class 'Popen' is not one a bundle may build"),
    ({"class": "StandardScaler", "params": {}, "state": {"transform": 1}}, "attribute 'transform' is not allowed"),
    ({"class": "StandardScaler", "params": {}, "state": {"__class__": 1}}, "attribute '__class__' is not allowed"),
    ({"class": "StandardScaler", "params": {"copy": {"$estimator": {"class": "eval"}}}}, "class 'eval' is not one"),
    ({"class": "StandardScaler", "params": {"evil": 1}}, "unexpected keyword argument 'evil'"),
    ({"class": "StandardScaler", "params": {}, "state": {"mean_": {"$array": "nope"}}}, "array 'nope' is not in"),
])
def test_a_model_description_is_refused_unless_every_part_is_whitelisted(tmp_path, node, why):
    X, y, _ = _data(2)
    path = save_bundle(tmp_path / "m.featx", {"kind": "linear", "classes": ["0", "1"]},
                       make_pipeline_for("logreg").fit(X, y))
    _rewrite_model_json(path, {"safemodel": 1, "model": node})
    with pytest.raises(BundleError) as e:
        load_bundle(path, trust=True)      # trust is about pickles: it does not widen the whitelist
    message = str(e.value)
    assert message.startswith(f"{path / 'model.json'}: not a model this featx builds (") and "\n" not in message
    assert why in message


def test_inconsistent_svm_arrays_are_refused_before_libsvm_reads_them(tmp_path):
    X, y, _ = _data(3)
    path = save_bundle(tmp_path / "s.featx", {"kind": "linear", "classes": ["0", "1", "2"]},
                       make_pipeline_for("rbf-svm").fit(X, y))
    structure = json.loads((path / "model.json").read_text())
    svc = structure["model"]["params"]["steps"][1]["$tuple"][1]["$estimator"]["state"]["calibrated_classifiers_"][0]
    state = svc["$estimator"]["params"]["estimator"]["$estimator"]["state"]
    state["_n_support"] = state["support_"]          # counts that do not add up to the support vectors
    _rewrite_model_json(path, structure)
    with pytest.raises(BundleError, match="support vectors, counts and coefficients do not agree"):
        load_bundle(path)


@pytest.mark.parametrize("edit", ["kernel", "support"])
def test_an_svm_that_would_make_libsvm_read_out_of_bounds_is_refused(tmp_path, edit):
    X, y, _ = _data(3)
    path = save_bundle(tmp_path / "s.featx", {"kind": "linear", "classes": ["0", "1", "2"]},
                       make_pipeline_for("rbf-svm").fit(X, y))
    structure = json.loads((path / "model.json").read_text())
    svc = structure["model"]["params"]["steps"][1]["$tuple"][1]["$estimator"]["state"]["calibrated_classifiers_"][0]
    est = svc["$estimator"]["params"]["estimator"]["$estimator"]
    if edit == "kernel":      # libsvm would index the caller's matrix by the support indices
        est["params"]["kernel"] = "precomputed"
    else:                     # an index past the rows the model was fitted on
        est["state"]["shape_fit_"] = {"$tuple": [1, est["state"]["shape_fit_"]["$tuple"][1]]}
    _rewrite_model_json(path, structure)
    with pytest.raises(BundleError, match="are not what a fitted featx rbf-svm holds"):
        load_bundle(path)


# --------------------------------------------------------------------------
# real bundles: featx train, the old format, a planted pickle


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_split_dataset(root / "data", seed=7000)
    ds = open_dataset(root / "data")
    cache = FeatureCache(root / "cache")
    result = train(ds, "resnet18", "linear-svm", weights="none", grid=[0.01, 1.0], pca=6, jobs=1, cache=cache, **SMALL)
    path = save_bundle(root / "model.featx", result.manifest(ds), result.fit.pipeline)
    return SimpleNamespace(root=root, ds=ds, cache=cache, result=result, path=path,
                           images=sorted(str(s.path) for s in ds.subset("test")))


def _old_format(src: Path, dest: Path, model) -> Path:
    """``src`` as featx wrote bundles before format 2: the same manifest, model.joblib for the model."""
    manifest = json.loads((src / "manifest.json").read_text())
    dest.mkdir()
    joblib.dump(model, dest / "model.joblib", compress=3)
    manifest["featx_bundle"] = 1
    manifest["files"] = {"model.joblib": {"sha256": _sha(dest / "model.joblib"),
                                          "bytes": (dest / "model.joblib").stat().st_size}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_featx_train_bundle_predicts_exactly_what_the_old_pickled_format_did(made, tmp_path):
    r = _cli("train", made.root / "data", *FAST, "-c", "logreg", "--pca", "5", "--cache", made.root / "cache",
             "-o", tmp_path / "cli.featx")
    assert r.exit_code == 0, r.output
    safe = load_bundle(tmp_path / "cli.featx")
    assert safe.manifest["featx_bundle"] == 2 and not (tmp_path / "cli.featx" / "model.joblib").exists()
    samples = made.ds.subset("test")
    for bundle in (safe, load_bundle(made.path)):
        # the old format held the very object featx trained: a pickle of the loaded Pipeline is that
        old = load_bundle(_old_format(bundle.path, tmp_path / f"old-{bundle.name}", bundle.payload), trust=True,
                          notify=lambda m: None)
        new = bundle_probabilities(bundle, samples, cache=made.cache, **SMALL).proba
        assert np.array_equal(new, bundle_probabilities(old, samples, cache=made.cache, **SMALL).proba)
    X = made.cache.read(made.result.spec.key, [s.id for s in samples])
    assert np.array_equal(load_bundle(made.path).payload.predict_proba(X), made.result.fit.pipeline.predict_proba(X))


def test_an_old_bundle_needs_trust_bundle_then_loads_with_a_warning_and_upgrades(made, tmp_path):
    old = _old_format(made.path, tmp_path / "old.featx", made.result.fit.pipeline)
    args = ["predict", old, *made.images[:3], "--format", "json", "-q", "--cache", made.root / "cache"]
    r = _cli(*args)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"Error: {old}: its model is a pickle (model.joblib, a format 1 bundle), which can run any code when loaded; "
        "if you trust where this bundle came from, load it with --trust-bundle (trust=True), and make it safe with "
        "featx.bundle.upgrade_bundle"]
    trusted = _cli(*args, "--trust-bundle")
    assert trusted.exit_code == 0, trusted.output
    assert trusted.stderr.splitlines()[0] == (
        "warning: old.featx: loading model.joblib, a pickle that can run any code (--trust-bundle was given)")
    safe = _cli("predict", made.path, *made.images[:3], "--format", "json", "-q", "--cache", made.root / "cache")
    assert safe.exit_code == 0 and "warning" not in safe.stderr
    assert json.loads(trusted.stdout) == json.loads(safe.stdout)

    with pytest.raises(BundleError, match="--trust-bundle"):
        upgrade_bundle(old)
    assert upgrade_bundle(old, trust=True, notify=lambda m: None) == old
    m = read_manifest(old)
    assert (m["featx_bundle"], sorted(m["files"]), m["upgraded"]["from_format"]) == (
        2, ["model.json", "model.safetensors"], 1)
    assert not (old / "model.joblib").exists() and m["classes"] == made.result.manifest(made.ds)["classes"]
    again = _cli("predict", old, *made.images[:3], "--format", "json", "-q", "--cache", made.root / "cache")
    assert again.exit_code == 0 and json.loads(again.stdout) == json.loads(safe.stdout)


class _Plant:
    """Unpickling this creates ``marker``: the stand-in for any code an attacker wants run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _planted(made, dest: Path, marker: Path, format_version: int) -> Path:
    """A copy of a real bundle whose model is a pickle that plants ``marker``, the manifest's hash updated."""
    shutil.copytree(made.path, dest)
    for name in ("model.json", "model.safetensors"):
        (dest / name).unlink()
    joblib.dump(_Plant(marker), dest / "model.joblib")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["featx_bundle"] = format_version
    manifest["files"] = {"model.joblib": {"sha256": _sha(dest / "model.joblib"),
                                          "bytes": (dest / "model.joblib").stat().st_size}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


@pytest.mark.slow
def test_a_planted_pickle_does_not_run(made, tmp_path):
    marker = tmp_path / "pwned"
    evil = _planted(made, tmp_path / "evil.featx", marker, 1)
    evil2 = _planted(made, tmp_path / "evil2.featx", marker, 2)      # claims the new format, still a pickle
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for bundle, why in ((evil, "a format 1 bundle"), (evil2, "saved as a pickle")):
        for command in (["predict", bundle, made.images[0]], ["evaluate", bundle, made.root / "data"]):
            r = subprocess.run([sys.executable, "-c", "from featx.cli import main; main()", *map(str, command),
                                "--cache", str(made.root / "cache"), "-q"],
                               capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
            assert r.returncode == 1 and r.stdout == ""
            lines = r.stderr.strip().splitlines()
            assert lines == [f"Error: {bundle}: its model is a pickle (model.joblib, {why}), which can run any code "
                             "when loaded; if you trust where this bundle came from, load it with --trust-bundle "
                             "(trust=True), and make it safe with featx.bundle.upgrade_bundle"], r.stderr
            assert not marker.exists()
        with pytest.raises(BundleError, match="--trust-bundle"):
            load_bundle(bundle)
        assert not marker.exists()
    # the payload is live: trusting it does run it (so the checks above could fail)
    load_bundle(evil, trust=True, notify=lambda m: None).payload.close()
    assert marker.exists()


def test_a_planted_pickle_in_a_finetune_bundle_does_not_run(made, tmp_path):
    import torch
    marker = tmp_path / "pwned"
    folder = tmp_path / "ft.featx"
    folder.mkdir()
    torch.save({"fc.weight": _Plant(marker)}, folder / "backbone.pt")
    manifest = {"featx_bundle": 1, "kind": "finetune", "classes": ["a", "b"], "backbone": {"name": "resnet18"},
                "files": {"backbone.pt": {"sha256": _sha(folder / "backbone.pt")}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for trust in (False, True):                 # weights_only: not even trust unpickles code in backbone.pt
        with pytest.raises(BundleError) as e:
            load_bundle(folder, trust=trust)
        assert str(e.value).startswith(f"{folder / 'backbone.pt'}: does not load into resnet18 with 2 classes (")
        assert not marker.exists()
    from featx.finetune import backbone_from_bundle
    with pytest.raises(BundleError):
        backbone_from_bundle(folder)
    assert not marker.exists()


def test_backbone_from_a_linear_bundle_says_so_without_loading_its_pickle(made, tmp_path):
    from featx.finetune import backbone_from_bundle
    marker = tmp_path / "pwned"
    evil = _planted(made, tmp_path / "evil.featx", marker, 1)
    with pytest.raises(BundleError, match=r"a 'linear' bundle keeps its backbone frozen .*extract with --backbone"):
        backbone_from_bundle(evil)
    assert not marker.exists()


def test_the_arrays_file_is_as_readable_as_the_rest_of_the_bundle(tmp_path):
    import os
    X, y, _ = _data(2)
    safemodel.save(make_pipeline_for("logreg", pca=None, seed=3).fit(X, y), tmp_path)
    modes = {f.name: os.stat(f).st_mode & 0o777 for f in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["model.json"], modes   # safetensors alone makes it 0600
