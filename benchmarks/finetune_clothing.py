"""Does a short CPU fine-tune beat the linear probe? clothing-small, MobileNetV2.

    python benchmarks/finetune_clothing.py                          # 800 and 1600 train images
    python benchmarks/finetune_clothing.py --max-train-images 800 --epochs 4

Every model starts from the offline ImageNet MobileNetV2 weights (``--weights auto``):

(a) linear probe: ``featx train`` -- logistic regression on the cached
    penultimate features of ALL train images (C chosen on val);
(b) fine-tunes: ``featx finetune`` on stratified subsets of the train images
    (``--max-train-images``, one run per value), head started from the
    probe fitted on that subset, best epoch chosen on val.

All are scored on the val split (what each selected on, so all are equally
optimistic) and on the test split (untouched by any). Writes
benchmarks/results/finetune_clothing.md with the numbers, the times and
whether the fine-tunes beat the probe. Uses the feature cache ``cache/``.
Each fine-tune checkpoints every epoch: a rerun resumes (or, when finished,
just reloads) it; ``--restart`` trains again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# On a machine shared with other jobs, OpenMP threads that spin while waiting
# for a core make training several times slower; sleeping ones do not. Must be
# set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data" / "clothing-small"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--cache", default=str(ROOT / "cache"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-finetune"), help="bundles and work dirs")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--freeze-epochs", type=int, default=1)
    ap.add_argument("--max-train-images", type=int, nargs="+", default=[800, 1600])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restart", action="store_true", help="do not resume earlier runs of this benchmark")
    ap.add_argument("--results", default=str(HERE / "results" / "finetune_clothing.md"))
    args = ap.parse_args(argv)

    import featx
    from featx.bundle import load_bundle
    from featx.evaluate import evaluate_bundle
    from featx.finetune import finetune
    from featx.train import train

    if not Path(args.data).is_dir():
        print(f"no dataset at {args.data}", file=sys.stderr)
        return 2
    ds = featx.open_dataset(args.data, hash_index=featx.FeatureCache(args.cache).hash_index)
    counts = {s: len(ds.subset(s)) for s in ds.splits}
    print(f"{ds.name}: {counts}, {len(ds.classes)} classes", flush=True)

    # (a) the linear probe on all train images (features cached; extracted when missing)
    t0 = time.perf_counter()
    probe = train(ds, "mobilenet_v2", "logreg", weights="auto", cache=args.cache, progress=False, jobs=1,
                  seed=args.seed)
    probe_s = time.perf_counter() - t0
    probe_val, probe_test = probe.fit.val_score, probe.test["accuracy"]
    print(f"linear probe: C={probe.fit.chosen:g}, val {probe_val:.4f}, test {probe_test:.4f} "
          f"({probe_s:.0f} s, extraction {probe.report.n_extracted} images)", flush=True)

    # (b) the fine-tunes
    runs = []
    for n in args.max_train_images:
        out = Path(args.runs) / f"clothing-mobilenet_v2-{n}.featx"
        t0 = time.perf_counter()
        res = finetune(ds, "mobilenet_v2", out, weights="auto", epochs=args.epochs,
                       freeze_epochs=args.freeze_epochs, max_train_images=n, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, cache=args.cache, restart=args.restart, progress=False,
                       notify=lambda m, n=n: print(f"[{n}] {m}", flush=True))
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_bundle(load_bundle(res.bundle), ds, "test", cache=args.cache, progress=False)
        runs.append({"n": n, "res": res, "wall": wall, "eval_s": time.perf_counter() - t0,
                     "test": ev.metrics["accuracy"], "epochs_s": sum(r["seconds"] for r in res.history)})
        print(f"[{n}] fine-tune: best epoch {res.best_epoch}, val {res.best_val_acc:.4f} "
              f"(start {res.start_val_acc:.4f}), test {ev.metrics['accuracy']:.4f} ({wall:.0f} s)", flush=True)

    def verdict(r):
        v, t = r["res"].best_val_acc, r["test"]
        if v > probe_val:
            return (f"fine-tune on {r['n']} images **beat** the linear probe on val ({v:.4f} vs {probe_val:.4f})"
                    + (f" and on test ({t:.4f} vs {probe_test:.4f})" if t > probe_test
                       else f", not on test ({t:.4f} vs {probe_test:.4f})"))
        return (f"fine-tune on {r['n']} images **did NOT beat** the linear probe on val ({v:.4f} vs {probe_val:.4f})"
                + (f"; on test it did ({t:.4f} vs {probe_test:.4f})" if t > probe_test
                   else f" nor on test ({t:.4f} vs {probe_test:.4f})"))

    table = [f"| linear probe (`featx train -c logreg`, C={probe.fit.chosen:g} chosen on val) | {counts.get('train')} (all) "
             f"| {probe_val:.4f} | {probe_test:.4f} | {probe_s:.0f} s (features "
             f"{'cached' if probe.report.n_extracted == 0 else f'extracted: {probe.report.n_extracted} images'}) |"]
    for r in runs:
        res = r["res"]
        resumed = f", resumed after epoch {res.resumed_from}" if res.resumed_from is not None else ""
        table.append(f"| linear probe on the same {res.n_train} images (fine-tune's epoch 0) | {res.n_train} "
                     f"| {res.start_val_acc:.4f} | - | (inside the fine-tune) |")
        table.append(f"| **fine-tune** (`featx finetune --max-train-images {r['n']}`, best epoch {res.best_epoch}) "
                     f"| {res.n_train} | {res.best_val_acc:.4f} | {r['test']:.4f} | {r['epochs_s']:.0f} s over its "
                     f"epochs ({r['wall']:.0f} s wall in the last invocation{resumed}) |")
    sections = []
    for r in runs:
        res = r["res"]
        m = res.manifest["finetune"]
        rows = "\n".join(
            f"| {h['epoch']} | {h['stage']} | {_num(h['train_loss'])} | {_num(h['train_acc'])} | {_num(h['val_loss'])} "
            f"| {_num(h['val_acc'])} | {', '.join(f'{x:.2g}' for x in h['lrs']) or '-'} | {h['seconds']:.0f} |"
            for h in res.history)
        sections.append(f"""### {r['n']} train images

Start: {m['start']['start']} ({m['start']['reason']}). {m['bn_rule']}.{' Stopped early.' if m['stopped_early'] else ''}

| epoch | stage | train loss | train acc | val loss | val acc | lr stem..head (epoch end) | s |
|---|---|---|---|---|---|---|---|
{rows}
""")
    cfg = runs[0]["res"].manifest["finetune"]["config"] if runs else {}
    sizes = " ".join(str(n) for n in args.max_train_images)
    md = f"""# Fine-tune vs linear probe: clothing-small, MobileNetV2 (offline ImageNet weights), CPU

Reproduce: `python benchmarks/finetune_clothing.py --max-train-images {sizes} --epochs {args.epochs}`
(each fine-tune resumes from its checkpoint in runs/bench-finetune/; `--restart` trains again).

{chr(10).join('- ' + verdict(r) + '.' for r in runs)}

| model | train images | val acc | test acc | time |
|---|---|---|---|---|
{chr(10).join(table)}

Val accuracy is what each model selected on (C for the probe, the epoch for a fine-tune), so
the val numbers are mildly optimistic; test accuracy ({counts.get('test')} images) is untouched by any.
The probe trains on all {counts.get('train')} train images, each fine-tune on a stratified subset:
the rows "linear probe on the same N images" show what the fine-tune added at equal data.

Fine-tune settings: {args.epochs} epochs ({cfg.get('freeze_epochs')} head-only), batch {cfg.get('batch_size')},
{cfg.get('optimizer')} peak lr {cfg.get('lr', 0):g} (stem {cfg.get('lr', 0) / cfg.get('lr_mult', 1):g}, {cfg.get('lr_groups')} backbone groups),
weight decay {cfg.get('weight_decay', 0):g}, one-cycle warm-up {cfg.get('warmup', 0):.0%}, augment {cfg.get('augment')}, seed {cfg.get('seed')}.

{chr(10).join(sections)}
Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other
jobs while this ran: times are wall-clock and noisy. torch {torch.__version__}, {torch.get_num_threads()} threads,
OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, device cpu. A run that was stopped and resumed has its
epochs timed in two processes, possibly under different load.
"""
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(md)
    print(json.dumps({"probe_val": probe_val, "probe_test": probe_test,
                      "finetunes": [{"n": r["n"], "val": r["res"].best_val_acc, "test": r["test"],
                                     "best_epoch": r["res"].best_epoch, "seconds": r["epochs_s"]} for r in runs]}))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
