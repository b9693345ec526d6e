"""What does --engine dask cost against the single-process path?

    python benchmarks/dask_overhead.py [--n 200]

Extracts the same images (the first N/10 per class of
../shared/data/clothing-small/train, or featx's embedded clothing-mini when
that is absent) with mobilenet_v2 into a fresh cache each time:
single process; Dask with its own LocalCluster (start and stop included);
an already-running cluster, first run (workers load the model) and warm.
"""

import argparse
import csv
import tempfile
import time
from pathlib import Path

import featx
from featx.distributed import dask_client, extract_dask

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data" / "clothing-small" / "train"
MINI = HERE.parent / "featx" / "datasets" / "clothing-mini" / "train"


def subset_csv(n: int, folder: Path) -> Path:
    root = SHARED if SHARED.is_dir() else MINI
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    per_class = max(1, n // len(classes))
    out = folder / "subset.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for c in classes:
            for p in sorted((root / c).glob("*.jpg"))[:per_class]:
                w.writerow([str(p), c])
    return out


def timed(fn):
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        report = fn(cache)
        return time.perf_counter() - t0, report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--backbone", default="mobilenet_v2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ds = featx.open_dataset(subset_csv(args.n, Path(d)))
        kw = dict(weights="auto", batch_size=32, progress=False, compile="off")
        rows = []
        dt, r = timed(lambda c: featx.extract(ds, args.backbone, cache=c, **kw))
        rows.append(("single process", dt, r.n_extracted))
        dt, r = timed(lambda c: extract_dask(ds, args.backbone, cache=c, **kw))
        rows.append(("dask, own LocalCluster (start + stop included)", dt, r.n_extracted))
        with dask_client(None) as client:
            for label in ("running cluster, first run (model loads)", "running cluster, warm workers"):
                dt, r = timed(lambda c: extract_dask(ds, args.backbone, cache=c, scheduler=client, shard_size=50, **kw))
                rows.append((label, dt, r.n_extracted))
    print(f"| path ({len(ds)} images, {args.backbone}) | wall s | images/s |")
    print("|---|---:|---:|")
    for label, dt, n in rows:
        print(f"| {label} | {dt:.1f} | {n / dt:.1f} |")


if __name__ == "__main__":
    main()
