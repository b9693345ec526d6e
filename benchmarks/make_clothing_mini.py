"""Build the embedded demo dataset ``featx/datasets/clothing-mini`` from clothing-small.

Usage::

    python benchmarks/make_clothing_mini.py \
        --source ../shared/data/clothing-small --out featx/datasets/clothing-mini

Selection is deterministic: for every (split, class) the source file names are
sorted, then ``random.Random(seed).sample`` (a fresh generator seeded with
``--seed``, default 0, for each split/class pair) picks the files. Each pick is
downscaled so its short side is ``--short-side`` px (Lanczos, aspect kept, never
upscaled) and saved as baseline JPEG (quality 75 by default) without EXIF, ICC
or comments, under its original file name. Quality 75 keeps the 400 images
under 6 MB (5.7 MB); quality 90 would make them 9.6 MB.

Running it again gives the same files: unchanged outputs are not rewritten and
stale images (from another selection) in the output class folders are removed.
The source LICENSE is copied and README.md is regenerated with the counts.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

CLASSES = (
    "dress", "hat", "longsleeve", "outwear", "pants",
    "shirt", "shoes", "shorts", "skirt", "t-shirt",
)
# output split -> (source split folder, images per class)
SPLITS = {
    "train": ("train", 24),
    "val": ("validation", 6),
    "test": ("test", 10),
}
SOURCE_COMMIT = "11961516512414bf9f6c150a832cfd21b54a6b54"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def pick(files: list[str], k: int, seed: int) -> list[str]:
    """Sorted names, then a seeded sample of ``k`` (all of them when fewer)."""
    files = sorted(files)
    if len(files) <= k:
        return files
    return sorted(random.Random(seed).sample(files, k))


def encode(src: Path, short_side: int, quality: int) -> bytes:
    """Downscale ``src`` (short side -> ``short_side``, never up) to JPEG bytes, no metadata."""
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im)  # bake in orientation before EXIF is dropped
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        if s > short_side:
            if w <= h:
                size = (short_side, max(1, round(h * short_side / w)))
            else:
                size = (max(1, round(w * short_side / h)), short_side)
            im = im.resize(size, Image.Resampling.LANCZOS)
        # A fresh image carries no info dict: no EXIF, ICC profile or comment.
        clean = Image.new("RGB", im.size)
        clean.paste(im)
        buf = io.BytesIO()
        clean.save(buf, format="JPEG", quality=quality, optimize=True)
        return buf.getvalue()


def readme_text(counts: dict[str, dict[str, int]], total_bytes: int, args) -> str:
    per_split = {s: sum(c.values()) for s, c in counts.items()}
    rows = "\n".join(
        f"| {c} | " + " | ".join(str(counts[s][c]) for s in SPLITS) + " |" for c in CLASSES
    )
    totals = "| **total** | " + " | ".join(str(per_split[s]) for s in SPLITS) + " |"
    return f"""# clothing-mini

A tiny real-photo dataset shipped inside featx for demos, docs and quick
end-to-end tests: 10 clothing classes, one folder per class, split into
`train/` ({per_split['train']}), `val/` ({per_split['val']}) and `test/` ({per_split['test']}) JPEGs,
{sum(per_split.values())} images and about {total_bytes / 1e6:.1f} MB in all.

| class | train | val | test |
|---|---|---|---|
{rows}
{totals}

## Source and license

Images are a subset of "clothing-dataset-small" published by Alexey Grigorev
(github.com/alexeygrigorev/clothing-dataset-small), commit
`{SOURCE_COMMIT}`, released under
CC0 1.0 Universal (public domain dedication; see `LICENSE`, copied from the
source). No attribution is required; it is given here as a courtesy.

## How it was made

Made by `benchmarks/make_clothing_mini.py` (rerun it to reproduce; it is
idempotent):

    python benchmarks/make_clothing_mini.py --source <clothing-small> --out featx/datasets/clothing-mini

- Splits come from the matching source split (`train`, `validation` -> `val`,
  `test`); up to {SPLITS['train'][1]} / {SPLITS['val'][1]} / {SPLITS['test'][1]} images per class
  (all of them where the source has fewer).
- Selection: source file names sorted, then `random.Random({args.seed}).sample(names, k)`
  with a fresh generator (seed {args.seed}) for each split and class.
- Each image is downscaled so its short side is {args.short_side} px (Lanczos, aspect
  ratio kept, never upscaled), saved as baseline JPEG quality {args.quality} (Pillow,
  optimized Huffman tables, 4:2:0 chroma), with all metadata (EXIF, ICC,
  comments) stripped, under its original file name. Quality {args.quality} was chosen
  to keep the package small (quality 90 makes the same 400 images 9.6 MB).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="clothing-small root (train/validation/test)")
    ap.add_argument("--out", type=Path, required=True, help="output folder, e.g. featx/datasets/clothing-mini")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=75,
                    help="JPEG quality (75 keeps the set under 6 MB; 90 gives 9.6 MB)")
    args = ap.parse_args(argv)

    src, out = args.source, args.out
    for split, (src_split, _) in SPLITS.items():
        for c in CLASSES:
            if not (src / src_split / c).is_dir():
                ap.error(f"missing source folder {src / src_split / c}")

    counts: dict[str, dict[str, int]] = {}
    written = kept = removed = 0
    for split, (src_split, k) in SPLITS.items():
        counts[split] = {}
        for c in CLASSES:
            names = [p.name for p in (src / src_split / c).iterdir()
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            chosen = pick(names, k, args.seed)
            dst_dir = out / split / c
            dst_dir.mkdir(parents=True, exist_ok=True)
            for stale in dst_dir.iterdir():
                if stale.is_file() and stale.name not in chosen:
                    stale.unlink()
                    removed += 1
            for name in chosen:
                data = encode(src / src_split / c / name, args.short_side, args.quality)
                dst = dst_dir / name
                if dst.is_file() and dst.read_bytes() == data:
                    kept += 1
                    continue
                dst.write_bytes(data)
                written += 1
            counts[split][c] = len(chosen)

    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    total = sum(p.stat().st_size for s in SPLITS for p in (out / s).rglob("*") if p.is_file())
    (out / "README.md").write_text(readme_text(counts, total, args), encoding="utf-8")
    n = sum(sum(c.values()) for c in counts.values())
    print(f"{n} images ({', '.join(f'{s} {sum(c.values())}' for s, c in counts.items())}), "
          f"{total / 1e6:.2f} MB of JPEG; written {written}, unchanged {kept}, removed {removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
