"""The segment layout: appends that cost the new rows, crash safety under
SIGKILL at random points, concurrent writers, damaged segments, the
format-3 migration, export, and the bulk hash-index scan.

Entries are written through the cache's own API (no model): features are
a fixed function of each id, so any run can be checked against a clean one."""

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from featx.cache import FeatureCache, FeatureSpec, write_manifest_group
from featx.errors import CacheError

SPEC = FeatureSpec("bench", "none:seed=0", "d16", "avg", {"crop": 224})
KEY = SPEC.key
DIM = 16


def _id(i):
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def _feat(ids):
    if not len(ids):
        return np.zeros((0, DIM), np.float32)
    return np.stack([np.frombuffer(hashlib.blake2b(x.encode(), digest_size=DIM * 4).digest(), np.uint32)
                     .astype(np.float32) / 2**32 + 0.01 for x in ids])


def _commit(fc, rows, notify=None):
    ids = [_id(i) for i in rows]
    fc.write_part(KEY, SPEC, ids, _feat(ids))
    with fc.lock(KEY):
        return fc.consolidate(KEY, SPEC, notify=notify)


def _check(fc, n):
    ids = fc.ids(KEY)
    assert len(ids) == n and len(set(ids)) == n
    assert set(ids) == {_id(i) for i in range(n)}
    np.testing.assert_array_equal(fc.read(KEY, ids), _feat(ids))


# ---- appends and reads


def test_an_append_writes_only_the_new_rows_and_rewrites_nothing(tmp_path):
    fc = FeatureCache(tmp_path / "c")
    _commit(fc, range(0, 3000))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "c" / KEY).glob("seg-*.h5")}
    assert _commit(fc, range(2900, 3100)) == 100            # 100 of them were there already
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "c" / KEY).glob("seg-*.h5")}
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
    new = (tmp_path / "c" / KEY / (set(after) - set(before)).pop())
    with h5py.File(new) as f:                                # plain h5py: the new segment holds only the new rows
        assert f["ids"].shape == (100,) and f["features"].fletcher32 and list(f["ids"][:]) == sorted(f["ids"][:])
    _check(fc, 3100)
    log = json.loads((tmp_path / "c" / KEY / "log.json").read_text())
    assert sum(s["rows"] for s in log["segments"]) == 3100 and log["spec"] == SPEC.canonical()


def test_the_id_map_is_built_once_per_committed_state_for_chunked_reads(tmp_path, monkeypatch):
    fc = FeatureCache(tmp_path / "c")
    _commit(fc, range(5000))
    builds = []
    real = FeatureCache._build_index
    monkeypatch.setattr(FeatureCache, "_build_index", lambda self, *a: builds.append(1) or real(self, *a))
    fresh = FeatureCache(tmp_path / "c")
    ids = [_id(i) for i in range(4999, -1, -1)]
    got = np.concatenate([X for _, X in fresh.iter_chunks(KEY, ids, rows_per_chunk=500)])
    np.testing.assert_array_equal(got, _feat(ids))
    assert len(builds) == 1
    _commit(fc, range(5000, 5010))                          # a new committed state: built again, once
    fresh.read(KEY, [_id(5005)])
    fresh.read(KEY, [_id(1)])
    assert len(builds) == 2


def test_compaction_merges_segments_and_keeps_every_row(tmp_path):
    fc = FeatureCache(tmp_path / "c")
    for a in range(0, 1000, 100):
        _commit(fc, range(a, a + 100))
    assert fc.info(KEY).segments == 10
    assert fc.compact(KEY) == (10, 1)
    assert len(list((tmp_path / "c" / KEY).glob("seg-*.h5"))) == 1
    _check(fc, 1000)
    assert fc.verify(KEY).describe() == f"{KEY}: OK (1000 rows verified)"


def test_a_commit_past_the_threshold_merges_the_smallest_segments(tmp_path, monkeypatch):
    import featx.cache as cache_mod
    monkeypatch.setattr(cache_mod, "AUTO_COMPACT_SEGMENTS", 6)
    fc = FeatureCache(tmp_path / "c")
    messages = []
    for a in range(0, 700, 100):
        _commit(fc, range(a, a + 100), notify=messages.append)
    assert fc.info(KEY).segments <= 6 and any("segments merged" in m for m in messages)
    _check(fc, 700)


# ---- crash safety and concurrency (real processes)

WRITER = r"""
import sys, hashlib, numpy as np
sys.path.insert(0, {tests!r})
from test_cache_segments import SPEC, KEY, _id, _feat
from featx.cache import FeatureCache
root, n, batch, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fc = FeatureCache(root)
with fc.lock(KEY):
    fc.consolidate(KEY, SPEC)                      # what a killed run left
    order = list(range(0, n, batch))
    if seed:
        import random; random.Random(seed).shuffle(order)
    for k, a in enumerate(order):
        ids = [_id(i) for i in range(a, min(n, a + batch))]
        if fc.contains(KEY, ids).all():
            continue
        fc.write_part(KEY, SPEC, ids, _feat(ids))
        if k % 3 == 2:
            fc.consolidate(KEY, SPEC)
        if k % 7 == 6:
            fc._compact_locked(KEY, SPEC, fc._read_log(KEY), lambda m: None)    # the lock is held here
    fc.consolidate(KEY, SPEC)
print("done")
"""


def _writer(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=os.path.dirname(__file__)))
    return [sys.executable, str(script)]


def test_sigkill_at_random_points_never_loses_or_duplicates_a_row(tmp_path):
    """Killed anywhere (writing a part, a segment, the log, compacting), the
    entry stays readable and the next run completes it: the same rows and
    values as a clean run, each id once."""
    cmd, rng, n = _writer(tmp_path), random.Random(12), 1500
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    subprocess.run(cmd + [str(clean), str(n), "40", "0"], check=True, timeout=60)
    t_clean = time.monotonic() - t0         # kill points spread over a whole run, start-up included
    reference = FeatureCache(clean)
    _check(reference, n)
    killed_mid_run = 0
    t_end = time.monotonic() + 25
    trials = 0
    while trials < 10 and time.monotonic() < t_end:
        trials += 1
        root = tmp_path / f"t{trials}"
        proc = subprocess.Popen(cmd + [str(root), str(n), "40", str(trials)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.1, 0.95) * t_clean)
        proc.kill()
        out, err = proc.communicate()
        killed_mid_run += b"done" not in out
        fc = FeatureCache(root)
        if fc.log_path(KEY).exists():                          # readable as it was left
            ids = fc.ids(KEY)
            assert len(ids) == len(set(ids))
            if ids:
                np.testing.assert_array_equal(fc.read(KEY, ids), _feat(ids))
        done = subprocess.run(cmd + [str(root), str(n), "40", "0"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        _check(FeatureCache(root), n)
        assert not [p for p in root.rglob("*") if ".tmp" in p.name]
        assert FeatureCache(root).verify(KEY).status == "ok"
    assert trials >= 4 and killed_mid_run >= 2, (trials, killed_mid_run)


def test_two_writers_at_once_never_corrupt_the_entry(tmp_path):
    cmd = _writer(tmp_path)
    root = tmp_path / "c"
    procs = [subprocess.Popen(cmd + [str(root), "800", str(b), str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for b, s in ((30, 1), (50, 2))]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    _check(FeatureCache(root), 800)


# ---- damage


def test_a_damaged_segment_is_named_with_the_fix_and_never_read_as_zeros(tmp_path):
    fc = FeatureCache(tmp_path / "c")
    _commit(fc, range(0, 2000))
    _commit(fc, range(2000, 4000))
    seg = sorted((tmp_path / "c" / KEY).glob("seg-*.h5"))[-1]
    with h5py.File(seg) as f:
        info = f["features"].id.get_chunk_info(1)
        cr = f["features"].chunks[0]
        victims = [x.decode() for x in f["ids"][cr:cr + 2]]
    with open(seg, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\0" * info.size)                             # checksum included: only the zero check sees it
    with pytest.raises(CacheError, match=rf"{seg.name}: .*fail their checksum.*featx cache rm {KEY}"):
        FeatureCache(tmp_path / "c").read(KEY, victims)
    assert FeatureCache(tmp_path / "c").read(KEY, [_id(0)]).any()    # the other rows still serve
    v = fc.verify(KEY)
    assert v.status == "damaged" and f"segment {seg.name} chunk 1" in v.describe()
    messages = []
    with fc.lock(KEY):
        fc.consolidate(KEY, SPEC, notify=messages.append, repair=True)
    assert any(seg.name in m and "dropped, to be extracted again" in m for m in messages), messages
    assert not fc.contains(KEY, victims).any() and fc.verify(KEY).status == "ok"
    assert _commit(fc, range(4000)) == 2000 - cr           # recomputed: exactly the dropped rows
    _check(fc, 4000)


def test_an_unreadable_segment_names_the_segment_to_drop(tmp_path):
    fc = FeatureCache(tmp_path / "c")
    _commit(fc, range(0, 1500))
    _commit(fc, range(1500, 3000))
    seg = sorted((tmp_path / "c" / KEY).glob("seg-*.h5"))[0]
    os.truncate(seg, seg.stat().st_size // 3)
    with pytest.raises(CacheError) as e:
        FeatureCache(tmp_path / "c").ids(KEY)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{seg}: unreadable cache entry")
    assert f"featx cache rm {KEY} --segment {seg.name}" in line
    assert f"--segment {seg.name}" in fc.verify(KEY).describe()
    r = subprocess.run([sys.executable, "-c", "from featx.cli import main; main()", "cache", "rm", KEY[:15],
                        "--segment", seg.name, "--cache", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    left = FeatureCache(tmp_path / "c")
    assert len(left.ids(KEY)) == 1500 and left.verify(KEY).status == "ok"


def test_a_damaged_log_is_one_line_with_the_fix(tmp_path):
    fc = FeatureCache(tmp_path / "c")
    _commit(fc, range(100))
    fc.log_path(KEY).write_text('{"segments": [{"name": ')
    with pytest.raises(CacheError, match=rf"log\.json: unreadable cache entry .*featx cache rm {KEY}"):
        FeatureCache(tmp_path / "c").read(KEY, [_id(1)])


# ---- migration of format 3 and export


def _format_3(root, n, manifest):
    ids = [_id(i) for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / f"{KEY}.h5", "w") as f:
        f.create_dataset("features", data=_feat(ids), chunks=(64, DIM), fletcher32=True)
        f.create_dataset("ids", data=np.array(ids, dtype="S32"), fletcher32=True, chunks=(256,))
        write_manifest_group(f.create_group("manifests"), manifest)
        f.attrs.update({"featx_format": 3, "key": KEY, "spec": SPEC.canonical(), "created": "2024-01-01T00:00:00",
                        "versions": "{}"})
    return ids


def _manifest(n):
    return {"id": "ds1", "name": "toy", "root": "/data/toy", "layout": "folder", "classes": ["a", "b"],
            "split_made": None, "samples": [{"id": _id(i), "path": f"{'ab'[i % 2]}/{i}.png", "label": "ab"[i % 2],
                                             "split": "train" if i % 5 else "test"} for i in range(n)]}


def test_a_format_3_entry_is_read_in_place_then_migrated_once_with_equal_features(tmp_path):
    root = tmp_path / "c"
    ids = _format_3(root, 900, _manifest(900))
    fc = FeatureCache(root)
    np.testing.assert_array_equal(fc.read(KEY, ids[::-3]), _feat(ids[::-3]))      # before: read in place
    assert fc.needs_commit(KEY)
    messages = []
    with fc.lock(KEY):
        assert fc.consolidate(KEY, SPEC, notify=messages.append) == 0
    assert any("migrated once from format 3" in m and "nothing recomputed" in m for m in messages), messages
    assert not (root / f"{KEY}.h5").exists() and fc.log_path(KEY).exists()
    np.testing.assert_array_equal(FeatureCache(root).read(KEY, ids), _feat(ids))
    info = fc.info(KEY)
    assert info.n == 900 and info.created == "2024-01-01T00:00:00" and [m["id"] for m in info.manifests] == ["ds1"]
    assert json.loads((root / "datasets" / "ds1.json").read_text())["samples"][7]["path"] == "b/7.png"
    with fc.lock(KEY):
        assert fc.consolidate(KEY, SPEC, notify=messages.append) == 0
    assert sum("migrated" in m for m in messages) == 1 and not fc.needs_commit(KEY)


def test_export_npy_round_trips_features_ids_paths_and_labels(tmp_path):
    root = tmp_path / "c"
    fc = FeatureCache(root)
    ids = [_id(i) for i in range(300)]
    fc.write_part(KEY, SPEC, ids, _feat(ids))
    with fc.lock(KEY):
        fc.consolidate(KEY, SPEC, manifest=_manifest(250))     # 50 rows belong to no recorded dataset
    r = subprocess.run([sys.executable, "-c", "from featx.cli import main; main()", "cache", "export", KEY,
                        "--format", "npy", "--out", str(tmp_path / "out"), "--cache", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got_ids = np.load(tmp_path / "out" / "ids.npy")
    X = np.load(tmp_path / "out" / "features.npy")
    paths, labels = np.load(tmp_path / "out" / "paths.npy"), np.load(tmp_path / "out" / "labels.npy")
    assert sorted(got_ids) == sorted(ids)
    np.testing.assert_array_equal(X, _feat(list(got_ids)))
    want = {s["id"]: (s["path"], s["label"]) for s in _manifest(250)["samples"]}
    for i, p, lab in zip(got_ids, paths, labels):
        assert (p, lab) == want.get(i, ("", ""))


def test_export_parquet_round_trips_or_says_to_install_pyarrow(tmp_path):
    root = tmp_path / "c"
    fc = FeatureCache(root)
    ids = [_id(i) for i in range(120)]
    fc.write_part(KEY, SPEC, ids, _feat(ids))
    with fc.lock(KEY):
        fc.consolidate(KEY, SPEC, manifest=_manifest(120))
    out = tmp_path / "x.parquet"
    r = subprocess.run([sys.executable, "-c", "from featx.cli import main; main()", "cache", "export", KEY,
                        "--format", "parquet", "--out", str(out), "--cache", str(root)], capture_output=True, text=True)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 1 and "Traceback" not in r.stderr and "pip install pyarrow" in lines[-1], r.stderr
        assert not out.exists()
        return
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out).to_pydict()
    X = np.array(t["features"], np.float32)
    np.testing.assert_array_equal(X, _feat(t["id"]))
    want = {s["id"]: s["label"] for s in _manifest(120)["samples"]}
    assert [want[i] for i in t["id"]] == t["label"]


# ---- scans


def test_a_rescan_reads_the_hash_index_in_one_query_and_hashing_matches(tmp_path, monkeypatch):
    from featx import data as data_mod
    folder = tmp_path / "files"
    folder.mkdir()
    paths = []
    for i in range(300):
        p = folder / f"{i}.bin"
        p.write_bytes(os.urandom(100 + i))
        paths.append(p)
    index = data_mod.HashIndex(tmp_path / "h.sqlite")
    first = data_mod._hash_all(paths, index, threads=4)
    assert first == [data_mod.content_id(p) for p in paths]
    monkeypatch.setattr(data_mod.HashIndex, "get", lambda *a: pytest.fail("a query per file"))
    calls = []
    real = data_mod.HashIndex.get_all
    monkeypatch.setattr(data_mod.HashIndex, "get_all", lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(data_mod, "content_id", lambda p: pytest.fail(f"{p} hashed again"))
    assert data_mod._hash_all(paths, index) == first and calls == [1]
    index.close()
