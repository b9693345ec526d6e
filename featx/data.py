"""Datasets: discovery of the four layouts, stable content ids, robust decoding.

A :class:`Dataset` is a list of :class:`Sample` (path, label, split, content
id) plus its class names. Features in the cache belong to image *contents*
(the id is a hash of the file's bytes); which images form a dataset, with
which labels and splits, is the dataset's manifest.

Layouts (``layout="auto"`` picks the first that fits):

``csv``
    a ``.csv`` file with columns ``path,label[,split]``; paths relative to
    the file.
``split-folders``
    ``root/{train,val|validation|valid,test}/CLASS/*.jpg``
``folders``
    ``root/CLASS/*.jpg`` (folder per class)
``filenames``
    ``root/cat.123.jpg``: the label is the part before the first dot, or
    the first group (or the group named ``label``) of ``label_regex``.

When the layout has no test split, a stratified, seeded split is made and
recorded in the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sqlite3
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
LAYOUTS = ("auto", "csv", "split-folders", "folders", "filenames")

# A truncated JPEG must be an error we report, not grey pixels we learn from.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Photos of 100+ megapixels are legitimate here; PIL's bomb guard still
# refuses the absurd ones (over 2x this) with an error we report.
Image.MAX_IMAGE_PIXELS = 300_000_000


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str
    id: str


@dataclass
class Dataset:
    """Images with labels and splits. Build one with :func:`open_dataset`."""

    root: Path
    layout: str
    classes: list[str]
    samples: list[Sample]
    split_made: dict | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:   # one line: the dataclass repr would list every sample
        splits = ", ".join(f"{s} {sum(1 for x in self.samples if x.split == s)}" for s in self.splits)
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (f"<Dataset {self.name!r}: {len(self.samples)} images, {len(self.classes)} classes, "
                f"{self.layout} layout; {splits or 'no split'}{skipped}; root {str(self.root)!r}>")

    @property
    def name(self) -> str:
        return self.root.stem if self.root.is_file() else self.root.name

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in SPLITS if s in present]

    def subset(self, split: str | None) -> list[Sample]:
        """Samples of one split (``None`` or ``"all"``: every sample)."""
        if split in (None, "all"):
            return list(self.samples)
        name = SPLIT_ALIASES.get(split)
        if name is None or name not in self.splits:
            raise DatasetError(
                f"{self.root}: no split {split!r}; this dataset has {', '.join(self.splits)}")
        return [s for s in self.samples if s.split == name]

    def labels(self, samples: list[Sample]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[s.label] for s in samples], dtype=np.int64)

    def counts(self, split: str | None = None) -> dict[str, int]:
        c = Counter(s.label for s in self.subset(split))
        return {k: c.get(k, 0) for k in self.classes}

    @property
    def id(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for s in sorted(self.samples, key=lambda s: (s.id, str(s.path))):
            h.update(f"{s.id}\t{s.label}\t{s.split}\t{_rel(s.path, self.root)}\n".encode())
        return h.hexdigest()

    def manifest(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "split_made": self.split_made,
            "id": self.id,
            "samples": [
                {"id": s.id, "path": _rel(s.path, self.root), "label": s.label, "split": s.split}
                for s in self.samples
            ],
        }

    def save_manifest(self, cache_dir: str | os.PathLike) -> Path:
        """Record which images form this dataset, beside the feature cache."""
        folder = Path(cache_dir) / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_slug(self.name)}-{self.id}.json"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.manifest(), indent=1))
            os.replace(tmp, path)
        return path


def _rel(path: Path, root: Path) -> str:
    base = root.parent if root.is_file() else root
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


# --------------------------------------------------------------------------
# content ids


class HashIndex:
    """Remembers content hashes by (path, size, mtime) so big folders are not
    re-read on every run. Lives in the cache folder; safe to delete."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._db = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(self.path), timeout=30)
                self._db.execute("CREATE TABLE IF NOT EXISTS h (path TEXT PRIMARY KEY, size INT, mtime INT, id TEXT)")
            except sqlite3.Error:
                self._db = None  # an unusable index only costs speed

    def get(self, path: Path, st: os.stat_result) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT size, mtime, id FROM h WHERE path=?", (str(path),)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        return None

    def put_many(self, rows):
        if self._db is None or not rows:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO h VALUES (?,?,?,?)", rows)
        except sqlite3.Error:
            pass

    def close(self):
        if self._db is not None:
            self._db.close()
            self._db = None


def content_id(path: str | os.PathLike) -> str:
    """Stable id of an image: blake2b-128 of the file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_all(paths: list[Path], index: HashIndex) -> list[str | None]:
    ids: list[str | None] = []
    fresh = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            ids.append(None)
            continue
        known = index.get(p, st)
        if known is None:
            try:
                known = content_id(p)
            except OSError:
                ids.append(None)
                continue
            fresh.append((str(p), st.st_size, st.st_mtime_ns, known))
        ids.append(known)
    index.put_many(fresh)
    return ids


# --------------------------------------------------------------------------
# discovery


def _is_candidate(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_candidate(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(f"{path}: a dataset is a folder or a .csv manifest (path,label[,split])")
    subdirs = _subdirs(path)
    names = {d.name.lower() for d in subdirs}
    if "train" in names and names <= set(SPLIT_ALIASES):
        return "split-folders"
    if subdirs:
        return "folders"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file()):
        return "filenames"
    raise DatasetError(f"{path}: no images found (expected CLASS/ folders, "
                       "train/val/test/ folders, label.N.jpg files or a .csv manifest)")


def _entries_folders(root: Path, split: str | None):
    for cls_dir in _subdirs(root):
        for p in _files(cls_dir):
            yield p, cls_dir.name, split


def _entries_split_folders(root: Path):
    for split_dir in _subdirs(root):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        yield from _entries_folders(split_dir, split)


def _entries_filenames(root: Path, label_regex: str | None):
    rx = re.compile(label_regex) if label_regex else None
    for p in sorted(root.iterdir()):
        if not _is_candidate(p):
            continue
        if rx is None:
            label = p.name.split(".", 1)[0] if "." in p.name else None
        else:
            m = rx.search(p.name)
            label = None
            if m:
                label = m.groupdict().get("label") or (m.group(1) if m.groups() else m.group(0))
        yield p, label, None


def _entries_csv(csv_path: Path):
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise DatasetError(f"{csv_path}: needs a header with columns path,label[,split]; found {','.join(cols) or 'none'}")
        reader.fieldnames = cols
        for lineno, row in enumerate(reader, start=2):
            raw_path = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip()
            if not raw_path or not label:
                raise DatasetError(f"{csv_path}:{lineno}: empty path or label")
            split = (row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLIT_ALIASES:
                raise DatasetError(f"{csv_path}:{lineno}: unknown split {split!r} (use train, val or test)")
            p = Path(raw_path)
            yield (p if p.is_absolute() else base / p), label, (SPLIT_ALIASES[split] if split else None)


def open_dataset(
    path: str | os.PathLike,
    layout: str = "auto",
    *,
    label_regex: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    hash_index: str | os.PathLike | None = None,
) -> Dataset:
    """Discover a dataset and give every image its content id.

    Parameters
    ----------
    path : folder or .csv manifest
    layout : one of ``auto, csv, split-folders, folders, filenames``
    label_regex : for ``filenames``: regex whose group ``label`` (or first
        group) is the class name.
    val_fraction, test_fraction : share of each class put into val / test
        when the layout has no split (stratified, seeded by ``seed``).
    hash_index : sqlite file remembering content hashes between runs.

    Examples
    --------
    >>> ds = open_dataset("photos/")            # doctest: +SKIP
    >>> ds.classes, ds.counts("train")          # doctest: +SKIP
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    root = root.resolve()
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)

    if layout == "csv":
        entries = list(_entries_csv(root))
    elif layout == "split-folders":
        entries = list(_entries_split_folders(root))
    elif layout == "folders":
        entries = list(_entries_folders(root, None))
    elif layout == "filenames":
        entries = list(_entries_filenames(root, label_regex))
    else:  # pragma: no cover - guarded above
        raise AssertionError(layout)

    skipped: list[tuple[str, str]] = []
    kept = []
    for p, label, split in entries:
        if label is None:
            skipped.append((str(p), "no label in file name" + (f" (regex {label_regex!r})" if label_regex else "")))
        elif not p.exists():
            skipped.append((str(p), "file not found"))
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((str(p), f"not an image extension ({p.suffix or 'none'})"))
        else:
            kept.append((p, label, split))
    if not kept:
        raise DatasetError(f"{root}: no images found for layout {layout!r}")

    index = HashIndex(hash_index)
    try:
        ids = _hash_all([p for p, _, _ in kept], index)
    finally:
        index.close()
    samples = []
    for (p, label, split), sid in zip(kept, ids):
        if sid is None:
            skipped.append((str(p), "cannot read file"))
            continue
        samples.append(Sample(p, label, split or "", sid))

    classes = sorted({s.label for s in samples})
    if len(classes) < 2:
        raise DatasetError(f"{root}: found {len(classes)} class ({', '.join(classes)}); need at least 2 to classify")

    split_made = None
    if not any(s.split == "test" for s in samples):
        samples, split_made = _make_split(samples, val_fraction, test_fraction, seed,
                                          keep_val=any(s.split == "val" for s in samples))
    else:
        samples = [s if s.split else Sample(s.path, s.label, "train", s.id) for s in samples]
    return Dataset(root, layout, classes, samples, split_made, skipped)


def _make_split(samples, val_fraction, test_fraction, seed, keep_val=False):
    """Stratified, seeded, deterministic split of the unsplit samples.

    Order within a class comes from a hash of (seed, content id), so the same
    images always land in the same split whatever their file names."""
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DatasetError(f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1) and sum below 1")
    if keep_val:
        val_fraction = 0.0
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: hashlib.blake2b(f"{seed}:{s.id}:{s.path.name}".encode(), digest_size=8).digest())
        # no test split anywhere: train images are free to be re-assigned
        fixed = [s for s in group if s.split and s.split != "train"]
        free = [s for s in group if not s.split or s.split == "train"]
        n = len(free)
        n_test = min(n - 1, max(1, math.floor(n * test_fraction + 0.5))) if n >= 2 else 0
        n_val = min(n - 1 - n_test, max(1 if n >= 5 else 0, math.floor(n * val_fraction + 0.5))) if val_fraction > 0 else 0
        for i, s in enumerate(free):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            out.append(Sample(s.path, s.label, split, s.id))
        out.extend(fixed)
    made = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "stratified": True}
    return out, made


# --------------------------------------------------------------------------
# decoding


def load_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open any image as 8-bit RGB, EXIF orientation applied.

    ``draft_size``: the short side the caller will resize to; JPEGs are then
    decoded at the smallest DCT scale that still covers it (much faster for
    big photos). Raises :class:`ImageError` with the reason on failure.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
            if draft_size and im.format == "JPEG":
                w, h = im.size
                r = draft_size / min(w, h)
                if r < 0.5:
                    im.draft(None, (math.ceil(w * r), math.ceil(h * r)))
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unknown format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageError(path, f"truncated image ({msg})") from None
        raise ImageError(path, f"corrupt image ({msg})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, CMYK and 16-bit images to 8-bit RGB.

    Transparent pixels are composited onto white, so what shows through is
    what a viewer would see, not whatever colour hides under alpha 0."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")
