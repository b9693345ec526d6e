"""Trust in the feature cache: checksums, damage, read-only caches, a full disk.

Entries are made by the real extract path (resnet18, weights="none", tiny
generated images) and then damaged the way a disk or a person damages them.
Process-level failures (a full disk, a read-only mount, exit codes) run the
real ``featx`` command in a subprocess."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid

import h5py
import numpy as np
import pytest

from featx.cache import FeatureCache, FeatureSpec, write_manifest_group, write_part_file
from featx.data import open_dataset
from featx.errors import CacheError
from featx.extract import extract, feature_specs, load_features

from .conftest import COLOURS, make_image

SMALL = dict(backbone="resnet18", weights="none", precision="fp32", batch_size=8, workers=0, progress=False)
FEATX = [sys.executable, "-c", "from featx.cli import main; main()"]
CLI_SMALL = ["--backbone", "resnet18", "--weights", "none", "--precision", "fp32", "--workers", "0", "-q"]


def _images(root, n, seed=2000):
    for i in range(n):
        name = list(COLOURS)[i % 3]
        make_image(root / name / f"{i}.png", COLOURS[name], seed=seed + i)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A dataset of 60 images and a cache entry for it, made once; tests copy it."""
    base = tmp_path_factory.mktemp("integrity")
    data = _images(base / "data", 60)
    rep = extract(open_dataset(data), cache=base / "cache", **SMALL)
    return data, base / "cache", rep.keys[0], rep.specs[0]


@pytest.fixture
def entry(made, tmp_path):
    data, cache, key, spec = made
    shutil.copytree(cache, tmp_path / "cache")
    return data, tmp_path / "cache", key, spec


def _zero(path, offset, count):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)


def _featx(*args, env=None, timeout=300):
    return subprocess.run(FEATX + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def _segment(cache, key):
    """The entry's one segment file (a 60-row extraction commits one)."""
    (path,) = (cache / key).glob("seg-*.h5")
    return path


def _error_line(proc):
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


# ---- checksums are written


def test_entries_and_parts_carry_fletcher32_on_features_and_ids(entry, tmp_path):
    _, cache, key, spec = entry
    with h5py.File(_segment(cache, key), "r") as f:
        assert f["features"].fletcher32 and f["ids"].fletcher32
        assert f["features"].chunks is not None
        assert spec.canonical() == f.attrs["spec"] and f"-{spec.key.split('-')[-1]}" in key  # key and format unchanged
    part = tmp_path / "p.h5"
    write_part_file(part, spec, ["a" * 32, "b" * 32], np.ones((2, 512), np.float32))
    with h5py.File(part, "r") as f:
        assert f["features"].fletcher32 and f["ids"].fletcher32
    assert FeatureCache(cache).verify(key).describe() == f"{key}: OK (60 rows verified)"


# ---- damage is found, never trained on


def test_zeroed_middle_half_is_detected_by_read_verify_and_repaired_by_extract(entry):
    data, cache, key, spec = entry
    path = _segment(cache, key)
    size = path.stat().st_size
    _zero(path, size // 4, size // 2)
    fc = FeatureCache(cache)
    ds = open_dataset(data)
    with pytest.raises(CacheError, match=rf"{key}/{path.name}: .*fail their checksum .*featx extract.*featx cache rm {key}"):
        load_features(cache, spec, ds)
    result = fc.verify(key)
    assert result.status == "damaged" and result.damaged and "DAMAGED" in result.describe()
    messages = []
    rep = extract(ds, cache=cache, notify=messages.append, **SMALL)
    assert rep.n_extracted > 0 and rep.n_cached + rep.n_extracted == 60       # damaged rows computed again
    assert any("failed their checksum" in m for m in messages), messages
    assert fc.verify(key).status == "ok"
    X, _, _ = load_features(cache, spec, ds)
    assert np.abs(X).sum(axis=1).min() > 0            # no zero rows left


def test_a_chunk_zeroed_whole_checksum_included_is_still_damage(entry):
    """fletcher32 of all-zero bytes is zero: a chunk zeroed whole passes HDF5's check."""
    data, cache, key, spec = entry
    path = _segment(cache, key)
    with h5py.File(path, "r") as f:
        info = f["features"].id.get_chunk_info(0)
        rows = f["features"].chunks[0]
    _zero(path, info.byte_offset, info.size)
    with h5py.File(path, "r") as f:               # HDF5 itself reads zeros without complaint
        assert not f["features"][:rows].any() and f["features"][rows:].any(axis=1).all()
    with pytest.raises(CacheError, match="fail their checksum"):
        load_features(cache, spec, open_dataset(data))
    assert FeatureCache(cache).verify(key).status == "damaged"


def test_legitimately_zero_features_are_not_damage(tmp_path):
    _, _, (spec,) = feature_specs("resnet18", "none", precision="fp32")
    fc = FeatureCache(tmp_path / "c")
    ids = [uuid.uuid4().hex for _ in range(4)]
    fc.write_part(spec.key, spec, ids, np.zeros((4, 512), np.float32))
    with fc.lock(spec.key):
        fc.consolidate(spec.key, spec)
    assert fc.verify(spec.key).status == "ok"
    assert not fc.read(spec.key, ids).any()


def test_train_never_fits_on_damaged_rows(entry, tmp_path):
    data, cache, key, _ = entry
    path = _segment(cache, key)
    size = path.stat().st_size
    _zero(path, size - 20 * 1024, 20 * 1024)
    r = _featx("train", data, *CLI_SMALL, "--cache", cache, "--out", tmp_path / "m.featx")
    # either it recomputed the damaged rows first, or it stopped: never trained on zeros
    assert "failed their checksum" in r.stderr or r.returncode != 0, r.stderr
    for segment in (cache / key).glob("seg-*.h5"):
        with h5py.File(segment, "r") as f:
            assert f["features"].fletcher32
    assert FeatureCache(cache).verify(key).status == "ok" or r.returncode != 0


def test_verify_cli_reports_each_entry_and_exits_1_when_damaged(entry):
    _, cache, key, _ = entry
    ok = _featx("cache", "verify", "--cache", cache)
    assert ok.returncode == 0 and f"{key}: OK (60 rows verified)" in ok.stdout
    path = _segment(cache, key)
    _zero(path, path.stat().st_size // 4, path.stat().st_size // 2)
    bad = _featx("cache", "verify", key[:20], "--cache", cache)
    assert bad.returncode == 1 and f"{key}: DAMAGED" in bad.stdout and f"segment {path.name} chunk" in bad.stdout
    assert _error_line(bad).startswith("Error: 1 of 1 entries")


def _as_format_3(cache, key, checksums=True):
    """The entry rewritten as format 3 kept it: one ``<key>.h5`` with the dataset records inside."""
    fc = FeatureCache(cache)
    ids, X = fc.ids(key), fc.read(key, fc.ids(key))
    records = fc.dataset_records(key)
    log = json.loads((cache / key / "log.json").read_text())
    path = cache / f"{key}.h5"
    order = np.random.default_rng(0).permutation(len(ids))       # format 3 kept rows in extraction order
    with h5py.File(path, "w") as g:
        extra = dict(chunks=(32, X.shape[1]), fletcher32=True) if checksums else dict(chunks=(60, X.shape[1]))
        g.create_dataset("features", data=X[order], **extra)
        g.create_dataset("ids", data=np.array(ids, dtype="S32")[order], **({"fletcher32": True} if checksums else {}))
        group = g.create_group("manifests")
        for m in records:
            write_manifest_group(group, m)
        g.attrs.update({"featx_format": 3, "key": key, "spec": log["spec"], "created": log["created"],
                        "versions": json.dumps(log["versions"])})
    shutil.rmtree(cache / key)
    shutil.rmtree(cache / "datasets")
    return path, dict(zip(ids, X))


def test_an_entry_without_checksums_still_reads_and_is_rewritten_with_them(entry):
    data, cache, key, spec = entry
    path, _ = _as_format_3(cache, key, checksums=False)    # as older featx wrote it
    fc = FeatureCache(cache)
    result = fc.verify(key)
    assert result.status == "no checksums" and result.ok and "rewritten with checksums" in result.describe()
    ds = open_dataset(data)
    X, _, _ = load_features(cache, spec, ds)
    rep = extract(ds, cache=cache, **SMALL)                # nothing to compute, but now checksummed
    assert rep.n_extracted == 0 and rep.n_cached == 60
    with h5py.File(_segment(cache, key), "r") as f:
        assert f["features"].fletcher32 and f["ids"].fletcher32
    np.testing.assert_array_equal(load_features(cache, spec, ds)[0], X)


@pytest.mark.parametrize("damage", ["truncate", "zero0", "zero800"])
def test_structural_damage_is_one_line_naming_the_entry_and_the_fix(entry, tmp_path, damage):
    data, cache, key, _ = entry
    path = _segment(cache, key)
    size = path.stat().st_size
    if damage == "truncate":
        os.truncate(path, size // 2)
    else:
        _zero(path, 0 if damage == "zero0" else 800, 512)
    for args in (["extract", data, *CLI_SMALL], ["train", data, *CLI_SMALL, "--out", tmp_path / "m.featx"]):
        r = _featx(*args, "--cache", cache)
        assert r.returncode == 1, r.stderr
        line = _error_line(r)
        assert line.startswith(f"Error: {path}: unreadable cache entry") and f"featx cache rm {key}" in line, line
        assert f"featx cache rm {key} --segment {path.name}" in line, line
    v = _featx("cache", "verify", "--cache", cache)
    assert v.returncode == 1 and f"{key}: unreadable" in v.stdout
    rm = _featx("cache", "rm", key, "--cache", cache)
    assert rm.returncode == 0 and not path.exists()


# ---- part files that featx did not write


def test_bad_part_files_are_set_aside_with_a_message(entry):
    data, cache, key, spec = entry
    parts = cache / f"{key}.parts"
    parts.mkdir()
    (parts / "random-1.h5").write_bytes(os.urandom(5000))
    with h5py.File(parts / "noids-2.h5", "w") as f:
        f["features"] = np.ones((2, 512), np.float32)
        f.attrs["key"] = key
    with h5py.File(parts / "keyless-3.h5", "w") as f:
        f["features"] = np.ones((2, 512), np.float32)
        f["ids"] = np.array([b"a" * 32] * 2)
    other = FeatureSpec(**{**spec.__dict__, "pool": "max"})
    write_part_file(parts / "foreign-4.h5", other, ["b" * 32], np.ones((1, 512), np.float32))
    v = FeatureCache(cache).verify(key)
    assert len(v.bad_parts) == 4 and "DAMAGED" in v.describe()
    messages = []
    rep = extract(open_dataset(data), cache=cache, notify=messages.append, **SMALL)
    assert rep.n_cached == 60
    for name in ("random-1.h5", "noids-2.h5", "keyless-3.h5", "foreign-4.h5"):
        assert (parts / f"{name}.corrupt").exists() and not (parts / name).exists()
        (line,) = [m for m in messages if name in m]
        assert "set aside as" in line and "extracted again" in line
    assert any("another entry" in m for m in messages) and any("no key" in m for m in messages)


# ---- read-only caches and folders that cannot be written (real processes)


@contextlib.contextmanager
def _read_only_view(folder, tmp_path):
    """``folder`` seen read-only: chmod when not root, a read-only bind mount as root."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    view = tmp_path / "ro"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount: cannot make a read-only folder")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


@pytest.mark.slow
def test_a_read_only_cache_serves_extract_train_and_predict(entry, tmp_path):
    data, cache, key, _ = entry
    (cache / ".locks").mkdir(exist_ok=True)
    with _read_only_view(cache, tmp_path) as ro:
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        r = _featx("extract", data, *CLI_SMALL, "--cache", ro)
        assert r.returncode == 0 and "all 60 images already cached" in r.stdout, r.stderr
        bundle = tmp_path / "m.featx"
        r = _featx("train", data, *CLI_SMALL, "--cache", ro, "--out", bundle)
        assert r.returncode == 0 and bundle.exists(), r.stderr
        img = next((data / "red").glob("*.png"))
        r = _featx("predict", bundle, img, "--cache", ro, "-q")
        assert r.returncode == 0 and "1 cached, 0 extracted" in r.stderr, r.stderr
        new = _images(tmp_path / "new", 3, seed=9000)
        r = _featx("extract", new, *CLI_SMALL, "--cache", ro)
        assert r.returncode == 1 and _error_line(r).startswith(f"Error: {ro} cannot be written"), r.stderr
        r = _featx("extract", new, *CLI_SMALL, "--cache", ro / "sub")
        assert r.returncode == 1 and _error_line(r).startswith(f"Error: cannot create the cache folder {ro / 'sub'}")
        # the cached images and one that does not decode: skipped, as a writable cache's run skips it
        broken = tmp_path / "broken"
        shutil.copytree(data, broken)
        (broken / "red" / "zz-broken.png").write_bytes(b"not an image")
        r = _featx("extract", broken, *CLI_SMALL, "--cache", ro)
        assert r.returncode == 0, r.stderr
        assert "nothing to extract: 60 images already cached; 1 unreadable skipped" in r.stdout, r.stdout
        r = _featx("extract", broken, *CLI_SMALL, "--cache", ro, "--strict")
        assert r.returncode == 1 and "zz-broken.png" in _error_line(r), r.stderr
    assert not list(cache.rglob("*.tmp*"))


# ---- a full disk (real processes, a small tmpfs)


@contextlib.contextmanager
def _small_disk(tmp_path, size="20m"):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _fill(mnt, leave_kb):
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - leave_kb * 1024)


@pytest.mark.slow
@pytest.mark.parametrize("leave_kb", [100, 260])   # out of room writing batches; merging them
def test_disk_full_while_extracting_is_one_line_and_leaves_no_temporary(made, tmp_path, leave_kb):
    data = made[0]
    with _small_disk(tmp_path) as mnt:
        _fill(mnt, leave_kb)
        r = _featx("extract", data, *CLI_SMALL, "--cache", mnt / "cache")
        assert r.returncode == 1, (r.returncode, r.stderr[-2000:])        # not 139
        line = _error_line(r)
        assert line.startswith(f"Error: no space left on device in {mnt / 'cache'}") and "MB" in line, line
        assert "then run the same command again" in line
        assert not [p for p in (mnt / "cache").rglob("*") if ".tmp" in p.name]
        (mnt / "filler").unlink()
        again = _featx("extract", data, *CLI_SMALL, "--cache", mnt / "cache")
        assert again.returncode == 0, again.stderr
        assert FeatureCache(mnt / "cache").verify(made[2]).status == "ok"


@pytest.mark.slow
def test_train_with_pending_parts_on_a_full_disk_trains_from_the_entry(made, tmp_path):
    data, cache, key, spec = made
    with _small_disk(tmp_path) as mnt:
        shutil.copytree(cache, mnt / "cache")
        fc = FeatureCache(mnt / "cache")
        for i in range(3):      # pending rows of other images
            fc.write_part(key, spec, [uuid.uuid4().hex for _ in range(100)], np.random.rand(100, 512))
        _fill(mnt, 100)
        r = _featx("train", data, *CLI_SMALL, "--cache", mnt / "cache", "--out", tmp_path / "m.featx")
        assert r.returncode == 0 and (tmp_path / "m.featx").exists(), r.stderr[-2000:]
        assert "no space left on device" in r.stderr and "going on" in r.stderr
        assert len(fc._parts(key)) == 3 and not [p for p in (mnt / "cache").rglob("*") if ".tmp" in p.name]
