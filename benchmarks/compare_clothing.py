"""Reproduce the clothing-small comparison: MobileNetV2 layers x classifiers.

Usage (from the repository root)::

    python benchmarks/compare_clothing.py                            # reuses ./cache
    python benchmarks/compare_clothing.py --cold-cache /tmp/cold     # also times a cold extraction

Runs the ``featx`` CLI as a user would, one step at a time, and times each
step (wall clock, including Python start-up and model loading):

0. ``featx extract``  with ``--cold-cache``: every layer in one pass into an
   empty cache (the extraction cost of a first run)
1. ``featx extract``  every layer in one pass into ``--cache`` (0 images when cached)
2. ``featx compare --refit``  the grid from the cache, every fit done
3. ``featx compare``  the same again: extracts nothing, reuses every fit
4. ``featx train``    the winner, written as a bundle
5. ``featx evaluate`` the bundle on the test split (report files)
6. ``featx predict``  one test class folder, features from the cache

Prints a Markdown report (commands, machine, step times, the comparison
table) and writes it to ``--out`` (default
``benchmarks/results/compare_clothing.md``).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def featx(args: list[str], env: dict) -> tuple[float, str]:
    """Run ``featx ARGS``; returns (seconds, stdout). Fails loudly."""
    cmd = [sys.executable, "-m", "featx.cli", *args]
    print("$ featx " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # progress and notes stream to our stderr as they come; stdout is the result
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"featx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}")
    print(proc.stdout, file=sys.stderr, flush=True)
    return seconds, proc.stdout


def machine() -> str:
    import torch
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average at start {load[0]:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clothing-small"))
    p.add_argument("--cache", default=str(ROOT / "cache"))
    p.add_argument("--cold-cache", default=None, help="an empty folder: time a first extraction there")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--layer", dest="layers", action="append", default=None,
                   help="repeat; default: flatten, features.16, features.14")
    p.add_argument("--classifier", dest="classifiers", action="append", default=None,
                   help="repeat; default: logreg, linear-svm")
    p.add_argument("--jobs", default="-1")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-clothing"), help="folder for the run's outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_clothing.md"))
    a = p.parse_args(argv)
    layers = a.layers or ["flatten", "features.16", "features.14"]
    classifiers = a.classifiers or ["logreg", "linear-svm"]
    runs = Path(a.runs)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    common = ["--cache", a.cache, "-q"]
    grid = ["-b", a.backbone, *sum((["-l", x] for x in layers), []), *sum((["-c", c] for c in classifiers), [])]
    started = machine()

    steps = []
    extract_args = ["extract", a.data, "-b", a.backbone, *sum((["-l", x] for x in layers), [])]
    if a.cold_cache:
        if Path(a.cold_cache).exists() and any(Path(a.cold_cache).iterdir()):
            sys.exit(f"--cold-cache {a.cold_cache}: must be empty or not exist")
        t, out = featx([*extract_args, "--cache", a.cold_cache, "-q"], env)
        steps.append(("extract, cold cache (all layers, one pass)", t, out.splitlines()[0]))
    t, out = featx([*extract_args, *common], env)
    steps.append(("extract (all layers, one pass)", t, out.splitlines()[0]))
    compare_args = ["compare", a.data, *grid, "-j", a.jobs, "--out", str(runs / "compare"), *common]
    t, out = featx([*compare_args, "--refit"], env)
    steps.append((f"compare --refit ({len(layers)} layers x {len(classifiers)} classifiers)", t,
                  f"{len(layers) * len(classifiers)} fits, each with its search over the grid"))
    t, again = featx(compare_args, env)
    steps.append(("compare again", t, "; ".join(again.splitlines()[:2])))

    with open(runs / "compare" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    best = rows[0]
    bundle = runs / "best.featx"
    t, out = featx(["train", a.data, "-b", a.backbone, "-l", best["layer"], "-c", best["classifier"],
                    "--C", best["chosen"], "-j", a.jobs, "-o", str(bundle), *common], env)
    steps.append((f"train winner ({best['layer']}, {best['classifier']}, C={best['chosen']})", t,
                  next(line for line in out.splitlines() if line.startswith("test accuracy"))))
    t, out = featx(["evaluate", str(bundle), a.data, "--split", "test", "--out", str(runs / "evaluate"), *common], env)
    steps.append(("evaluate (test split, report files)", t,
                  next(line for line in out.splitlines() if line.startswith("accuracy")).replace("   ", " ")))
    folder = sorted(p for p in (Path(a.data) / "test").iterdir() if p.is_dir())[0]
    n_images = len([p for p in folder.iterdir() if p.is_file()])
    t, out = featx(["predict", str(bundle), str(folder), "--format", "csv", "--cache", a.cache, "-q"], env)
    steps.append((f"predict ({n_images} images of test/{folder.name}, cached)", t,
                  f"{sum(1 for line in out.splitlines()[1:] if line.split(',')[1] == folder.name)}/{n_images} "
                  f"labelled {folder.name}"))

    table = (runs / "compare" / "compare.md").read_text()
    lines = [
        "# clothing-small: MobileNetV2 features x classifiers",
        "",
        "Reproduce: `python benchmarks/compare_clothing.py"
        + (" --cold-cache /tmp/featx-cold" if a.cold_cache else "")
        + "` (from the repository root, features in ./cache), which runs, besides the other steps below:",
        "",
        "```",
        "featx " + " ".join(shlex.quote(x) for x in compare_args).replace(str(ROOT) + "/", "")
        .replace(a.data, "../shared/data/clothing-small"),
        "```",
        "",
        f"Machine: {started}. Dataset: {a.data.replace(str(ROOT.parent), '..')} (10 classes; "
        "train 3068 / validation 341 / test 372). Selection of C on the validation split; test accuracy on "
        "the test split. Times are wall-clock seconds of each CLI call, Python start-up and model loading "
        "included.",
        "",
        "## Steps",
        "",
        "| step | seconds | result |",
        "|---|---:|---|",
        *[f"| {name} | {sec:.1f} | {res} |" for name, sec, res in steps],
        "",
        "## Comparison (best first)",
        "",
        table.rstrip(),
        "",
        "`fit s` is the final fit of the chosen value (the search over the grid comes before it); "
        "`extract s` is the one pass over the images shared by all layers of a backbone, 0 when cached.",
        "",
    ]
    text = "\n".join(lines)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
