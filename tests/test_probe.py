"""Linear probes: selection that never sees test, near-ties to the better loss, edge notes,
whole-row fit times, fused feature sets end to end, and one fit store for compare and run."""

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import make_blobs

from featx.cache import FeatureCache
from featx.classify import (ComparisonRow, fit_classifier, format_table, predict_proba, rank_rows,
                            threshold_predictions)
from featx.cli import cli
from featx.data import open_dataset
from featx.errors import ConfigError
from featx.probe import search_linear
from featx.train import FeatureSet, parse_features, read_features, split_features

from .conftest import make_split_dataset

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "8", "-q", "-j", "1"]


# --------------------------------------------------------------------------
# selection


def test_the_winner_is_the_best_val_score_even_when_another_row_tests_higher():
    rows = [ComparisonRow("resnet18", "flatten", 512, "logreg", "C", 0.1, 0.80, "val", test_accuracy=0.99),
            ComparisonRow("resnet18", "layer3", 256, "logreg", "C", 0.1, 0.90, "val", test_accuracy=0.70),
            ComparisonRow("resnet18", "layer2", 128, "knn", "n_neighbors", 5, 0.85, "val", test_accuracy=0.95)]
    assert [r.layer for r in rank_rows(rows)] == ["layer3", "layer2", "flatten"]
    table = format_table(rows).splitlines()
    assert table[2].startswith("*") and "layer3" in table[2]
    assert table[-1].startswith("* winner chosen by val accuracy")


def test_equal_scores_go_to_the_lower_loss_then_the_simpler_model():
    rows = [ComparisonRow("r", "a", 512, "linear-svm", "C", 1.0, 0.9, "cv5", val_loss=0.2),
            ComparisonRow("r", "b", 512, "logreg", "C", 1.0, 0.9, "cv5", val_loss=0.5),
            ComparisonRow("r", "c", 2048, "logreg", "C", 1.0, 0.9, "cv5"),
            ComparisonRow("r", "d", 256, "logreg", "C", 1.0, 0.9, "cv5")]
    # only logreg's log-loss ranks (the svm's squared hinge is another scale); then fewer dims
    assert [r.layer for r in rank_rows(rows)] == ["b", "d", "a", "c"]


def test_near_tie_goes_to_the_better_log_loss_and_probabilities_are_usable():
    # well separated: many C reach 100% on val; the flattest model (smallest C) must not win
    X, y = make_blobs(300, n_features=20, centers=3, cluster_std=1.0, random_state=0)
    Xtr, ytr, Xv, yv, Xt, yt = X[:150], y[:150], X[150:200], y[150:200], X[200:], y[200:]
    res = fit_classifier("logreg", Xtr, ytr, X_val=Xv, y_val=yv)
    path = res.path
    tied = [i for i, s in enumerate(path.scores) if s >= max(path.scores) - path.errors[int(np.argmax(path.scores))]]
    assert len(tied) > 1
    assert res.chosen == path.values[min(tied, key=lambda i: path.losses[i])] != min(path.values[i] for i in tied)
    proba = predict_proba(res.pipeline, Xt)
    assert np.mean(proba.argmax(1) == yt) >= 0.95
    rows = threshold_predictions(proba, ["a", "b", "c"], threshold=0.6)
    assert np.mean([r["uncertain"] for r in rows]) < 0.2


def test_a_choice_on_the_edge_of_the_grid_is_noted():
    X, y = make_blobs(120, n_features=10, centers=2, cluster_std=4.0, random_state=1)
    res = fit_classifier("logreg", X, y, grid=[1e-6, 1e-5], cv=3)
    assert any("value of the grid: the best may lie beyond it" in note for note in res.notes)
    inside = fit_classifier("logreg", X, y, cv=3)
    assert not any("value of the grid" in note for note in inside.notes)
    assert 1e-6 < inside.chosen < 1e5


def test_the_batched_search_scores_what_scikit_learn_would():
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from featx.classify import make_pipeline_for
    X, y = make_blobs(200, n_features=30, centers=4, cluster_std=6.0, random_state=2)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(X, y))
    for kind in ("logreg", "linear-svm"):
        r = search_linear(kind, X, y, splits=folds, values=[1e-3, 1e-2, 1e-1])
        for c, score in r.table():
            pipe = make_pipeline_for(kind, {"C": c}, probability=False)
            expected = cross_val_score(pipe, X, y, cv=folds).mean()
            assert score == pytest.approx(expected, abs=1 / 50 + 1e-9), (kind, c)


def test_fit_seconds_is_the_whole_row():
    X, y = make_blobs(150, n_features=16, centers=3, cluster_std=5.0, random_state=3)
    for name in ("logreg", "linear-svm", "knn"):
        res = fit_classifier(name, X, y, cv=3)
        row = ComparisonRow.from_fit(res, backbone="b", layer="l", dims=16)
        assert row.fit_seconds >= res.search_seconds + res.fit_seconds - 1e-9
        assert row.fit_seconds >= row.search_seconds > 0


def test_refit_on_train_and_val():
    X, y = make_blobs(120, n_features=8, centers=2, random_state=4)
    a = fit_classifier("logreg", X[:80], y[:80], X_val=X[80:], y_val=y[80:], grid=[0.1], final_fit="train+val")
    b = fit_classifier("logreg", X[:80], y[:80], X_val=X[80:], y_val=y[80:], grid=[0.1], final_fit="train")
    assert a.fit_on == ("train", "val") and b.fit_on == ("train",)
    np.testing.assert_allclose(a.pipeline.named_steps["scale"].mean_, X.mean(0))
    with pytest.raises(ConfigError):
        fit_classifier("logreg", X, y, final_fit="everything")


# --------------------------------------------------------------------------
# fusion


def test_parse_features_and_bad_fusions():
    # a backbone no plain --layer names keeps its default layer, as the baseline of the fusion
    assert parse_features(["resnet18"], ["flatten+layer3"]) == [
        (("resnet18", None),), (("resnet18", "flatten"), ("resnet18", "layer3"))]
    for bad, words in (("flatten++layer3", "an empty part"), ("flatten+", "an empty part"),
                       ("vgg16:features.3+flatten", "vgg16 is not one of the --backbone values"),
                       ("resnet18:+layer3", "names no layer")):
        with pytest.raises(ConfigError) as err:
            parse_features(["resnet18"], [bad])
        assert str(err.value).startswith(f"--layer {bad}") and words in str(err.value)
    with pytest.raises(ConfigError, match="write BACKBONE:LAYER for every part"):
        parse_features(["resnet18", "squeezenet1_1"], ["resnet18:flatten+features.12"])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = root / "colours"
    make_split_dataset(data, file_name="{name}{i}.jpg")
    return {"root": root, "data": data, "cache": root / "cache"}


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_fused_features_are_the_parts_side_by_side(work):
    r = _run("compare", work["data"], *FAST, "-l", "layer3", "-l", "flatten", "-l", "layer3+flatten",
             "-c", "logreg", "--cache", work["cache"], "-o", work["root"] / "cmp")
    assert r.exit_code == 0, r.output
    with open(work["root"] / "cmp" / "compare.csv") as f:
        rows = {row["layer"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"layer3", "flatten", "layer3+flatten"}
    assert int(rows["layer3+flatten"]["dims"]) == int(rows["layer3"]["dims"]) + int(rows["flatten"]["dims"])
    cache = FeatureCache(work["cache"])
    ds = open_dataset(work["data"], hash_index=cache.hash_index)
    from featx.extract import feature_specs
    _, _, specs = feature_specs("resnet18", "none", ["layer3", "flatten"])
    fset = FeatureSet(tuple(specs))
    ids = split_features(cache, fset, ds)["train"].ids
    X = read_features(cache, fset, ids)
    np.testing.assert_array_equal(X, np.concatenate([cache.read(specs[0].key, ids), cache.read(specs[1].key, ids)], 1))


def test_a_fused_bundle_predicts_and_extracts_the_part_not_yet_cached(work, tmp_path):
    model = tmp_path / "fused.featx"
    r = _run("train", work["data"], *FAST, "-l", "flatten+layer2", "--cache", work["cache"], "-o", model)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1].startswith("features: resnet18 flatten+layer2, ")
    manifest = json.loads((model / "manifest.json").read_text())
    assert [p["backbone"]["layer"] for p in manifest["parts"]] == ["flatten", "layer2"]
    images = sorted((work["data"] / "test").rglob("*.jpg"))
    # a fresh cache: predict must extract both parts
    fresh = tmp_path / "fresh-cache"
    r = _run("predict", model, *images, "--cache", fresh, "-q", "--format", "json")
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    # only layer2 removed: predict extracts that part again and gives the same answers
    cache = FeatureCache(fresh)
    layer2 = next(k for k in cache.keys() if "-layer2-" in k)
    cache.remove(layer2)
    r = _run("predict", model, *images, "--cache", fresh, "-q", "--format", "json")
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert [g["label"] for g in again] == [g["label"] for g in first]
    assert [g["probability"] for g in again] == pytest.approx([g["probability"] for g in first])
    assert layer2 in FeatureCache(fresh).keys()
    truth = [p.parent.name for p in images]
    assert np.mean([g["label"] == t for g, t in zip(again, truth)]) >= 0.8


def test_a_part_missing_an_image_names_the_image_and_the_part(work, tmp_path):
    from featx.errors import CacheError
    data = tmp_path / "data"
    shutil.copytree(work["data"], data)
    cache = FeatureCache(tmp_path / "cache")
    ds = open_dataset(data, hash_index=cache.hash_index)
    from featx.extract import extract
    extract(ds, "resnet18", weights="none", layers=["flatten"], cache=cache, progress=False)
    target = ds.subset("train")[0]
    extract([x for x in ds.samples if x.id != target.id], "resnet18", weights="none", layers=["layer3"],
            cache=cache, progress=False)
    from featx.extract import feature_specs
    _, _, specs = feature_specs("resnet18", "none", ["flatten", "layer3"])
    with pytest.raises(CacheError) as err:
        split_features(cache, FeatureSet(tuple(specs)), ds)
    assert str(err.value).startswith(f"{target.path}: ") and specs[1].key in str(err.value)


# --------------------------------------------------------------------------
# one store of fits


def test_compare_and_run_share_a_cached_fit(work, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(work["cache"], cache)
    r = _run("compare", work["data"], *FAST, "-l", "flatten", "-c", "logreg", "--cache", cache, "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"""
[dataset]
path = "{work['data']}"
[[backbones]]
name = "resnet18"
weights = "none"
layers = ["flatten"]
[classifiers]
names = ["logreg"]
[engine]
jobs = 1
[output]
dir = "{tmp_path / 'out'}"
cache = "{cache}"
""")
    import importlib
    train_module = importlib.import_module("featx.train")
    calls = []
    real = train_module.fit_on_cache
    monkeypatch.setattr(train_module, "fit_on_cache", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    r = _run("run", pipeline)
    assert r.exit_code == 0, r.output
    assert calls == [], "run fitted again what compare had fitted"
    assert "reused an identical fit from the fit store" in r.stderr
    # and the other way: a fit made by run is reused by compare
    pipeline.write_text(pipeline.read_text().replace('names = ["logreg"]', 'names = ["logreg", "linear-svm"]'))
    r = _run("run", pipeline, "-q")
    assert r.exit_code == 0, r.output
    assert calls == ["linear-svm"]
    r = _run("compare", work["data"], *FAST, "-l", "flatten", "-c", "linear-svm", "--cache", cache,
             "-o", tmp_path / "c2")
    assert r.exit_code == 0, r.output
    assert calls == ["linear-svm"] and "reused 1 of 1 results" in r.stdout


def test_pipeline_fusion_key(work, tmp_path):
    pipeline = tmp_path / "p.toml"
    text = f"""
[dataset]
path = "{work['data']}"
[[backbones]]
name = "resnet18"
weights = "none"
layers = ["flatten", "layer3"]
[classifiers]
names = ["logreg"]
features = ["FUSION"]
[engine]
jobs = 1
[output]
dir = "{tmp_path / 'out'}"
cache = "{work['cache']}"
"""
    pipeline.write_text(text.replace("FUSION", "flatten+layer3"))
    r = _run("run", pipeline)
    assert r.exit_code == 0, r.output
    assert "[train 3/3] resnet18 flatten+layer3 logreg: C=" in r.stderr
    for bad, words in (("flatten+layer2", 'does not extract "layer2"'), ("flatten++layer3", "no empty part"),
                       ("vgg16:features.3+flatten", "vgg16 is not one of the [[backbones]]")):
        pipeline.write_text(text.replace("FUSION", bad))
        r = _run("run", pipeline, "--dry-run")
        assert r.exit_code != 0 and "classifiers.features[0]" in r.output and words in r.output, r.output


def test_the_batched_final_fit_matches_scikit_learns_own():
    from featx.classify import make_pipeline_for
    X, y = make_blobs(240, n_features=24, centers=3, cluster_std=7.0, random_state=5)
    for name in ("logreg", "linear-svm"):
        res = fit_classifier(name, X[:160], y[:160], X_val=X[160:200], y_val=y[160:200], grid=[0.01], final_fit="train")
        ref = make_pipeline_for(name, {"C": 0.01}, seed=0)
        if name == "linear-svm":
            ref.set_params(clf__cv=res.pipeline.named_steps["clf"].cv)
        ref.fit(X[:160], y[:160])
        a, b = predict_proba(res.pipeline, X[200:]), predict_proba(ref, X[200:])
        assert np.abs(a - b).max() < 0.02, name
        assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.95, name


def test_a_val_class_the_train_split_lacks_counts_as_wrong_not_a_crash():
    X, y = make_blobs(160, n_features=10, centers=4, cluster_std=1.0, random_state=6)
    tr, va = np.flatnonzero(y != 3)[:90], np.arange(120, 160)
    assert 3 in y[va] and 3 not in y[tr]
    res = fit_classifier("logreg", X[tr], y[tr], X_val=X[va], y_val=y[va], final_fit="train")
    share_unseen = np.mean(y[va] == 3)
    assert res.val_score <= 1 - share_unseen + 1e-6          # the unseen class's rows are errors
    assert res.val_score >= 1 - share_unseen - 0.1


def test_a_held_out_val_split_never_chooses_nor_trains(work, tmp_path):
    # train/ + validation/ with --test-fraction 0: val is the only held-out split
    data = tmp_path / "tv"
    for split in ("train", "validation"):
        shutil.copytree(work["data"] / split, data / split)
    model = tmp_path / "tv.featx"
    r = _run("train", data, *FAST, "--test-fraction", "0", "--cache", work["cache"], "-o", model)
    assert r.exit_code == 0, r.output
    assert "by 3-fold CV" in r.stdout or "by 5-fold CV" in r.stdout
    assert "note: val is the held-out split: chosen by CV on train, fitted on train" in r.stdout
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["classifier"]["fit_on"] == ["train"] and manifest["classifier"]["score_source"].startswith("cv")


def test_weights_given_at_predict_time_serve_every_part_made_with_them(work, tmp_path):
    import torch
    import torchvision
    torch.manual_seed(0)
    pth = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), pth)
    model = tmp_path / "wf.featx"
    args = ["-b", "resnet18", "-w", pth, "--batch-size", "8", "-q", "-j", "1"]
    r = _run("train", work["data"], *args, "-l", "flatten+layer3", "--cache", tmp_path / "c", "-o", model)
    assert r.exit_code == 0, r.output
    moved = tmp_path / "moved.pth"
    pth.rename(moved)
    images = sorted((work["data"] / "test").rglob("*.jpg"))[:2]
    r = _run("predict", model, *images, "-w", moved, "--cache", tmp_path / "c", "-q", "--format", "json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2


def test_train_reads_unnamed_fusion_parts_as_the_backbone_given():
    from featx.train import _train_request
    assert _train_request("resnet18", "flatten+resnet50:layer3") == (("resnet18", "flatten"), ("resnet50", "layer3"))
