"""Model bundles: round trip, manifest, atomic replacement, kinds, weights checks; streamed SGD."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from featx.backbones import resolve_weights
from featx.bundle import (KINDS, Bundle, BundleError, BundleKind, Predictions, bundle_probabilities, check_weights,
                          linear_manifest, load_bundle, save_bundle)
from featx.cache import FeatureCache
from featx.classify import FitResult, predict_proba
from featx.data import open_dataset
from featx.errors import ConfigError, DatasetError, WeightsError
from featx.evaluate import check_classes
from featx.extract import feature_specs
from featx.train import fit_on_cache, parse_grid, parse_layers, split_features, train

from .conftest import make_split_dataset

SMALL = dict(batch_size=8, workers=0, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    make_split_dataset(root / "data", seed=5000)
    ds = open_dataset(root / "data")
    cache = FeatureCache(root / "cache")
    result = train(ds, "resnet18", "logreg", weights="none", grid=[0.01, 1.0], jobs=1, cache=cache, **SMALL)
    path = save_bundle(root / "model.featx", result.manifest(ds), result.fit.pipeline)
    return SimpleNamespace(root=root, ds=ds, cache=cache, result=result, path=path)


def test_round_trip_predicts_identical_probabilities_from_cached_features(trained):
    test = trained.ds.subset("test")
    X = trained.cache.read(trained.result.spec.key, [s.id for s in test])
    before = predict_proba(trained.result.fit.pipeline, X, classes=3)
    bundle = load_bundle(trained.path)
    pred = bundle_probabilities(bundle, test, cache=trained.cache, **SMALL)
    assert np.array_equal(pred.proba, before)
    assert (pred.extracted, pred.cached) == (0, 9) and pred.errors == [None] * 9
    assert bundle.classes == ["blue", "green", "red"] and bundle.warnings == []


def test_manifest_says_what_the_model_is_made_of(trained):
    m = json.loads((trained.path / "manifest.json").read_text())
    spec = trained.result.spec
    assert (m["featx_bundle"], m["kind"]) == (2, "linear")
    assert m["backbone"] == {
        "name": "resnet18", "weights_spec": "none", "weights_kind": "none", "weights_name": "none",
        "weights_identity": "none:seed=0", "weights_sha256": None, "weights_path": None, "seed": 0,
        "layer": "flatten", "pool": "avg", "precision": spec.precision, "storage": "float32",
        "preprocess": spec.preprocess}
    assert m["features"] == {"spec": spec.canonical(), "key": spec.key, "dims": 512}
    c = m["classifier"]
    assert (c["name"], c["param_name"], c["score_source"], c["pca"], c["probability"]) == (
        "logreg", "C", "val", None, "native")
    assert [v for v, _ in c["search"]] == [0.01, 1.0] and c["chosen"] in (0.01, 1.0)
    t = m["training"]
    assert (t["dataset"], t["dataset_id"], t["counts"]["val"]) == ("data", trained.ds.id, {"blue": 2, "green": 2, "red": 2})
    assert t["test_accuracy"] == trained.result.test["accuracy"]
    assert {"featx", "scikit-learn", "torch", "numpy", "onnxruntime"} <= set(m["versions"]) and m["created"]
    assert sorted(m["files"]) == ["model.json", "model.safetensors"]      # no pickle
    for name in m["files"]:
        payload = (trained.path / name).read_bytes()
        assert m["files"][name] == {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    assert not (trained.path / "model.joblib").exists()


def _constant_kind(name="constant", fail=False):
    def save(payload, folder):
        if fail:
            raise RuntimeError("disk full")
        (folder / "table.json").write_text(json.dumps(payload))

    def load(folder, manifest):
        return json.loads((folder / "table.json").read_text())

    def probabilities(bundle, samples, **options):
        return Predictions(np.tile(np.array(bundle.payload, float), (len(samples), 1)), [None] * len(samples))
    return BundleKind(name, ("table.json",), save, load, probabilities)


CONSTANT = _constant_kind()


def test_a_new_kind_plugs_in_and_dispatch_goes_through_it(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "constant", "tests.test_bundle:CONSTANT")   # imported on first use
    path = save_bundle(tmp_path / "c.featx", {"kind": "constant", "classes": ["a", "b"]}, [0.25, 0.75])
    bundle = load_bundle(path)
    assert bundle.kind == "constant" and bundle.payload == [0.25, 0.75]
    pred = bundle_probabilities(bundle, ["x", "y"])
    assert pred.proba.tolist() == [[0.25, 0.75], [0.25, 0.75]]


def test_an_existing_bundle_is_replaced_only_by_a_complete_one(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "constant", _constant_kind())
    monkeypatch.setitem(KINDS, "broken", _constant_kind("broken", fail=True))
    path = save_bundle(tmp_path / "m.featx", {"kind": "constant", "classes": ["a", "b"]}, [0.5, 0.5])
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(path, {"kind": "broken", "classes": ["a", "b"]}, [1, 0])
    assert load_bundle(path).kind == "constant"
    save_bundle(path, {"kind": "constant", "classes": ["a", "b"]}, [0.1, 0.9])
    assert load_bundle(path).payload == [0.1, 0.9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.featx"]       # no temporaries left
    (tmp_path / "notes").mkdir()
    with pytest.raises(BundleError) as e:
        save_bundle(tmp_path / "notes", {"kind": "constant", "classes": []}, [])
    assert str(e.value) == f"{tmp_path / 'notes'}: exists and is not a featx bundle; choose another --out"


def test_load_errors_are_one_line(trained, tmp_path):
    def message(path):
        with pytest.raises(BundleError) as e:
            load_bundle(path)
        return str(e.value)

    assert message(tmp_path / "none.featx") == (
        f"{tmp_path / 'none.featx'}: no such model bundle (make one with `featx train ... --out none.featx`)")
    (tmp_path / "file.featx").write_text("x")
    assert message(tmp_path / "file.featx") == (
        f"{tmp_path / 'file.featx'}: not a featx model bundle (no manifest.json; make one with `featx train`)")
    copy = tmp_path / "copy.featx"
    copy.mkdir()
    (copy / "manifest.json").write_text('{"kind": "linear"}')
    assert message(copy) == f"{copy}: not a featx model bundle (manifest.json has no 'featx_bundle' version)"
    (copy / "manifest.json").write_text('{"featx_bundle": "one", "kind": "linear"}')
    assert message(copy) == f"{copy}: bundle format 'one' is unknown to featx 0.1.0, which reads formats 1 and 2"
    (copy / "manifest.json").write_text('{"featx_bundle": 1, "kind": "linear"}')
    assert message(copy) == f"{copy}: incomplete bundle, model.joblib is missing"
    (copy / "model.joblib").write_bytes(b"not a pickle")
    with pytest.raises(BundleError) as e:
        load_bundle(copy, trust=True, notify=lambda m: None)
    assert str(e.value).startswith(f"{copy / 'model.joblib'}: cannot be loaded (")
    (copy / "manifest.json").write_text('{"featx_bundle": 2, "kind": "linear"}')
    assert message(copy) == f"{copy}: incomplete bundle, model.json is missing"
    (copy / "model.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(b"not safetensors")
    assert message(copy).startswith(f"{copy}: model.json/model.safetensors cannot be loaded (")


def _file_bundle(tmp_path, weights_file):
    """A bundle manifest made with a weights file (check_weights only hashes it)."""
    rw = resolve_weights("resnet18", str(weights_file))
    _, _, (spec,) = feature_specs("resnet18", str(weights_file))
    fit = FitResult(None, "logreg", "C", 1.0, [], "none", None, None, 0.0)
    manifest = linear_manifest(classes=["a", "b"], spec=spec, weights_spec=str(weights_file), resolved=rw,
                               seed=0, dims=512, fit=fit, pca=None)
    return Bundle(tmp_path / "w.featx", manifest, None)


def test_weights_other_than_the_bundles_fail_naming_both_hashes(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights one")
    one = hashlib.sha256(b"weights one").hexdigest()
    bundle = _file_bundle(tmp_path, weights)
    assert bundle.backbone["weights_sha256"] == one
    assert check_weights(bundle).identity == f"file:{one}"
    moved = tmp_path / "moved.pth"
    moved.write_bytes(b"weights one")
    assert check_weights(bundle, str(moved)).path == moved.resolve()

    weights.write_bytes(b"weights two")
    two = hashlib.sha256(b"weights two").hexdigest()
    with pytest.raises(WeightsError) as e:
        check_weights(bundle)
    assert str(e.value) == (f"{bundle.path}: made with resnet18 weights file with sha256 {one[:16]}, but the weights "
                            f"here are weights file with sha256 {two[:16]}; give the original weights with "
                            "--weights FILE or train again")
    weights.unlink()
    with pytest.raises(WeightsError) as e:
        check_weights(bundle)
    assert str(e.value) == (f"{bundle.path}: made with resnet18 weights file with sha256 {one[:16]}, not available "
                            f"here: --weights {weights}: no such file; give them with --weights FILE")


def test_dataset_classes_are_checked_against_the_bundles(trained):
    bundle = load_bundle(trained.path)
    assert check_classes(bundle, SimpleNamespace(classes=["blue", "red"], root=Path("d"))) == [
        "the dataset has no images of green (the model knows 3 classes)"]
    with pytest.raises(DatasetError) as e:
        check_classes(bundle, SimpleNamespace(classes=["blue", "cyan"], root=Path("d")))
    assert str(e.value) == ("d: classes differ from the model's: the dataset has blue, cyan; "
                            "model.featx knows blue, green, red")


def test_sgd_streams_mixed_chunks_and_never_reads_all_rows(trained, monkeypatch):
    spec = trained.result.spec
    data = split_features(trained.cache, spec, trained.ds)
    reads = []
    original = FeatureCache.read

    def read(self, key, ids):
        reads.append(list(ids))
        return original(self, key, ids)
    monkeypatch.setattr(FeatureCache, "read", read)
    fit = fit_on_cache("sgd", trained.cache, spec, data, classes=trained.ds.classes, seed=0, rows_per_chunk=4)
    assert max(len(r) for r in reads) == 4
    label = {s.id: s.label for s in trained.ds.samples}
    train_ids = set(data["train"].ids)
    train_chunks = [r for r in reads if set(r) <= train_ids]
    assert any(len({label[i] for i in r}) > 1 for r in train_chunks)              # chunks mix classes
    firsts = {tuple(r) for r in train_chunks[::5]}
    assert len(firsts) > 1                                                          # order changes per pass
    assert (fit.name, fit.param_name, fit.score_source, len(fit.search)) == ("sgd", "alpha", "val", 7)
    monkeypatch.undo()
    X = trained.cache.read(spec.key, data["test"].ids)
    assert np.mean(fit.pipeline.predict(X) == data["test"].y) == 1.0
    with pytest.raises(ConfigError) as e:
        fit_on_cache("sgd", trained.cache, spec, data, classes=trained.ds.classes, pca=8)
    assert str(e.value) == "--pca does not apply to --classifier sgd (it streams features, PCA needs them all)"


def test_layer_and_grid_options():
    assert parse_layers(["resnet18", "vgg16"], []) == {"resnet18": None, "vgg16": None}
    assert parse_layers(["resnet18", "vgg16"], ["flatten", "vgg16:classifier.1", "flatten"]) == {
        "resnet18": ["flatten"], "vgg16": ["flatten", "classifier.1"]}
    with pytest.raises(ConfigError, match=r"^--layer vgg16: names no layer \(use BACKBONE:LAYER\)$"):
        parse_layers(["vgg16"], ["vgg16:"])
    assert parse_grid("logreg", ["0.1,1", "10"]) == [0.1, 1.0, 10.0]
    assert parse_grid("knn", ["3,5"]) == [3, 5] and parse_grid("logreg", []) is None
    with pytest.raises(ConfigError, match=r"^--C -1: C must be positive$"):
        parse_grid("linear-svm", ["-1"])
    with pytest.raises(ConfigError, match=r"^--C 2.5: knn tunes n_neighbors, give whole numbers$"):
        parse_grid("knn", ["2.5"])


def test_onnx_runtime_refuses_a_bundle_of_reduced_precision_features(trained, tmp_path):
    import dataclasses
    manifest = trained.result.manifest(trained.ds)
    spec = dataclasses.replace(trained.result.spec.parts[0], precision="bf16")   # as if trained with --precision bf16
    manifest["features"] = {**manifest["features"], "spec": spec.canonical(), "key": spec.key}
    bundle = load_bundle(save_bundle(tmp_path / "bf16.featx", manifest, trained.result.fit.pipeline))
    samples = trained.ds.subset("test")
    with pytest.raises(ConfigError, match=r"^--runtime onnx computes in fp32, and bf16.featx was trained on bf16 "
                                          r"features: use --runtime torch \(or auto\)$"):
        bundle_probabilities(bundle, samples, cache=trained.cache, runtime="onnx", **SMALL)
