"""How the feature cache's costs grow with its size (no model involved).

    python benchmarks/cache_scale.py [--dims D] [--json] N1 N2 ...
    python benchmarks/cache_scale.py --scan 100000 [--json]

For each N an entry of N rows of random D-d features is built through
featx's own writing path (``write_part`` + ``consolidate``, 65,536 rows a
commit), then, each time with a fresh ``FeatureCache`` (as a new process
sees the entry: no map in memory):

* ``add_s``: one more 256-row batch through ``write_part`` + ``consolidate``
  under the lock (median of 5),
* ``read_s``: ``read`` of 1000 random ids (median of 3),
* ``ids_s``: the full ``ids`` listing,
* ``bytes``: the entry on disk.

``--scan N`` generates a folder of N tiny JPEGs (in 4 class folders) and
times ``featx.open_dataset`` on it: the first scan (every file hashed) and
a re-scan with every hash already in the cache's ``hashes.sqlite``.
Everything is written under a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featx.cache import FeatureCache, FeatureSpec  # noqa: E402

BUILD_ROWS = 65536


def _spec(dims: int) -> FeatureSpec:
    return FeatureSpec("bench", "none:seed=0", f"d{dims}", "avg", {"crop": 224})


def _ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _add(root: Path, spec: FeatureSpec, dims: int, rng) -> float:
    cache = FeatureCache(root)
    ids, X = _ids(256), rng.random((256, dims), dtype=np.float32)
    t = time.perf_counter()
    cache.write_part(spec.key, spec, ids, X)
    with cache.lock(spec.key):
        cache.consolidate(spec.key, spec)
    return time.perf_counter() - t


def entry_row(n: int, dims: int, base: Path) -> dict:
    rng = np.random.default_rng(n)
    spec, root = _spec(dims), base / f"n{n}"
    cache = FeatureCache(root)
    all_ids = []
    for a in range(0, n, BUILD_ROWS):
        k = min(BUILD_ROWS, n - a)
        ids = _ids(k)
        cache.write_part(spec.key, spec, ids, rng.random((k, dims), dtype=np.float32))
        with cache.lock(spec.key):
            cache.consolidate(spec.key, spec)
        all_ids += ids
    add = statistics.median(_add(root, spec, dims, rng) for _ in range(5))
    reads = []
    for _ in range(3):
        fresh = FeatureCache(root)
        pick = [all_ids[i] for i in rng.integers(0, n, 1000)]
        t = time.perf_counter()
        X = fresh.read(spec.key, pick)
        reads.append(time.perf_counter() - t)
        assert X.shape == (1000, dims)
    fresh = FeatureCache(root)
    t = time.perf_counter()
    listed = fresh.ids(spec.key)
    ids_s = time.perf_counter() - t
    assert len(listed) == n + 5 * 256 and len(set(listed)) == len(listed)
    row = {"n": n, "dims": dims, "add_s": round(add, 4), "read_s": round(statistics.median(reads), 4),
           "ids_s": round(ids_s, 4), "bytes": _size(root / spec.key),
           "segments": FeatureCache(root).info(spec.key).segments}
    shutil.rmtree(root)
    return row


def _jpegs(folder: Path, n: int):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(4):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    buf_cache = {}
    for i in range(n):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        p = folder / f"class{i % 4}" / f"{i:06d}.jpg"
        Image.fromarray(arr).save(p, quality=80)
    return buf_cache


def scan_row(n: int, base: Path) -> dict:
    import featx
    data, cache = base / "images", base / "cache"
    t = time.perf_counter()
    _jpegs(data, n)
    made = time.perf_counter() - t
    t = time.perf_counter()
    ds = featx.open_dataset(data, hash_index=cache / "hashes.sqlite")
    first = time.perf_counter() - t
    t = time.perf_counter()
    again = featx.open_dataset(data, hash_index=cache / "hashes.sqlite")
    rescan = time.perf_counter() - t
    assert [s.id for s in ds.samples] == [s.id for s in again.samples] and len(ds.samples) == n
    shutil.rmtree(data)
    shutil.rmtree(cache)
    return {"images": n, "first_scan_s": round(first, 2), "rescan_s": round(rescan, 2),
            "cores": os.cpu_count(), "generate_s": round(made, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="*", type=int, help="entry sizes (rows)")
    ap.add_argument("--dims", type=int, default=512)
    ap.add_argument("--scan", type=int, default=0, metavar="N", help="time open_dataset on N tiny JPEGs")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--tmp", default=None, help="folder for the temporary entries (default: the system's)")
    args = ap.parse_args(argv)
    if not args.n and not args.scan:
        ap.error("give entry sizes (e.g. 10000 100000 1000000) or --scan N")
    base = Path(tempfile.mkdtemp(prefix="featx-cache-scale-", dir=args.tmp))
    try:
        if args.n and not args.json:
            print(f"{'rows':>9} {'dims':>5} {'add-256 s':>10} {'read-1000 s':>12} {'ids s':>8} {'size MiB':>9} {'segments':>9}")
        for n in args.n:
            r = entry_row(n, args.dims, base)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['n']:>9} {r['dims']:>5} {r['add_s']:>10.4f} {r['read_s']:>12.4f} {r['ids_s']:>8.3f} "
                      f"{r['bytes'] / 2**20:>9.1f} {r['segments']:>9}", flush=True)
        if args.scan:
            r = scan_row(args.scan, base)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"open_dataset on {r['images']} tiny JPEGs ({r['cores']} cores): first scan "
                      f"{r['first_scan_s']:.2f} s, re-scan {r['rescan_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
