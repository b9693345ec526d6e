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
``none``
    images without labels: a folder (searched recursively), one file, or a
    list of files and folders. For extraction only; ``auto`` picks it when
    labels are not needed (``labels=False``) and the folder has no class
    structure.

When the layout has no test split, a stratified, seeded split is made and
recorded in the manifest. The split of an image depends on its content id
and the seed only (split version 2; version 1 also hashed the file name).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
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

from .errors import ConfigError, DatasetError, ImageError
from .options import LAYOUTS
from .text import slug

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
# 2: an image's split depends on its content id and the seed only (1 also hashed its file name).
SPLIT_VERSION = 2
# Decoding budget per image: a 24000x24000 PNG of 600 KB would otherwise take
# 20 s and 6 GB. Bigger JPEGs are decoded at a reduced DCT scale that fits;
# other images above it are refused with the reason (skipped, or fatal with --strict).
MAX_PIXELS = 150_000_000

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

    @property
    def held_out(self) -> str | None:
        """The split evaluation uses: ``test``, else ``val`` (``--test-fraction 0``), else None."""
        return next((s for s in ("test", "val") if s in self.splits), None)

    @property
    def labelled(self) -> bool:
        return self.layout != "none"

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
            h.update(f"{s.id}\t{s.label}\t{s.split}\t{_rel(s.path, self.root)}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def manifest(self) -> dict:
        return {
            "name": self.name,
            "root": _text(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "split_made": self.split_made,
            "id": self.id,
            "samples": [
                {"id": s.id, "path": _text(_rel(s.path, self.root)), "label": s.label, "split": s.split}
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


def _text(path) -> str:
    """A path as printable, UTF-8-encodable text: bytes of a name that is not
    UTF-8 (kept by Python as surrogates) are shown as ``\\xNN``."""
    s = os.fspath(path)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_slug = slug     # the name other modules have imported; the helper lives in featx.text


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
        row = self._db.execute("SELECT size, mtime, id FROM h WHERE path=?", (_index_key(path),)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        return None

    def get_all(self) -> dict:
        """Every remembered ``path key -> (size, mtime, id)`` in one read (a
        query per file costs more than hashing a small one)."""
        if self._db is None:
            return {}
        try:
            return {row[0]: (row[1], row[2], row[3]) for row in self._db.execute("SELECT path, size, mtime, id FROM h")}
        except sqlite3.Error:
            return {}

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


def _index_key(path) -> str | bytes:
    """The index's key for a path: its text, or (a name that is not UTF-8)
    its raw bytes, which SQLite keeps as a BLOB that never equals a text key."""
    s = str(path)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s)


def content_id(path: str | os.PathLike) -> str:
    """Stable id of an image: blake2b-128 of the file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_and_hash(p: Path, known: tuple | None):
    """(id or None, index row to remember or None) of one file."""
    try:
        st = p.stat()
    except OSError:
        return None, None
    if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
        return known[2], None
    try:
        sid = content_id(p)
    except OSError:
        return None, None
    return sid, (_index_key(p), st.st_size, st.st_mtime_ns, sid)


def _hash_all(paths: list[Path], index: HashIndex, threads: int | None = None) -> list[str | None]:
    """Content ids of ``paths``: the index is read once, in bulk; files it
    does not know (or that changed) are hashed on every core (file reads
    and blake2b release the GIL)."""
    remembered = index.get_all()
    keys = [_index_key(p) for p in paths]
    threads = threads or min(32, (os.cpu_count() or 1) * 2)
    results: list = [None] * len(paths)
    todo = []
    for i, (p, k) in enumerate(zip(paths, keys)):
        known = remembered.get(k)
        if known is None:
            todo.append(i)
        else:
            results[i] = (p, known)
    # known files: a stat each, done here (cheap); unknown ones go to the pool
    out = [None] * len(paths)
    fresh = []
    for i, r in enumerate(results):
        if r is not None:
            sid, row = _stat_and_hash(*r)
            if row is not None:
                fresh.append(row)
            out[i] = sid
    if todo:
        if len(todo) < 64 or threads <= 1:
            got = [_stat_and_hash(paths[i], None) for i in todo]
        else:
            from concurrent.futures import ThreadPoolExecutor
            blocks = [todo[a:a + 256] for a in range(0, len(todo), 256)]
            with ThreadPoolExecutor(threads, thread_name_prefix="featx-hash") as pool:
                got = [r for block in pool.map(lambda b: [_stat_and_hash(paths[i], None) for i in b], blocks)
                       for r in block]
        for i, (sid, row) in zip(todo, got):
            out[i] = sid
            if row is not None:
                fresh.append(row)
    index.put_many(fresh)
    return out


# --------------------------------------------------------------------------
# discovery


class _Walker:
    """Lists folders with :func:`os.scandir`, sorted by name. What it cannot
    list (an unreadable folder, a symlink loop, a broken link) is recorded in
    ``problems`` as (path, reason) and left out, never dropped silently.
    Symlinked folders are followed unless they lead back to a folder above."""

    def __init__(self):
        self.problems: list[tuple[str, str]] = []
        self._listed: dict[str, list[os.DirEntry]] = {}

    def _problem(self, path, reason: str):
        item = (_text(path), reason)
        if item not in self.problems:
            self.problems.append(item)

    def entries(self, folder: Path) -> list[os.DirEntry]:
        key = str(folder)
        if key not in self._listed:
            try:
                with os.scandir(folder) as it:
                    self._listed[key] = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self._problem(folder, f"cannot read folder ({e.strerror or type(e).__name__}); its images are left out")
                self._listed[key] = []
        return self._listed[key]

    def _kind(self, e: os.DirEntry) -> str | None:
        """"dir", "file", or None (something else, or a link that leads nowhere: recorded)."""
        try:
            if e.is_dir():
                return "dir"
            if e.is_file():
                return "file"
        except OSError:
            pass
        if e.is_symlink():
            try:
                os.stat(e.path)
            except OSError as err:
                why = "symlink loop" if err.errno == errno.ELOOP else "broken symlink"
                self._problem(e.path, f"{why} ({err.strerror}); left out")
        return None

    def subdirs(self, folder: Path) -> list[Path]:
        return [Path(e.path) for e in self.entries(folder)
                if not e.name.startswith(".") and self._kind(e) == "dir"]

    def files(self, folder: Path, recursive: bool = True) -> list[Path]:
        out: list[Path] = []
        try:
            st = os.stat(folder)
            ancestors = {(st.st_dev, st.st_ino): str(folder)}
        except OSError:
            ancestors = {}
        self._walk(Path(folder), ancestors, recursive, out)
        return out

    def _walk(self, folder: Path, ancestors: dict, recursive: bool, out: list[Path]):
        for e in self.entries(folder):
            kind = self._kind(e)
            if kind == "file":
                if not e.name.startswith("."):
                    out.append(Path(e.path))
            elif kind == "dir" and recursive:
                try:
                    st = os.stat(e.path)
                except OSError as err:
                    self._problem(e.path, f"cannot read folder ({err.strerror}); its images are left out")
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    self._problem(e.path, f"symlink loop (leads back to {_text(ancestors[key])}); left out")
                    continue
                self._walk(Path(e.path), {**ancestors, key: e.path}, recursive, out)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def detect_layout(path: Path, walker: _Walker | None = None) -> str:
    walker = walker or _Walker()
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DatasetError(f"{path}: a dataset is a folder or a .csv manifest (path,label[,split])")
    subdirs = walker.subdirs(path)
    names = {d.name.lower() for d in subdirs}
    if "train" in names and names <= set(SPLIT_ALIASES):
        return "split-folders"
    if subdirs:
        return "folders"
    if any(_is_image_name(p.name) for p in walker.files(path, recursive=False)):
        return "filenames"
    raise DatasetError(f"{path}: no images found (expected CLASS/ folders, "
                       "train/val/test/ folders, label.N.jpg files or a .csv manifest)")


def _entries_folders(root: Path, split: str | None, walker: _Walker):
    for cls_dir in walker.subdirs(root):
        for p in walker.files(cls_dir):
            yield p, _text(cls_dir.name), split


def _entries_split_folders(root: Path, walker: _Walker):
    for split_dir in walker.subdirs(root):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        yield from _entries_folders(split_dir, split, walker)


def _compile_label_regex(label_regex: str) -> re.Pattern:
    try:
        return re.compile(label_regex)
    except re.error as e:
        raise DatasetError(f"--label-regex {label_regex!r}: not a valid regular expression ({e})") from None


def _label_from_name(name: str, rx: re.Pattern | None) -> str | None:
    if rx is None:
        return name.split(".", 1)[0] or None if "." in name else None
    m = rx.search(name)
    if not m:
        return None
    label = m.groupdict().get("label") or (m.group(1) if m.groups() else m.group(0))
    return label or None


def _entries_filenames(root: Path, label_regex: str | None, walker: _Walker):
    rx = _compile_label_regex(label_regex) if label_regex else None
    files = walker.files(root, recursive=False)
    images = [p for p in files if _is_image_name(p.name)]
    if rx is not None and images and not any(_label_from_name(_text(p.name), rx) for p in images):
        raise DatasetError(f"--label-regex {label_regex!r} matches none of the {len(images)} image names in {_text(root)} "
                           f"(e.g. {_text(images[0].name)}); it needs to match the file name, with a group 'label' "
                           "for the class")
    for p in files:
        yield p, _label_from_name(_text(p.name), rx), None


def _entries_csv(csv_path: Path):
    base = csv_path.parent
    try:
        data = csv_path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{csv_path}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{csv_path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                           "save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise DatasetError(f"{csv_path}: needs a header with columns path,label[,split]; found {','.join(cols) or 'none'}")
        reader.fieldnames = cols
        rows = list(reader)
    except csv.Error as e:
        raise DatasetError(f"{csv_path}:{reader.line_num}: not a valid CSV ({e})") from None
    for lineno, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not raw_path or not label:
            raise DatasetError(f"{csv_path}:{lineno}: empty path or label")
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLIT_ALIASES:
            raise DatasetError(f"{csv_path}:{lineno}: unknown split {split!r} (use train, val or test)")
        p = Path(raw_path).expanduser()
        # paths may point anywhere, outside the CSV's folder too: featx reads what the CSV lists
        yield (p if p.is_absolute() else base / p), label, (SPLIT_ALIASES[split] if split else None)


def _entries_none(paths: list[Path], walker: _Walker):
    for p in paths:
        for f in (walker.files(p) if p.is_dir() else [p]):
            yield f, "", None


def _mostly_single(counts: Counter) -> int:
    """How many classes have one image, when that is most of 4 or more classes (else 0)."""
    single = sum(1 for n in counts.values() if n == 1)
    return single if len(counts) >= 4 and single * 2 > len(counts) else 0


def _suggest_label_regex(names: list[str]) -> str | None:
    """A --label-regex that gives these file names sensible classes, or None."""
    letters = "[A-Za-z]+" if any(c.isupper() for n in names for c in n) else "[a-z]+"
    for rx in (f"(?P<label>{letters})_", f"(?P<label>{letters})-", f"(?P<label>{letters}) ",
               f"(?P<label>{letters})[0-9]", r"(?P<label>[^_]+)_", r"(?P<label>[^-]+)-"):
        pattern = re.compile("^" + rx)
        labels = [_label_from_name(n, pattern) for n in names]
        if all(labels):
            counts = Counter(labels)
            if len(counts) >= 2 and not _mostly_single(counts):
                return rx
    return None


def _check_labels(root: Path, layout: str, samples: list[Sample], label_regex: str | None):
    """Labels that cannot be what the user meant: an error with a hint."""
    counts = Counter(s.label for s in samples)
    classes = sorted(counts)
    if len(classes) < 2:
        raise DatasetError(f"{_text(root)}: found {len(classes)} class{'' if len(classes) == 1 else 'es'} "
                           f"({', '.join(classes)}); need at least 2 to classify")
    split_like = [c for c in classes if c.lower() in SPLIT_ALIASES]
    if layout == "folders" and len(split_like) >= 2:
        raise DatasetError(f"{_text(root)}: classes {', '.join(split_like)} look like split folders, not labels; "
                           "for train/val/test/CLASS/ folders use --layout split-folders (or auto)")
    single = _mostly_single(counts)
    if not single:
        return
    what = f"{len(samples)} images in {len(classes)} classes, {single} of them with a single image"
    if layout == "filenames":
        names = [_text(s.path.name) for s in samples]
        example = names[0]
        suggestion = _suggest_label_regex(names)
        rule = (f"--label-regex {label_regex!r} takes" if label_regex else "the label is the text before the first dot:")
        hint = (f"give --label-regex '{suggestion}' ({example} -> "
                f"{_label_from_name(example, re.compile('^' + suggestion))!r})" if suggestion else
                f"give --label-regex with a group 'label' that captures the class in names like {example}")
        raise DatasetError(f"{_text(root)}: {what}; {rule} {example} -> "
                           f"{_label_from_name(example, _compile_label_regex(label_regex) if label_regex else None)!r}; "
                           f"{hint}")
    if layout in ("folders", "split-folders"):
        raise DatasetError(f"{_text(root)}: {what}; every folder is taken as a class: give the folder whose "
                           "subfolders are the classes, or a .csv manifest (path,label)")
    raise DatasetError(f"{_text(root)}: {what}; check the label column")


def _check_fractions(val_fraction: float, test_fraction: float):
    for option, v in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= v < 1:
            raise ConfigError(f"{option} {v:g}: give a share of at least 0 and below 1")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"--val-fraction {val_fraction:g} + --test-fraction {test_fraction:g} = "
                          f"{val_fraction + test_fraction:g}: must be below 1 (train needs images)")


# --------------------------------------------------------------------------
# datasets shipped inside the package: featx:NAME in every command and pipeline

PACKAGE_DATASET_PREFIX = "featx:"


def package_datasets() -> list[str]:
    """Names of the datasets that ship inside featx (``featx:NAME``)."""
    folder = Path(__file__).parent / "datasets"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) \
        if folder.is_dir() else []


def resolve_path(text: str, base: str | os.PathLike | None = None) -> Path:
    """An absolute, normalised path; a relative one is taken relative to ``base``."""
    p = Path(text).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return Path(os.path.normpath(p.absolute()))


def resolve_dataset_path(text: str, base: str | os.PathLike | None = None) -> Path:
    """``featx:NAME`` -> the dataset shipped in the package; anything else is a
    path, relative to ``base`` (e.g. a pipeline file's folder) unless absolute."""
    if text.startswith(PACKAGE_DATASET_PREFIX):
        name = text[len(PACKAGE_DATASET_PREFIX):]
        known = package_datasets()
        if name not in known:
            raise ConfigError(f"{text}: featx ships no dataset {name!r}; it ships "
                              + ", ".join(PACKAGE_DATASET_PREFIX + k for k in known))
        return Path(__file__).parent / "datasets" / name
    return resolve_path(text, base)


def open_dataset(
    path: str | os.PathLike | list,
    layout: str = "auto",
    *,
    label_regex: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    hash_index: str | os.PathLike | None = None,
    labels: bool = True,
) -> Dataset:
    """Discover a dataset and give every image its content id.

    Parameters
    ----------
    path : folder or .csv manifest, or ``featx:NAME`` for a dataset shipped
        with featx; with ``labels=False`` also one image or a list of images
        and folders (layout ``none``)
    layout : one of ``auto, csv, split-folders, folders, filenames, none``
    label_regex : for ``filenames``: regex whose group ``label`` (or first
        group) is the class name.
    val_fraction, test_fraction : share of each class put into val / test
        when the layout has no split (stratified, seeded by ``seed``); either
        may be 0 (then the held-out split is the other one).
    hash_index : sqlite file remembering content hashes between runs.
    labels : False for extraction: no classes needed, and ``auto`` picks
        ``none`` when the images have no class structure. True (fitting,
        evaluating): at least 2 classes, and labels that look wrong (one image
        per class, split names as classes) are an error with a hint.

    Examples
    --------
    >>> ds = open_dataset("photos/")            # doctest: +SKIP
    >>> ds.classes, ds.counts("train")          # doctest: +SKIP
    """
    paths = _given_paths(path)
    root = paths[0] if len(paths) == 1 else Path(os.path.commonpath(paths))
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    _check_fractions(val_fraction, test_fraction)
    if label_regex is not None:
        _compile_label_regex(label_regex)
    layout = _layout_of_images(paths, root, layout, labels)
    walker = _Walker()
    layout, entries = _discover(paths, root, layout, label_regex, labels, walker)
    skipped: list[tuple[str, str]] = list(walker.problems)
    kept = _image_entries(entries, label_regex, skipped)
    if not kept:
        raise DatasetError(f"{_text(root)}: no images found for layout {layout!r}")
    samples = _identify(kept, hash_index, skipped, root)
    if layout == "none":
        return Dataset(root, layout, [], samples, None, skipped)
    if labels:
        _check_labels(root, layout, samples, label_regex)
    classes = sorted({s.label for s in samples})
    samples, split_made = _split_samples(samples, root, val_fraction, test_fraction, seed, labels)
    return Dataset(root, layout, classes, samples, split_made, skipped)


def _given_paths(path) -> list[Path]:
    """The paths given (``featx:NAME`` resolved), each one existing, absolute."""
    given = list(path) if isinstance(path, (list, tuple)) else [path]
    if not given:
        raise DatasetError("no images given")
    paths = []
    for p in given:
        p = resolve_dataset_path(str(p)) if str(p).startswith(PACKAGE_DATASET_PREFIX) else Path(p).expanduser()
        if not p.exists():
            raise DatasetError(f"{_text(p)}: no such file or folder")
        paths.append(p.resolve())
    return paths


def _layout_of_images(paths: list[Path], root: Path, layout: str, labels: bool) -> str:
    """``none`` for one image or several paths (an error when labels are
    needed, or with another layout); else ``layout`` as given."""
    several = len(paths) > 1 or (root.is_file() and root.suffix.lower() != ".csv")
    if labels and (layout == "none" or several):
        what = "--layout none" if layout == "none" else f"{_text(root)}" if len(paths) == 1 else "a list of images"
        raise DatasetError(f"{what}: images without labels can be extracted, not trained on or evaluated; "
                           "give a folder (CLASS/ folders, train/val/test/ folders, label.N.jpg files) "
                           "or a .csv manifest (path,label[,split])")
    if several:
        if layout not in ("auto", "none"):
            raise DatasetError(f"--layout {layout}: needs one folder or .csv manifest, not "
                               f"{'a single image' if len(paths) == 1 else 'a list of images'}; use --layout none")
        return "none"
    return layout


def _discover(paths: list[Path], root: Path, layout: str, label_regex: str | None, labels: bool,
              walker: _Walker) -> tuple[str, list]:
    """``(layout, [(path, label, split)])``: the layout detected when ``auto``
    (``none`` when, for extraction, the images have no class structure)."""
    auto = layout == "auto"
    if auto:
        layout = detect_layout(root, walker)
    if layout == "csv":
        entries = list(_entries_csv(root))
    elif layout == "split-folders":
        entries = list(_entries_split_folders(root, walker))
    elif layout == "folders":
        entries = list(_entries_folders(root, None, walker))
    elif layout == "filenames":
        entries = list(_entries_filenames(root, label_regex, walker))
    else:
        entries = list(_entries_none(paths, walker))
    if auto and not labels and label_regex is None and layout in ("folders", "filenames"):
        found = Counter(label for p, label, _ in entries if label is not None and _is_image_name(p.name))
        if len(found) < 2 or _mostly_single(found):   # no class structure: images without labels
            layout = "none"
            entries = list(_entries_none(paths, walker))
    return layout, entries


def _image_entries(entries, label_regex: str | None, skipped: list) -> list:
    """The entries that are labelled image files; the others go to ``skipped`` with the reason."""
    kept = []
    for p, label, split in entries:
        if label is None:
            skipped.append((_text(p), "no label in file name" + (f" (regex {label_regex!r})" if label_regex else "")))
        elif not p.exists():
            skipped.append((_text(p), "file not found"))
        elif not _is_image_name(p.name):
            skipped.append((_text(p), f"not an image extension ({_text(p.suffix) or 'none'})"))
        else:
            kept.append((p, label, split))
    return kept


def _identify(kept, hash_index, skipped: list, root: Path) -> list[Sample]:
    """Samples of the kept entries, with their content ids; unreadable files go to ``skipped``."""
    index = HashIndex(hash_index)
    try:
        ids = _hash_all([p for p, _, _ in kept], index)
    finally:
        index.close()
    samples = []
    for (p, label, split), sid in zip(kept, ids):
        if sid is None:
            skipped.append((_text(p), "cannot read file"))
            continue
        samples.append(Sample(p, label, split or "", sid))
    if not samples:
        path0, why = skipped[-1]
        raise DatasetError(f"{_text(root)}: none of its {len(kept)} images could be read (first: {path0}: {why})")
    return samples


def _split_samples(samples: list[Sample], root: Path, val_fraction: float, test_fraction: float, seed: int,
                   labels: bool) -> tuple[list[Sample], dict | None]:
    """``(samples, split_made)``: a stratified split made when there is no test
    split (and a held-out fraction asked for), else unsplit images in train."""
    split_made = None
    has_val = any(s.split == "val" for s in samples)
    if not any(s.split == "test" for s in samples) and (test_fraction > 0 or (not has_val and val_fraction > 0)):
        samples, split_made = _make_split(samples, val_fraction, test_fraction, seed, keep_val=has_val)
    else:
        samples = [s if s.split else Sample(s.path, s.label, "train", s.id) for s in samples]
    if labels and val_fraction == 0 and test_fraction == 0 and not any(s.split in ("val", "test") for s in samples):
        raise ConfigError(f"{_text(root)}: --val-fraction 0 and --test-fraction 0 leave no images to evaluate on "
                          "(the dataset has no val or test split); give one of them a share")
    return samples, split_made


def _make_split(samples, val_fraction, test_fraction, seed, keep_val=False):
    """Stratified, seeded, deterministic split of the unsplit samples.

    The split of an image depends on its content id and the seed only
    (split version 2): copies of one image under other names always share a
    split, and renaming moves nothing. Classes are stratified by distinct
    contents; a content listed under two labels goes with its first label."""
    _check_fractions(val_fraction, test_fraction)
    if keep_val:
        val_fraction = 0.0
    # no test split anywhere: train images are free to be re-assigned
    free = [s for s in samples if not s.split or s.split == "train"]
    label_of: dict[str, str] = {}
    for s in sorted(free, key=lambda s: s.label):
        label_of.setdefault(s.id, s.label)
    by_class: dict[str, list[str]] = {}
    for sid, label in label_of.items():
        by_class.setdefault(label, []).append(sid)
    split_of: dict[str, str] = {}
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda sid: hashlib.blake2b(f"{seed}:{sid}".encode(), digest_size=8).digest())
        n = len(group)
        n_test = min(n - 1, max(1, math.floor(n * test_fraction + 0.5))) if n >= 2 and test_fraction > 0 else 0
        n_val = min(n - 1 - n_test, max(1 if n >= 5 else 0, math.floor(n * val_fraction + 0.5))) if val_fraction > 0 else 0
        for i, sid in enumerate(group):
            split_of[sid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out = [Sample(s.path, s.label, split_of[s.id], s.id) if (not s.split or s.split == "train") else s
           for s in samples]
    made = {"version": SPLIT_VERSION, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "stratified": True}
    return out, made


# --------------------------------------------------------------------------
# sampling

# Share of each class of train held out for validation by :func:`split_train_val`
# when the dataset has no val split (fine-tuning must have images to pick its best epoch on).
HOLD_OUT_VAL_FRACTION = 0.15


def samples_digest(samples: list[Sample]) -> str:
    """Digest of the samples' content ids and labels, in order: which images,
    labelled how (not where they are); blake2b-64, hex."""
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(f"{s.id}\t{s.label}\n".encode())
    return h.hexdigest()


def _order_key(seed: int, s: Sample) -> bytes:
    return hashlib.blake2b(f"{seed}:{s.id}:{s.path.name}".encode(), digest_size=8).digest()


def _by_class(samples: list[Sample], seed: int) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.label, []).append(s)
    return {c: sorted(v, key=lambda s: _order_key(seed, s)) for c, v in sorted(out.items())}


def stratified_take(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` samples with the class proportions of ``samples`` (at least one
    per class), chosen by a seeded hash of their content: deterministic."""
    if n >= len(samples):
        return list(samples)
    groups = _by_class(samples, seed)
    total = len(samples)
    quota = {c: max(1, math.floor(n * len(v) / total)) for c, v in groups.items()}
    rest = sorted(groups, key=lambda c: -(n * len(groups[c]) / total - math.floor(n * len(groups[c]) / total)))
    i = 0
    while sum(quota.values()) < n and rest:
        c = rest[i % len(rest)]
        if quota[c] < len(groups[c]):
            quota[c] += 1
        i += 1
    keep = {s.id + str(s.path) for c, v in groups.items() for s in v[:quota[c]]}
    return [s for s in samples if s.id + str(s.path) in keep]


def split_train_val(ds: Dataset, max_train_images: int | None, seed: int,
                    val_fraction: float = HOLD_OUT_VAL_FRACTION) -> tuple[list[Sample], list[Sample], str]:
    """Fine-tuning's (train samples, val samples, where val came from): the
    val split, else a stratified ``val_fraction`` of each class of train
    held out; train then cut to ``max_train_images`` (:func:`stratified_take`)."""
    train = ds.subset("train") if "train" in ds.splits else []
    if "val" in ds.splits:
        val, source = ds.subset("val"), "val split"
    else:
        groups = _by_class(train, seed + 1)
        held = {id(s) for v in groups.values() if len(v) >= 2
                for s in v[:max(1, math.floor(len(v) * val_fraction + 0.5))]}
        val = [s for s in train if id(s) in held]
        train = [s for s in train if id(s) not in held]
        source = f"{len(val)} train images held out (stratified, {val_fraction:.0%}; the dataset has no val split)"
    if len(train) < 2:
        raise DatasetError(f"{ds.root}: {len(train)} train image(s); fine-tuning needs at least 2")
    if not val:
        raise DatasetError(f"{ds.root}: no images to validate on (no val split and too few train images to hold "
                           "some out)")
    if max_train_images is not None and max_train_images < len(train):
        train = stratified_take(train, max_train_images, seed)
    return train, val, source


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
            raise ImageError(_text(path), "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
            w, h = im.size
            if im.format == "JPEG":
                # DCT scales 1/2, 1/4, 1/8: the smallest that still covers draft_size,
                # and never one whose pixels exceed the budget
                fits = [d for d in (1, 2, 4, 8) if math.ceil(w / d) * math.ceil(h / d) <= MAX_PIXELS]
                wanted = [d for d in fits if draft_size and min(w, h) / d >= draft_size]
                d = max(wanted) if wanted else min(fits, default=1)
                if d > 1:
                    im.draft(None, (math.ceil(w / d), math.ceil(h / d)))
            if im.size[0] * im.size[1] > MAX_PIXELS:
                w, h = im.size
                raise ImageError(_text(path), f"too large to decode: {w}x{h} = {w * h / 1e6:.3g} megapixels, above "
                                              f"featx's budget of {MAX_PIXELS / 1e6:.3g} per image (featx.data.MAX_PIXELS); "
                                              "downscale it")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(_text(path), "not an image (unknown format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(_text(path), f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageError(_text(path), f"truncated image ({msg})") from None
        raise ImageError(_text(path), f"corrupt image ({msg})") from None


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
