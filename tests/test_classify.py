"""featx.classify on small synthetic features (fast: no images, no network)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from joblib import parallel_config
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import make_blobs, make_classification
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             top_k_accuracy_score)
from sklearn.model_selection import StratifiedKFold, cross_val_score

from featx.classify import (CLASSIFIERS, ComparisonRow, FitResult, evaluate, fit_classifier,
                            fit_sgd_stream, format_table, make_pipeline_for, predict_proba,
                            rank_rows, threshold_predictions, write_table)
from featx.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def blobs():
    """Three well separated classes, train and test drawn from the same blobs."""
    X, y = make_blobs(n_samples=150, n_features=8, centers=3, cluster_std=1.0, random_state=0)
    return X[:90], y[:90], X[90:], y[90:]


@pytest.fixture(scope="module")
def noisy():
    """Overlapping classes with label noise: the parameter matters."""
    X, y = make_classification(n_samples=120, n_features=10, n_informative=4, n_classes=3,
                               n_clusters_per_class=1, flip_y=0.15, class_sep=0.8,
                               random_state=1)
    return X, y


# --------------------------------------------------------------------------
# registry and pipelines


def test_registry_has_the_five_classifiers_with_grids():
    assert set(CLASSIFIERS) == {"logreg", "linear-svm", "sgd", "knn", "rbf-svm"}
    # the linear-probe range: quarter-decades 1e-6..1e5 (searched adaptively)
    assert CLASSIFIERS["logreg"].grid == tuple(float(10.0 ** (e / 4)) for e in range(-24, 21))
    assert len(CLASSIFIERS["linear-svm"].grid) == 45 and max(CLASSIFIERS["linear-svm"].grid) == 1e5
    assert CLASSIFIERS["linear-svm"].param_name == "C"
    assert CLASSIFIERS["sgd"].param_name == "alpha"
    assert CLASSIFIERS["knn"].param_name == "n_neighbors"
    for spec in CLASSIFIERS.values():
        assert spec.default in spec.grid


def test_unknown_classifier_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        make_pipeline_for("svm-rbf")
    for name in CLASSIFIERS:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        fit_classifier("nope", np.zeros((4, 2)), [0, 0, 1, 1])


def test_pipeline_steps_pca_and_params():
    pipe = make_pipeline_for("logreg", {"C": 0.5}, pca=0.9, seed=7)
    assert [n for n, _ in pipe.steps] == ["scale", "pca", "clf"]
    pca = pipe.named_steps["pca"]
    assert (pca.n_components, pca.whiten, pca.random_state) == (0.9, False, 7)
    assert pipe.named_steps["clf"].C == 0.5
    assert [n for n, _ in make_pipeline_for("knn").steps] == ["scale", "clf"]
    svm = make_pipeline_for("linear-svm", {"C": 0.1}).named_steps["clf"]
    assert isinstance(svm, CalibratedClassifierCV) and svm.estimator.C == 0.1
    assert not hasattr(make_pipeline_for("linear-svm", probability=False), "predict_proba")
    with pytest.raises(ConfigError, match="no parameter 'gamma'"):
        make_pipeline_for("logreg", {"gamma": 1})
    for bad in (0, -3, 1.5, 0.0, True, "8"):
        with pytest.raises(ConfigError):
            make_pipeline_for("logreg", pca=bad)


# --------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_every_classifier_recovers_separable_labels(name, blobs):
    X, y, Xt, yt = blobs
    res = fit_classifier(name, X, y, cv=3)
    assert isinstance(res, FitResult)
    assert res.name == name and res.param_name == CLASSIFIERS[name].param_name
    assert res.chosen in CLASSIFIERS[name].grid
    assert res.score_source == "cv3" and res.val_score is None
    assert res.cv_score >= 0.95
    assert np.mean(res.pipeline.predict(Xt) == yt) >= 0.95
    proba = predict_proba(res.pipeline, Xt)
    assert proba.shape == (len(Xt), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert np.mean(proba.argmax(axis=1) == yt) >= 0.95
    # scaler learned from the training rows only
    np.testing.assert_allclose(res.pipeline.named_steps["scale"].mean_, X.mean(axis=0))


def test_cv_choice_is_a_grid_value_and_scores_are_real_cv(noisy):
    X, y = noisy
    grid = [0.001, 0.1, 10.0]
    res = fit_classifier("logreg", X, y, grid=grid, cv=4, seed=3)
    assert [v for v, _ in res.search] == grid
    assert res.chosen in grid and res.score_source == "cv4"
    scores = dict(res.search)
    path = res.path
    best = max(range(len(path.values)), key=lambda i: path.scores[i])
    # within one standard error of the best score, the lowest held-out log-loss wins
    tied = [i for i, s in enumerate(path.scores) if s >= path.scores[best] - path.errors[best] - 1e-12]
    assert res.chosen == path.values[min(tied, key=lambda i: path.losses[i])]
    assert res.cv_score == scores[res.chosen] == res.score
    # each reported score is what sklearn's own CV gives for that C (the batched
    # float32 solver may differ from lbfgs by one held-out image per fold)
    folds = StratifiedKFold(4, shuffle=True, random_state=3)
    fold_rows = min(len(te) for _, te in folds.split(X, y))
    for c, score in res.search:
        expected = cross_val_score(make_pipeline_for("logreg", {"C": c}, seed=3), X, y,
                                   cv=folds).mean()
        assert score == pytest.approx(expected, abs=1.0 / fold_rows + 1e-9)
    assert res.pipeline.named_steps["clf"].C == res.chosen


def test_validation_split_is_used_when_given(noisy):
    X, y = noisy
    # validating on the training rows themselves: only 1-NN is perfect on noisy labels
    res = fit_classifier("knn", X, y, X_val=X, y_val=y)
    assert res.score_source == "val" and res.cv_score is None
    assert res.chosen == 1 and res.val_score == 1.0
    assert all(score < 1.0 for k, score in res.search if k != 1)
    # an honest validation split: reported scores are accuracies on it
    Xtr, ytr, Xv, yv = X[:80], y[:80], X[80:], y[80:]
    res = fit_classifier("logreg", Xtr, ytr, X_val=Xv, y_val=yv, grid=[0.01, 1.0])
    for c, score in res.search:
        pipe = make_pipeline_for("logreg", {"C": c}).fit(Xtr, ytr)
        assert score == pytest.approx(np.mean(pipe.predict(Xv) == yv))
    # final model trained on the training rows only
    np.testing.assert_allclose(res.pipeline.named_steps["scale"].mean_, Xtr.mean(axis=0))


@pytest.mark.parametrize("name", ["sgd", "linear-svm"])
def test_deterministic_under_the_same_seed(name, noisy):
    X, y = noisy
    a = fit_classifier(name, X, y, cv=3, seed=5)
    b = fit_classifier(name, X, y, cv=3, seed=5)
    assert a.search == b.search and a.chosen == b.chosen
    np.testing.assert_array_equal(predict_proba(a.pipeline, X), predict_proba(b.pipeline, X))


def test_parallel_search_matches_sequential(noisy):
    X, y = noisy
    seq = fit_classifier("logreg", X, y, grid=[0.01, 1.0], cv=3, n_jobs=None)
    # threads, not processes: same code path, no seconds of worker start-up
    with parallel_config(backend="threading"):
        par = fit_classifier("logreg", X, y, grid=[0.01, 1.0], cv=3, n_jobs=2)
    assert seq.search == par.search and seq.chosen == par.chosen


def test_single_image_class_skips_search_with_a_note(blobs):
    X, y, Xt, _ = blobs
    keep = np.r_[np.flatnonzero(y == 0)[:10], np.flatnonzero(y == 1)[:10],
                 np.flatnonzero(y == 2)[:1]]
    names = ["cap", "coat", "hat"]
    res = fit_classifier("logreg", X[keep], y[keep], class_names=names)
    assert res.notes == ["class 'hat' has 1 train image: fewer than 2 CV folds possible, "
                         "used C=1.0 without search"]
    assert res.chosen == 1.0 and res.search == [] and res.score_source == "none"
    assert res.score is None
    assert predict_proba(res.pipeline, Xt).shape == (len(Xt), 3)
    # a user grid: its middle value
    res = fit_classifier("knn", X[keep], y[keep], grid=[1, 3, 7], class_names=names)
    assert res.chosen == 3 and "used n_neighbors=3 without search" in res.notes[0]
    # a calibrated SVM still gets probabilities, and says how
    res = fit_classifier("linear-svm", X[keep], y[keep], class_names=names)
    assert any("calibrated on the training rows" in n for n in res.notes)
    proba = predict_proba(res.pipeline, Xt)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


def test_small_class_reduces_the_folds(blobs):
    X, y, _, _ = blobs
    keep = np.r_[np.flatnonzero(y == 0)[:10], np.flatnonzero(y == 1)[:10],
                 np.flatnonzero(y == 2)[:3]]
    res = fit_classifier("logreg", X[keep], y[keep], grid=[0.1, 1.0], cv=5)
    assert res.score_source == "cv3"
    assert res.notes[0] == "class '2' has 3 train images: used 3-fold CV instead of 5-fold"
    assert all("value of the grid" in note for note in res.notes[1:])


def test_bad_inputs_are_config_or_dataset_errors(blobs):
    X, y, _, _ = blobs
    with pytest.raises(DatasetError, match="single class"):
        fit_classifier("logreg", X[y == 0], y[y == 0])
    with pytest.raises(ConfigError, match="grid"):
        fit_classifier("logreg", X, y, grid=[])
    with pytest.raises(ConfigError, match="cv"):
        fit_classifier("logreg", X, y, cv=1)


def test_pca_too_large_is_lowered_with_a_note(blobs):
    X, y, _, _ = blobs
    res = fit_classifier("logreg", X, y, pca=50, grid=[1.0], cv=3)
    assert res.pipeline.named_steps["pca"].n_components_ == 8
    assert any("used pca=8" in n for n in res.notes)


# --------------------------------------------------------------------------
# out of core


def test_fit_sgd_stream_matches_in_memory_fit():
    X, y = make_blobs(n_samples=800, n_features=6, centers=4, cluster_std=1.5, random_state=2)
    X = X * 50 + 100  # unscaled features: the streamed scaler must do its job
    Xtr, ytr, Xte, yte = X[:600], y[:600], X[600:], y[600:]
    calls = []

    def chunks():
        calls.append(1)
        for i in range(0, len(Xtr), 128):
            yield Xtr[i:i + 128], ytr[i:i + 128]

    model = fit_sgd_stream(chunks, classes=np.arange(4), epochs=4, seed=0)
    assert len(calls) == 5  # one pass for the scaler, then one per epoch
    np.testing.assert_allclose(model.named_steps["scale"].mean_, Xtr.mean(axis=0))
    np.testing.assert_allclose(model.named_steps["scale"].scale_, Xtr.std(axis=0))
    streamed = np.mean(model.predict(Xte) == yte)
    in_memory = fit_classifier("sgd", Xtr, ytr, grid=[1e-4]).pipeline
    assert streamed >= 0.9
    assert streamed >= np.mean(in_memory.predict(Xte) == yte) - 0.05
    proba = predict_proba(model, Xte)
    assert proba.shape == (len(Xte), 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    again = fit_sgd_stream(chunks, classes=np.arange(4), epochs=4, seed=0)
    np.testing.assert_array_equal(predict_proba(again, Xte), proba)


def test_fit_sgd_stream_rejects_empty_and_unknown_labels():
    with pytest.raises(ValueError, match="no rows"):
        fit_sgd_stream(lambda: iter(()), classes=[0, 1])
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="not in classes"):
        fit_sgd_stream(lambda: iter([(X, np.array([0, 1, 2, 1]))]), classes=[0, 1])


def test_predict_proba_columns_follow_the_class_list():
    X = np.array([[0.0], [0.1], [5.0], [5.1]])
    pipe = make_pipeline_for("logreg").fit(X, [0, 0, 2, 2])
    proba = predict_proba(pipe, X, classes=3)
    assert proba.shape == (4, 3)
    np.testing.assert_array_equal(proba[:, 1], 0.0)
    np.testing.assert_allclose(proba[:, [0, 2]], pipe.predict_proba(X))
    bare = make_pipeline_for("linear-svm", probability=False).fit(X, [0, 0, 2, 2])
    with pytest.raises(ConfigError, match="probability=True"):
        predict_proba(bare, X)


# --------------------------------------------------------------------------
# evaluation


Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
PROBA = np.array([
    [0.70, 0.10, 0.10, 0.10],
    [0.25, 0.50, 0.15, 0.10],   # 0 -> 1, true class second
    [0.40, 0.30, 0.20, 0.10],
    [0.10, 0.60, 0.20, 0.10],
    [0.10, 0.15, 0.05, 0.70],   # 1 -> 3, true class second
    [0.25, 0.35, 0.30, 0.10],
    [0.05, 0.15, 0.30, 0.50],   # 2 -> 3, true class second
    [0.60, 0.05, 0.25, 0.10],   # 2 -> 0, true class second
    [0.10, 0.20, 0.30, 0.40],
    [0.10, 0.45, 0.15, 0.30],   # 3 -> 1, true class second
])
NAMES = ["ant", "bee", "cat", "dog"]


def test_evaluate_matches_sklearn():
    m = evaluate(Y_TRUE, PROBA, NAMES, top_k=(1, 2, 3, 4, 5))
    pred = PROBA.argmax(axis=1)
    assert m["n"] == 10 and m["n_classes"] == 4 and m["classes"] == NAMES
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, pred)) == 0.5
    assert set(m["top_k_accuracy"]) == {"1", "2", "3"}  # k >= n_classes left out
    assert m["top_k_accuracy"]["1"] == m["accuracy"]
    for k in (2, 3):
        assert m["top_k_accuracy"][str(k)] == pytest.approx(
            top_k_accuracy_score(Y_TRUE, PROBA, k=k, labels=range(4)))
    assert m["top_k_accuracy"]["2"] == 1.0
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(Y_TRUE, pred, average=avg, zero_division=0)
        assert (m[avg]["precision"], m[avg]["recall"], m[avg]["f1"]) == pytest.approx((p, r, f))
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, pred, zero_division=0)
    assert list(m["per_class"]) == NAMES
    for i, name in enumerate(NAMES):
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert row["support"] == s[i]
    assert m["confusion_matrix"] == confusion_matrix(Y_TRUE, pred).tolist()
    assert m["confusion_matrix"][2] == [1, 0, 0, 1]  # rows are the true class
    assert json.loads(json.dumps(m)) == m  # plain JSON types throughout


def test_evaluate_ties_go_to_the_lower_index_like_argmax():
    m = evaluate([0, 2], [[0.4, 0.2, 0.4], [0.3, 0.3, 0.4]], ["a", "b", "c"], top_k=(1, 2))
    assert m["accuracy"] == 1.0 == m["top_k_accuracy"]["1"]
    assert m["top_k_accuracy"]["2"] == 1.0


def test_evaluate_accepts_label_names_and_unpredicted_classes():
    by_name = evaluate([NAMES[i] for i in Y_TRUE], PROBA, NAMES)
    assert by_name == evaluate(Y_TRUE, PROBA, NAMES)
    m = evaluate([0, 1, 2], [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0]], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    with pytest.raises(ValueError):
        evaluate([0, 1], PROBA, NAMES)


def test_threshold_predictions():
    proba = np.array([[0.55, 0.30, 0.15], [0.10, 0.20, 0.70], [0.2, 0.2, 0.6]])
    rows = threshold_predictions(proba, ["a", "b", "c"], threshold=0.6, top_k=2)
    assert rows[0] == {"label": None, "probability": 0.55,
                       "top_k": [("a", 0.55), ("b", 0.30)], "uncertain": True}
    assert rows[1]["label"] == "c" and not rows[1]["uncertain"]
    assert rows[1]["top_k"] == [("c", 0.70), ("b", 0.20)]
    assert rows[2]["label"] == "c"  # exactly at the threshold is certain
    no_threshold = threshold_predictions(proba, ["a", "b", "c"], top_k=10)
    assert [r["label"] for r in no_threshold] == ["a", "c", "c"]
    assert all(len(r["top_k"]) == 3 for r in no_threshold)
    probs = [p for _, p in no_threshold[0]["top_k"]]
    assert probs == sorted(probs, reverse=True)
    with pytest.raises(ConfigError):
        threshold_predictions(proba, ["a", "b", "c"], threshold=1.5)


# --------------------------------------------------------------------------
# comparison table


def _rows():
    return [
        ComparisonRow("resnet18", "avgpool", 512, "knn", "n_neighbors", 5, 0.95, "cv5",
                      test_accuracy=None, fit_seconds=0.1),
        ComparisonRow("resnet18", "avgpool", 512, "logreg", "C", 0.1, 0.90, "cv5",
                      test_accuracy=0.92, macro_f1=0.91, fit_seconds=2.0),
        ComparisonRow("mobilenet_v3", "features", 960, "linear-svm", "C", 0.01, 0.93, "val",
                      test_accuracy=0.92, macro_f1=0.91, fit_seconds=1.0,
                      notes=["did | not converge"]),
        ComparisonRow("mobilenet_v3", "features", 960, "rbf-svm", "C", 10.0, 0.80, "val",
                      test_accuracy=0.92, macro_f1=0.85, fit_seconds=0.5),
        ComparisonRow("resnet18", "layer3", 256, "sgd", "alpha", 1e-4, 0.60, "cv5",
                      test_accuracy=0.70, macro_f1=0.69, fit_seconds=0.2),
    ]


def test_rank_rows_order():
    ranked = rank_rows(_rows())
    # by the val/CV score alone: knn (0.95, no test accuracy) wins over rows with a higher test accuracy
    assert [r.classifier for r in ranked] == ["knn", "linear-svm", "logreg", "rbf-svm", "sgd"]
    assert len(ranked) == 5
    without_test = [ComparisonRow("a", "l", 1, "x", "C", 1.0, s, "cv5") for s in (0.5, 0.9)]
    assert [r.val_or_cv_score for r in rank_rows(without_test)] == [0.9, 0.5]


def test_format_table_marks_the_winner():
    lines = format_table(_rows()).splitlines()
    assert len(lines) == 2 + 5 + 1
    assert lines[2].startswith("*") and "knn" in lines[2]
    assert sum(line.startswith("*  ") for line in lines) == 1
    assert "C=0.01" in lines[3] and "0.9300 (val)" in lines[3]
    assert [line[:4] for line in lines[2:7]] == ["*  1", "   2", "   3", "   4", "   5"]
    assert lines[-1] == ("* winner chosen by each row's val or CV accuracy (ties: lower held-out log-loss, "
                         "then the simpler model); test accuracy is shown, never used to choose")


def test_write_table_csv_and_markdown(tmp_path):
    csv_path, md_path = tmp_path / "cmp.csv", tmp_path / "cmp.md"
    write_table(_rows(), csv_path, md_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["classifier"] for r in rows] == ["knn", "linear-svm", "logreg", "rbf-svm", "sgd"]
    assert [r["winner"] for r in rows] == ["*", "", "", "", ""]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert float(rows[1]["chosen"]) == 0.01 and float(rows[1]["test_accuracy"]) == 0.92
    assert rows[1]["notes"] == "did | not converge"
    assert rows[0]["test_accuracy"] == "" and rows[0]["macro_f1"] == ""
    md = md_path.read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 5
    assert table[2].startswith("| * | 1 | resnet18 |") and "knn" in table[2]
    assert not any(line.startswith("| * ") for line in table[3:])
    assert "did \\| not converge" in table[3]  # a pipe in a note does not split the cell
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[3:4])
    assert not list(tmp_path.glob(".*.tmp"))


def test_comparison_row_from_fit(blobs):
    X, y, Xt, yt = blobs
    res = fit_classifier("logreg", X, y, grid=[1.0], cv=3)
    metrics = evaluate(yt, predict_proba(res.pipeline, Xt), ["a", "b", "c"])
    row = ComparisonRow.from_fit(res, backbone="resnet18", layer="avgpool", dims=8,
                                 test_metrics=metrics, extract_seconds=3.0)
    assert (row.classifier, row.param_name, row.chosen) == ("logreg", "C", 1.0)
    assert row.val_or_cv_score == res.cv_score and row.score_source == "cv3"
    assert row.test_accuracy == metrics["accuracy"] and row.macro_f1 == metrics["macro"]["f1"]
