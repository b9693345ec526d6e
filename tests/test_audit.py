"""featx audit: duplicates (exact, near, leaks), label issues, outliers, the report, the leak warnings.

Images are generated (random shapes, so different files are different
photos), features come from a random-init resnet18: no network, no ../shared.
"""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageOps

import featx
from featx.audit import (DUPLICATE_COLUMNS, LABEL_COLUMNS, OUTLIER_COLUMNS, _duplicates, _label_issues, _normalise,
                         _similar_pairs_and_knn, check_leaks, split_leaks, without_leaks)
from featx.cli import cli
from featx.data import Sample

from .conftest import COLOURS, make_split_dataset

FAST = ["-b", "resnet18", "-w", "none", "--batch-size", "16", "-q"]
NEAR = 0.9995


def shapes_image(path: Path, colour, seed: int, size=(96, 96)):
    """A photo-like image: a tinted background and random shapes of the class colour."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        w, h = rng.integers(10, 50, 2)
        shade = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in colour)
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=shade)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95)
    return path


def near_copy(src: Path, dst: Path, flip: bool = False):
    """Resized to 80%, 5% cropped off the borders, re-encoded as JPEG 75 (and mirrored)."""
    im = Image.open(src).convert("RGB")
    im = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.Resampling.BILINEAR)
    dx, dy = int(im.width * 0.025), int(im.height * 0.025)
    im = im.crop((dx, dy, im.width - dx, im.height - dy))
    if flip:
        im = ImageOps.mirror(im)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst, quality=75)
    return dst


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = root / "shapes"
    for s, (split, n) in enumerate((("train", 10), ("validation", 3), ("test", 4))):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                shapes_image(data / split / name / f"{name}{i}.jpg", colour, seed=s * 1000 + c * 100 + i)
    # an exact copy of a test image in train (a leak), under another name
    shutil.copy(data / "test" / "red" / "red0.jpg", data / "train" / "red" / "copy_of_test.jpg")
    # a near copy within train
    near_copy(data / "train" / "green" / "green1.jpg", data / "train" / "green" / "green1_small.jpg")
    # a flat placeholder with text, filed as a class (issue 19 item 5)
    im = Image.new("RGB", (96, 96), (200, 200, 200))
    ImageDraw.Draw(im).text((8, 40), "image not found", fill=(90, 90, 90))
    im.save(data / "train" / "green" / "imageNotFound.gif")
    # a hostile file name
    shutil.copy(data / "train" / "blue" / "blue3.jpg", data / "test" / "blue" / "<script>alert(1)&.jpg")
    out = root / "out"
    # a random-init network tells photos apart far less than a pretrained one: distinct generated
    # images reach cosine 0.9984 here, the near copy 0.9999 (pretrained MobileNetV2: 0.95, see the README)
    r = CliRunner().invoke(cli, ["audit", str(data), *FAST, "--near-threshold", str(NEAR), "--cache", str(root / "cache"),
                                 "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    read = {name: list(csv.DictReader((out / f"{name}.csv").open())) for name in
            ("duplicates", "label_issues", "outliers")}
    return {"root": root, "data": data, "out": out, "result": r, "csv": read}


def _groups(rows):
    out = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    return list(out.values())


def test_csv_columns_as_specified(audited):
    for name, columns in (("duplicates", DUPLICATE_COLUMNS), ("label_issues", LABEL_COLUMNS),
                          ("outliers", OUTLIER_COLUMNS)):
        with (audited["out"] / f"{name}.csv").open() as f:
            assert next(csv.reader(f)) == columns
    assert DUPLICATE_COLUMNS == ["group", "path", "split", "label", "kind", "similarity"]
    assert LABEL_COLUMNS == ["path", "split", "label", "suggested", "confidence", "rank"]


def test_exact_and_near_duplicates_found_leaks_first(audited):
    groups = _groups(audited["csv"]["duplicates"])
    names = [sorted(Path(r["path"]).name for r in g) for g in groups]
    assert ["copy_of_test.jpg", "red0.jpg"] in names
    assert ["green1.jpg", "green1_small.jpg"] in names
    assert ["<script>alert(1)&.jpg", "blue3.jpg"] in names
    exact = groups[names.index(["copy_of_test.jpg", "red0.jpg"])]
    assert {r["kind"] for r in exact} == {"exact"} and {r["split"] for r in exact} == {"train", "test"}
    near = groups[names.index(["green1.jpg", "green1_small.jpg"])]
    assert {r["kind"] for r in near} == {"near"} and all(NEAR <= float(r["similarity"]) < 1 for r in near)
    # no other group: different generated images of one class are not near duplicates
    assert len(groups) == 3
    # groups spanning splits (the two exact copies) come first
    spans = [len({r["split"] for r in g}) > 1 for g in groups]
    assert spans == [True, True, False]


def test_placeholder_image_is_the_first_outlier(audited):
    outliers = audited["csv"]["outliers"]
    assert outliers and Path(outliers[0]["path"]).name == "imageNotFound.gif"
    assert outliers[0]["rank"] == "1" and outliers[0]["label"] == "green"


def test_summary_counts_and_the_fix_command(audited):
    lines = audited["result"].stdout.splitlines()
    assert lines[1] == "duplicates: 2 exact and 1 near groups (cosine >= 0.9995); 2 span splits (leaks, 4 images)"
    assert lines[3].startswith("outliers: ") and not lines[3].startswith("outliers: 0 ")
    fix = next(line for line in lines if line.startswith("fix the first leak: "))
    # the first leak group keeps its train copy and removes the other split's one
    first = _groups(audited["csv"]["duplicates"])[0]
    drop = [r["path"] for r in first if r["split"] != "train"]
    assert fix.startswith("fix the first leak: rm ") and all(Path(p).name in fix for p in drop)
    assert "fix the first outlier: rm " in audited["result"].stdout and "imageNotFound.gif" in lines[-2] + lines[-3]


def test_html_is_self_contained_and_escapes_hostile_names(audited):
    page = (audited["out"] / "audit.html").read_text()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&amp;.jpg" in page
    assert page.count('src="data:image/jpeg;base64,') >= 9
    assert page.index("Leaks: duplicates across splits") < page.index("Duplicates within a split") \
        < page.index("Label issues") < page.index("Outliers")


def test_python_api_returns_the_three_tables(audited):
    result = featx.audit(audited["data"], "resnet18", weights="none", near_threshold=NEAR,
                         cache=audited["root"] / "cache", progress=False)
    assert len(result.duplicates) == len(audited["csv"]["duplicates"])
    assert [r["path"] for r in result.outliers] == [r["path"] for r in audited["csv"]["outliers"]]
    assert set(result.label_issues[0]) >= set(LABEL_COLUMNS) if result.label_issues else True
    assert result.settings["near_threshold"] == NEAR


def test_near_groups_on_features_copies_in_distinct_not():
    rng = np.random.default_rng(1)
    base = np.abs(rng.normal(0, 1, (40, 64)))            # non-negative, as pooled ReLU features
    copies = base[:3] + np.abs(rng.normal(0, 0.05, (3, 64)))
    Z = _normalise(np.vstack([base, copies]))
    pairs, knn = _similar_pairs_and_knn(Z, 0.95, 5, block=7)       # blocks smaller than the rows
    assert sorted((a, b) for a, b, _ in pairs) == [(0, 40), (1, 41), (2, 42)]
    samples = [Sample(Path(f"{i}.jpg"), "x", "train" if i < 40 else "test", f"u{i}") for i in range(43)]
    rows, _ = _duplicates(samples, {s.id: i for i, s in enumerate(samples)}, pairs)
    assert [r["group"] for r in rows] == [1, 1, 2, 2, 3, 3] and all(r["leak"] and r["kind"] == "near" for r in rows)
    assert knn.shape == (43,) and knn[40:].max() < np.median(knn[3:40])


def test_planted_mislabel_is_ranked_first_on_separable_features():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    centres = rng.normal(0, 1, (3, 16)) * 4
    samples, rows = [], []
    for c in range(3):
        for i in range(30):
            label = classes[c]
            if (c, i) == (1, 7):
                label = "c"                       # planted: a "b" point labelled c
            samples.append(Sample(Path(f"{classes[c]}{i}.jpg"), label, "train", f"id{c}-{i}"))
            rows.append(centres[c] + rng.normal(0, 1, 16))
    X = np.array(rows, dtype=np.float32)
    _, _, issues = _label_issues(samples, X, classes, np.arange(len(samples)), "auto", 5, 0)
    assert issues[0]["path"] == "b7.jpg" and issues[0]["label"] == "c" and issues[0]["suggested"] == "b"
    assert issues[0]["rank"] == 1 and issues[0]["confidence"] > 0.5


def test_split_leaks_and_dropping_them(tmp_path):
    data = make_split_dataset(tmp_path / "d", counts=(4, 2, 2))
    shutil.copy(data / "train" / "red" / "0.jpg", data / "test" / "red" / "leak.jpg")
    shutil.copy(data / "train" / "blue" / "1.jpg", data / "validation" / "blue" / "leak.jpg")
    ds = featx.open_dataset(data)
    leaks = split_leaks(ds)
    assert sorted((s.split, s.path.name) for s in leaks) == [("test", "leak.jpg"), ("val", "leak.jpg")]
    lines = []
    assert check_leaks(ds, notify=lines.append) is ds
    assert len(lines) == 1 and lines[0].startswith("warning: 2 evaluation images are exact copies of training images "
                                                   "(1 in val, 1 in test)")
    clean = without_leaks(ds)
    assert len(clean) == len(ds) - 2 and not split_leaks(clean) and len(clean.leaks_dropped) == 2


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaky")
    data = make_split_dataset(root / "colours", file_name="{name}{i}.jpg")
    for i in range(3):
        shutil.copy(data / "train" / "green" / f"green{i}.jpg", data / "test" / "green" / f"dup{i}.jpg")
    return {"data": data, "cache": root / "cache", "root": root}


def test_compare_warns_in_one_line_with_the_count(leaky):
    r = CliRunner().invoke(cli, ["compare", str(leaky["data"]), *FAST, "-j", "1", "--cache", str(leaky["cache"]),
                                 "-o", str(leaky["root"] / "cmp")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if "exact copies" in line]
    assert warned == [f"warning: 3 evaluation images are exact copies of training images (3 in test): their scores are "
                      f"inflated; `featx audit {leaky['data']}` lists them, --drop-leaks leaves them out"]
    rows = list(csv.DictReader((leaky["root"] / "cmp" / "compare.csv").open()))
    assert rows


def test_train_drop_leaks_evaluates_without_them(leaky):
    r = CliRunner().invoke(cli, ["train", str(leaky["data"]), *FAST, "-j", "1", "--cache", str(leaky["cache"]),
                                 "--drop-leaks", "-o", str(leaky["root"] / "m.featx")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert any(line.startswith("dropped 3 evaluation images that are exact copies of training images (3 in test; "
                               "--drop-leaks)") for line in r.stderr.splitlines())
    assert "(9 images)" in r.stdout          # 12 test images, 3 of them copies of train ones
    import json
    manifest = json.loads((leaky["root"] / "m.featx" / "manifest.json").read_text())
    assert sum(manifest["training"]["counts"]["test"].values()) == 9


def test_audit_without_labels_is_one_line_error(tmp_path):
    for i in range(3):
        shapes_image(tmp_path / "loose" / f"x{i}.jpg", (10, 10, 10), seed=i)
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "loose"), *FAST, "--cache", str(tmp_path / "c"),
                                 "--layout", "none"])
    assert r.exit_code != 0 and "Error:" in r.output and len(r.output.strip().splitlines()) <= 2


def test_no_rm_is_offered_when_the_features_cannot_tell_images_apart():
    from types import SimpleNamespace

    from featx.audit import fix_commands
    rows = [{"group": 1, "path": f"/d/train/a/{i}.jpg", "split": "train", "label": "a", "kind": "near",
             "similarity": 0.9999, "leak": True} for i in range(30)]
    result = SimpleNamespace(dataset=list(range(40)), duplicates=rows, label_issues=[], outliers=[])
    fix = fix_commands(result)["duplicates"]
    assert fix.startswith("none: one group holds 30 of 40 images") and "rm " not in fix
