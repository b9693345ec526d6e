"""Shared fixtures: small images made on the fly, no network, no ../shared."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")
# Spinning OpenMP threads starve everything else on small shared machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Never the real ~/.cache/featx, even for module-scoped fixtures (featx_home below gives each test its own).
_SESSION_HOME = tempfile.mkdtemp(prefix="featx-home-")
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
os.environ["FEATX_HOME"] = _SESSION_HOME



@pytest.fixture(autouse=True)
def featx_home(tmp_path_factory, monkeypatch):
    """Each test its own per-user folder (exported networks shared by cache
    folders, featx.quantize.shared_store_dir): never the real ~/.cache, and
    no test starts with another's export."""
    home = tmp_path_factory.mktemp("featx-home")
    monkeypatch.setenv("FEATX_HOME", str(home))
    return home


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(path: Path, colour, size=(64, 48), seed=0, fmt=None, noise=30):
    """A solid colour with seeded noise (so every file has distinct content)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture
def folder_dataset(tmp_path):
    """root/CLASS/*.png: 3 classes x 8 images."""
    root = tmp_path / "shapes"
    for ci, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / name / f"{name}_{i}.png", colour, seed=ci * 100 + i)
    return root


def make_split_dataset(root: Path, counts=(6, 2, 3), seed: int = 0, file_name: str = "{i}.jpg") -> Path:
    """root/{train,validation,test}/CLASS/FILE: ``counts`` images per class
    in each split (or ``{split: n}`` for other splits), every one with its
    own seeded noise."""
    if not isinstance(counts, dict):
        counts = dict(zip(("train", "validation", "test"), counts))
    for s, (split, n) in enumerate(counts.items()):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                make_image(root / split / name / file_name.format(name=name, i=i), colour,
                           seed=seed + s * 1000 + c * 100 + i)
    return root


@pytest.fixture
def split_dataset(tmp_path):
    """root/{train,validation,test}/CLASS/*.jpg"""
    return make_split_dataset(tmp_path / "splits")


def pytest_collection_modifyitems(config, items):
    # keep the quick tests first so a broken basic fails fast
    items.sort(key=lambda it: 1 if it.get_closest_marker("slow") else 0)
