"""`featx audit` on a corrupted copy of clothing-small: are the planted problems found?

Usage (from the repository root)::

    python benchmarks/audit_clothing.py [--data ../shared/data/clothing-small] [--cache cache]

Builds the corrupted copy itself (seeded) in a temporary folder:

* 5% of the train images moved into a wrong class folder (label errors);
* 30 test images copied into train (same class) after a resize to 70%, a
  5% crop and a JPEG re-encode at quality 75 (near-duplicate leaks).

Then runs ``featx audit -b mobilenet_v2`` twice with ``--cache`` (the
planted copies are new content, extracted by the first run; the moved files
keep their content ids) and once with an empty cache (cold), and reports:
the share of planted label errors in the top K of label_issues.csv (K = 2x
the number planted), the planted near-duplicates found (copy and original
in one group), the near-duplicate groups among the clean images, and the
wall time of each run (the whole command: Python start-up and model
loading included). Writes Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(src: Path, dst: Path, seed: int = 0, share: float = 0.05, n_copies: int = 30):
    from PIL import Image
    shutil.copytree(src, dst)
    rng = random.Random(seed)
    train = sorted(p for p in (dst / "train").glob("*/*") if p.is_file())
    classes = sorted(p.name for p in (dst / "train").iterdir() if p.is_dir())
    moved = {}
    for p in rng.sample(train, round(share * len(train))):
        wrong = rng.choice([c for c in classes if c != p.parent.name])
        target = dst / "train" / wrong / p.name
        p.rename(target)
        moved[str(target)] = p.parent.name
    copies = {}
    tests = sorted(p for p in (dst / "test").glob("*/*") if p.is_file())
    for n, p in enumerate(rng.sample(tests, n_copies)):
        im = Image.open(p).convert("RGB")
        im = im.resize((int(im.width * 0.7), int(im.height * 0.7)), Image.Resampling.BILINEAR)
        dx, dy = int(im.width * 0.025), int(im.height * 0.025)
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
        target = dst / "train" / p.parent.name / f"planted_copy_{n}.jpg"
        im.save(target, quality=75)
        copies[str(target)] = str(p)
    return moved, copies


def audit(data: Path, cache: Path, out: Path) -> tuple[float, str]:
    args = ["audit", str(data), "-b", "mobilenet_v2", "--cache", str(cache), "-o", str(out), "-q"]
    print("$ featx " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"featx audit failed ({proc.returncode}):\n{proc.stdout}")
    return seconds, proc.stdout


def score(out: Path, moved: dict, copies: dict) -> dict:
    issues = list(csv.DictReader((out / "label_issues.csv").open()))
    k = 2 * len(moved)
    top = {r["path"] for r in issues[:k]}
    dups = list(csv.DictReader((out / "duplicates.csv").open()))
    group_of = {r["path"]: r["group"] for r in dups}
    found = sum(1 for c, o in copies.items() if c in group_of and group_of.get(o) == group_of[c])
    planted = set(copies) | set(copies.values())
    groups = {}
    for r in dups:
        groups.setdefault(r["group"], []).append(r)
    clean = [g for g in groups.values() if not any(r["path"] in planted for r in g) and any(r["kind"] == "near" for r in g)]
    corrected = sum(1 for r in issues[:k] if r["path"] in moved and r["suggested"] == moved[r["path"]])
    return {"k": k, "in_top_k": len(top & set(moved)), "suggested_right": corrected, "issues": len(issues),
            "copies_found": found, "clean_near_groups": clean,
            "outliers": sum(1 for _ in csv.DictReader((out / "outliers.csv").open()))}


def _member(r: dict) -> str:
    p = Path(r["path"])
    return f"{p.parent.name}/{p.name} ({r['kind']} {r['similarity']})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clothing-small"))
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audit_clothing.md"))
    ap.add_argument("--no-cold", action="store_true", help="Skip the run with an empty cache.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="featx-audit-") as tmp:
        data = Path(tmp) / "clothing-corrupted"
        moved, copies = build(Path(args.data), data)
        first, _ = audit(data, Path(args.cache), Path(tmp) / "out1")
        warm, stdout = audit(data, Path(args.cache), Path(tmp) / "out")
        s = score(Path(tmp) / "out", moved, copies)
        cold = None if args.no_cold else audit(data, Path(tmp) / "cold-cache", Path(tmp) / "out-cold")[0]
    cpu = platform.processor() or platform.machine()
    lines = [
        "# featx audit on a corrupted clothing-small",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Command: `python benchmarks/audit_clothing.py --cache {args.cache}`, which runs "
        "`featx audit DATA -b mobilenet_v2 --cache CACHE -o OUT -q` (MobileNetV2 `flatten`, default settings).",
        "",
        f"Corruption (seed 0): {len(moved)} of the train images (5%) moved into a wrong class folder; "
        f"{len(copies)} test images copied into train after a resize to 70%, a 5% crop and JPEG quality 75.",
        "",
        "| measure | result | goal |",
        "|---|---|---|",
        f"| planted label errors in the top {s['k']} of label_issues.csv | {s['in_top_k']} of {len(moved)} "
        f"({100 * s['in_top_k'] / len(moved):.0f}%); the suggestion names the true class for {s['suggested_right']} "
        f"| >= 60% |",
        f"| planted near-duplicates found (copy and original in one group) | {s['copies_found']} of {len(copies)} "
        f"({100 * s['copies_found'] / len(copies):.0f}%) | >= 90% |",
        f"| near-duplicate groups among the clean images | {len(s['clean_near_groups'])} | - |",
        f"| wall time, features cached | {warm:.1f} s | < 30 s |",
        f"| wall time, first run (only the 30 planted copies extracted) | {first:.1f} s | - |",
        f"| wall time, cold (empty cache: {3781 + len(copies)} images extracted) | "
        f"{'-' if cold is None else f'{cold:.1f} s'} | - |",
        "",
        f"label_issues.csv lists {s['issues']} images in all; outliers.csv {s['outliers']}.",
        "",
        "Near-duplicate groups among the clean images (every path):",
        "",
        *["- " + ", ".join(_member(r) for r in g) for g in s["clean_near_groups"]],
        "",
        "Summary printed by the cached run:",
        "",
        "```",
        *[line.replace(str(data), "DATA") for line in stdout.splitlines()],
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
