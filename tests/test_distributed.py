"""featx.distributed on a real LocalCluster (2 worker processes, 1 thread each).

Tiny generated images and a seeded random-init resnet18 (no weights, no
network). One cluster serves the module; the model is loaded once per worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402

import featx.distributed as fd  # noqa: E402
from featx.cache import FeatureCache  # noqa: E402
from featx.data import open_dataset  # noqa: E402
from featx.errors import BackboneError, ConfigError, FeatxError  # noqa: E402
from featx.extract import extract, feature_specs, load_features  # noqa: E402

BACKBONE = dict(weights="none", precision="fp32", batch_size=4, seed=0, compile="off")
CLASSES = ("red", "green", "noise")


def _make_images(root, per_class=8, seed=0):
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "green": (30, 180, 40)}
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            if c == "noise":
                arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            else:
                arr = np.clip(np.array(colours[c]) + rng.integers(-20, 21, 3), 0, 255)
                arr = np.broadcast_to(arr.astype(np.uint8), (64, 64, 3)).copy()
                arr[i * 4:i * 4 + 8, :, :] = 255 - arr[i * 4:i * 4 + 8, :, :]   # unique content
            Image.fromarray(arr).save(root / c / f"{c}{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _make_images(tmp_path_factory.mktemp("images") / "shapes")


@pytest.fixture(scope="module")
def dataset(images):
    return open_dataset(images)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """Single-process features of every image, by content id."""
    cache = FeatureCache(tmp_path_factory.mktemp("ref-cache"))
    report = extract(dataset, "resnet18", cache=cache, workers=0, progress=False, **BACKBONE)
    key = report.keys[0]
    ids = cache.ids(key)
    return dict(zip(ids, cache.read(key, ids)))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import dask
    with dask.config.set({"temporary-directory": str(tmp_path_factory.mktemp("dask"))}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, Client(cluster) as c:
        yield c


def _assert_matches(cache, key, reference, ids=None):
    ids = list(reference) if ids is None else ids
    got = cache.read(key, ids)
    want = np.stack([reference[i] for i in ids])
    assert np.allclose(got, want, atol=1e-5), float(np.abs(got - want).max())


# --------------------------------------------------------------------------


def test_same_features_as_single_process_and_a_normal_entry(dataset, reference, client, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    report = fd.extract_dask(dataset, "resnet18", cache=cache, scheduler=client, shard_size=5,
                             progress=False, **BACKBONE)
    key = report.keys[0]
    assert (report.n_images, report.n_extracted, report.n_cached, report.skipped) == (24, 24, 0, [])
    assert report.device == "dask: 2 workers, cpu"
    _assert_matches(cache, key, reference)
    info = cache.info(key)
    assert (info.n, info.dim, info.pending_parts) == (24, 512, 0)
    assert [m["id"] for m in info.manifests] == [dataset.id]
    assert not cache.parts_dir(key).exists()
    X, y, ids = load_features(cache, report.specs[0], dataset, "train")
    assert X.shape == (len(ids), 512) and len(y) == len(ids)
    again = fd.extract_dask(dataset, "resnet18", cache=cache, scheduler=client, progress=False, **BACKBONE)
    assert (again.n_extracted, again.n_cached) == (0, 24)


def test_onnx_runtime_on_the_workers_fills_the_same_entries(dataset, reference, client, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    report = fd.extract_dask(dataset, "resnet18", cache=cache, scheduler=client, shard_size=7, progress=False,
                             runtime="onnx", **BACKBONE)
    assert report.runtime == "onnx" and report.device == "dask: 2 workers, cpu (onnxruntime)"
    assert report.where == report.device
    # the workers keep the export in their per-user folder: a worker started later loads it
    for home in set(client.run(lambda: os.environ["FEATX_HOME"]).values()):
        assert list((Path(home) / "onnx").glob("resnet18-*.onnx"))
    scale = max(float(np.abs(v).max()) for v in reference.values())
    got = cache.read(report.keys[0], list(reference))
    assert np.abs(got - np.stack(list(reference.values()))).max() <= 1e-5 * scale
    with pytest.raises(ConfigError, match="--runtime onnx computes in fp32"):   # on the driver, before any task
        fd.extract_dask(dataset, "resnet18", cache=cache, scheduler=client, progress=False, runtime="onnx",
                        **{**BACKBONE, "precision": "bf16"})


def test_resume_after_a_worker_is_killed_mid_shard(dataset, reference, client, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    pids = client.run(os.getpid)
    # Only the current worker processes sleep before writing a shard; the one
    # the nanny starts in place of the killed worker does not.
    client.run(os.environ.__setitem__, fd.TASK_DELAY_ENV, "2")
    result = {}

    def drive():
        try:
            result["report"] = fd.extract_dask(dataset, "resnet18", cache=cache, scheduler=client,
                                               shard_size=6, progress=False, **BACKBONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            busy = client.run(lambda dask_worker: dask_worker.state.executing_count)
            victim = next((addr for addr, n in busy.items() if n), None)
            time.sleep(0.05)
        assert victim is not None, "no shard started"
        os.kill(pids[victim], signal.SIGKILL)
    finally:
        driver.join(120)
        client.run(os.environ.pop, fd.TASK_DELAY_ENV, None)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert (report.n_extracted, report.n_cached) == (24, 0)
    key = report.keys[0]
    assert cache.info(key).n == 24
    _assert_matches(cache, key, reference)
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()     # it really died


def test_a_failing_shard_ends_the_run_keeps_the_others_and_resumes(images, reference, client, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(images, root)
    bad = root / "green" / "green3.png"
    bad.write_bytes(b"this is not a png")
    ds = open_dataset(root)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(FeatxError) as err:
        fd.extract_dask(ds, "resnet18", cache=cache, scheduler=client, shard_size=4, retries=1,
                        strict=True, progress=False, **BACKBONE)
    shards = fd.make_shards(ds.samples, 4)
    failing = next(s for s in shards if any(x.path == bad for x in s))
    msg = str(err.value)
    assert f"shard {shards.index(failing) + 1}/6 (4 images: {failing[0].path}" in msg
    assert f"{bad}: not an image (unknown format)" in msg and "(2 tries)" in msg
    assert "run the same command again" in msg
    key = feature_specs("resnet18", "none", precision="fp32")[2][0].key
    kept = {x.id for s in shards if s is not failing for x in s}
    assert set(cache.ids(key)) == kept                 # every other shard was merged
    _assert_matches(cache, key, reference, sorted(kept))

    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(bad)   # the fix
    ds = open_dataset(root)
    report = fd.extract_dask(ds, "resnet18", cache=cache, scheduler=client, shard_size=4, strict=True,
                             progress=False, **BACKBONE)
    assert (report.n_extracted, report.n_cached) == (4, 20)
    assert cache.info(key).n == 24
    _assert_matches(cache, key, reference, sorted(kept | {x.id for x in failing if x.path != bad}))


def test_a_set_up_error_stops_the_run_at_once(dataset, client, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(BackboneError, match="--layer nope: no such layer"):
        fd.extract_dask(dataset, "resnet18", layers=["nope"], cache=cache, scheduler=client, shard_size=2,
                        retries=0, progress=False, **BACKBONE)
    assert cache.keys() == []


def test_an_unreachable_scheduler_is_one_clear_line(dataset, tmp_path):
    import dask
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(FeatxError, match=r"--scheduler tcp://127.0.0.1:9: cannot connect .*`dask scheduler`"):
        fd.extract_dask(dataset, "resnet18", cache=tmp_path, scheduler="tcp://127.0.0.1:9", **BACKBONE)


def test_private_local_cluster_is_closed_and_leaves_no_files(dataset, reference, tmp_path, monkeypatch):
    import psutil
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cache = FeatureCache(tmp_path / "cache")
    report = fd.extract_dask(dataset, "resnet18", cache=cache, n_workers=1, shard_size=12, progress=False,
                             **BACKBONE)
    _assert_matches(cache, report.keys[0], reference)
    assert list(scratch.iterdir()) == []
    deadline = time.monotonic() + 10
    while {p.pid for p in psutil.Process().children(recursive=True)} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()


def test_engine_selects_where_extraction_and_search_run(dataset, reference, client, tmp_path):
    from joblib.parallel import get_active_backend
    with fd.engine("local") as run_extract:
        assert run_extract is extract
    with fd.engine("dask", client, shard_size=6) as run_extract:
        assert type(get_active_backend()[0]).__name__ == "DaskDistributedBackend"
        report = run_extract(dataset, "resnet18", cache=tmp_path, progress=False, **BACKBONE)
    assert report.device == "dask: 2 workers, cpu"
    _assert_matches(FeatureCache(tmp_path), report.keys[0], reference)
    with pytest.raises(ConfigError, match="--engine spark: use local or dask"):
        with fd.engine("spark"):
            pass
    with pytest.raises(ConfigError, match="--scheduler tcp://h:8786: needs --engine dask"):
        with fd.engine("local", "tcp://h:8786"):
            pass
    with pytest.raises(ConfigError, match="--shard-size 64: needs --engine dask"):
        with fd.engine("local", shard_size=64):
            pass


def test_missing_dask_gives_one_clear_line(monkeypatch, dataset, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(FeatxError, match=r"the dask engine needs `pip install featx\[dask\]`"):
        fd.extract_dask(dataset, "resnet18", cache=tmp_path, **BACKBONE)
    with pytest.raises(FeatxError, match="featx"):
        with fd.engine("dask"):
            pass


# --------------------------------------------------------------------------
# model search on the joblib 'dask' backend


def test_model_search_on_dask_matches_local(client):
    from distributed import get_task_stream
    from joblib import Parallel, delayed
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    from featx.classify import fit_classifier

    X, y = make_classification(n_samples=90, n_features=12, n_informative=5, n_classes=3, random_state=0)
    grid = [0.001, 0.01, 0.1, 1.0]

    def search():   # n_jobs=None: one process locally, every worker under the dask backend
        # (logreg and linear-svm search batched in torch, in this process; knn goes through joblib)
        fit = fit_classifier("knn", X, y, grid=[1, 3, 5, 7], cv=3, seed=0, probability=False)
        gs = GridSearchCV(LogisticRegression(max_iter=500), {"C": grid}, cv=3).fit(X, y)
        return fit, gs

    local_fit, local_gs = search()
    with fd.dask_joblib_backend(client):
        worker_pids = set(Parallel()(delayed(os.getpid)() for _ in range(8)))
        with get_task_stream(client) as stream:
            dask_fit, dask_gs = search()
    assert worker_pids <= set(client.run(os.getpid).values())      # joblib runs on the cluster
    keys = " ".join(task["key"] for task in stream.data)
    assert "_score_setting" in keys and "_fit_and_score" in keys    # and so do both searches
    assert (dask_fit.chosen, dask_fit.search) == (local_fit.chosen, local_fit.search)
    assert np.array_equal(dask_fit.pipeline.predict(X), local_fit.pipeline.predict(X))
    assert dask_gs.best_params_ == local_gs.best_params_
    assert np.allclose(dask_gs.cv_results_["mean_test_score"], local_gs.cv_results_["mean_test_score"])


def test_cli_compare_on_dask_prints_the_same_table_as_local(images, client, tmp_path):
    """`featx compare --engine dask --scheduler ...`: extraction and the C search on
    the cluster, the same table as the local engine."""
    from click.testing import CliRunner

    from featx.cli import cli
    addr = client.scheduler.address
    common = ["compare", str(images), "-b", "resnet18", "-w", "none", "-c", "logreg", "--C", "0.01",
              "--C", "1", "-q", "--precision", "fp32", "--batch-size", "4"]
    tables = []
    for extra, cache in ((["--engine", "dask", "--scheduler", addr], "dask"), ([], "local")):
        r = CliRunner().invoke(cli, common + extra + ["--cache", str(tmp_path / cache), "-o", str(tmp_path / f"o-{cache}")],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        rows = [line.split() for line in r.stdout.splitlines() if " logreg " in line]
        tables.append([row[:11] for row in rows])  # up to macro-F1: not the fit and extract seconds, notes
    assert tables[0] == tables[1] and len(tables[0]) == 1
    assert tables[0][0][:6] == ["*", "1", "resnet18", "flatten", "512", "logreg"]
