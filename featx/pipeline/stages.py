"""Running a pipeline: the extract, train, finetune, evaluate and report
stages, each doing what the plan says and recording it in the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .load import FINETUNE_ARGS, Pipeline
from .plan import (Plan, PlanItem, _Candidate, _check_force, _digest, _feature_sets, _file_sha, _plain_json,
                   _plan_evaluate_report, choose_best, fit_model_id, fit_settings, plan_pipeline, train_item)
from .summary import shown
from .toml_write import dump_toml


@dataclass
class RunResult:
    """What a run did and where its results are."""

    pipeline: Pipeline
    out_dir: Path
    rows: list                     # ComparisonRow, ranked as the comparison table shows them
    best: dict                     # label, model_id, row, bundle
    metrics: dict                  # evaluation of the best model (featx.evaluate.evaluate_bundle)
    events: list[PlanItem]         # every stage item with what was done: computed / cached / reused / skipped
    report: Path | None
    seconds: float = 0.0
    dry_run: bool = False

    def count(self, *actions) -> int:
        return sum(1 for e in self.events if e.action in actions)


def _engine(p: Pipeline, notify):
    """Context manager yielding the extract function for [engine] (:func:`featx.distributed.engine`)."""
    from .. import distributed
    e = p.engine
    return distributed.engine(e["kind"], e["scheduler"], shard_size=e["shard_size"], notify=notify)


def _write_folder_atomically(dst: Path, fill):
    """``fill(tmp)`` writes a new folder beside ``dst``, which then replaces ``dst`` in one rename."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_pipeline(p: Pipeline, *, cache=None, force=(), progress: bool = True, notify=None,
                 dry_run: bool = False) -> RunResult | Plan:
    """Run the stages of ``p`` that need running; reuse the rest.

    ``notify(line)`` receives the progress lines (stage by stage; extraction
    and fine-tuning also draw their own progress bars unless ``progress`` is
    False). ``force``: stages to redo (``all`` for every one). With
    ``dry_run`` the :class:`Plan` is returned and nothing is written.
    """
    from filelock import FileLock, Timeout
    t0 = time.perf_counter()
    notify = notify or (lambda msg: None)
    force = _check_force(force)
    plan = plan_pipeline(p, cache, force)
    if dry_run:
        return plan
    out = p.out_dir
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".featx-run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        notify(f"waiting for another `featx run` writing {out}")
        lock.acquire()
    try:
        plan = plan_pipeline(p, cache, force, dataset=plan.dataset)   # the other run may have done work
        return _execute(plan, progress, notify, t0)
    finally:
        lock.release()


def _execute(plan: Plan, progress: bool, notify, t0: float) -> RunResult:
    from ..cache import FeatureCache
    from ..files import atomic_write_text
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    out = p.out_dir
    cache = FeatureCache(plan.cache_dir)
    header = (f"resolved from {p.path.resolve()} by featx on {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              "paths are absolute; every default that has a value is written out")
    atomic_write_text(out / "pipeline.toml", dump_toml(p.resolved(), header))
    splits = ", ".join(f"{s} {len(ds.subset(s))}" for s in ds.splits)
    notify(f"dataset {ds.name}: {len(ds)} images, {len(ds.classes)} classes ({splits})")
    for path, reason in ds.skipped:
        notify(f"skipped {path}: {reason}")
    events: list[PlanItem] = []

    with _engine(p, notify) as extract_fn:
        _stage_extract(plan, cache, extract_fn, progress, notify, events)
        candidates = _stage_train(plan, cache, notify, events)
        ft = _stage_finetune(plan, progress, notify, events)
    if ft is not None:
        candidates.append(ft)
    best = choose_best(candidates)
    ev_item, rep_item = _plan_evaluate_report(p, manifest, plan.train, plan.finetune, plan.data_digest,
                                              plan.force, best=best)
    metrics = _stage_evaluate(plan, ev_item, best, cache, progress, notify, events)
    rows = _comparison_rows(candidates, best)
    report = _stage_report(plan, rep_item, best, rows, metrics, notify, events)
    return RunResult(p, out, rows, {"label": best.label, "model_id": best.model_id, "row": best.row,
                                    "bundle": out / p.output["bundle"]},
                     metrics, events, report, time.perf_counter() - t0)


def _stage_extract(plan: Plan, cache, extract_fn, progress, notify, events):
    from ..extract import RunOptions
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    for bb in plan.backbones:
        todo = [i for i in bb.items if i.action == "compute"]
        layers = ", ".join(s.layer for s in bb.specs)
        if not todo:
            for i in bb.items:
                notify(f"[extract] {i.name}: cached ({i.detail})")
                events.append(dataclasses.replace(i, action="cached"))
            continue
        if "extract" in plan.force:
            for spec in bb.specs:
                if cache.path(spec.key).exists() or cache.parts_dir(spec.key).is_dir():
                    notify(f"[extract] --force extract: dropping cache entry {spec.key}")
                    cache.remove(spec.key)
        notify(f"[extract] {bb.config['name']} ({bb.rw.name}): {layers} in one pass")
        e = p.engine
        run = RunOptions(device=e["device"], runtime=e["runtime"], compile=e["compile"], batch_size=e["batch_size"],
                         workers=e["workers"], progress=progress)
        report = extract_fn(ds, bb.ready, run, cache=cache, notify=notify)
        if [s.key for s in report.specs] != [s.key for s in bb.specs]:   # int8 fell back to fp32
            bb.specs = list(report.specs)
            bb.items = [dataclasses.replace(i, key=s.key) for i, s in zip(bb.items, bb.specs)]
        bad = {str(path): reason for path, reason in report.skipped}
        unreadable = {s.id: bad[str(s.path)] for s in ds.samples if str(s.path) in bad}
        for spec, item in zip(bb.specs, bb.items):
            record = manifest.data["extract"].setdefault(spec.key, {})
            record.update({"spec": spec.canonical(), "unreadable": {**record.get("unreadable", {}), **unreadable}})
            if report.n_extracted:
                record["seconds"] = report.seconds      # one pass for all layers of the backbone
            done = "computed" if item.action == "compute" else "cached"
            events.append(dataclasses.replace(item, action=done))
        rate = f" ({report.images_per_second:.1f} img/s on {report.where})" if report.n_extracted else ""
        notify(f"[extract] {bb.config['name']}: extracted {report.n_extracted} images in {report.seconds:.1f} s{rate}; "
               f"{report.n_cached} were cached" + (f"; {len(report.skipped)} unreadable" if report.skipped else ""))
        for path, reason in report.skipped:
            notify(f"skipped {path}: {reason}")
        manifest.save()


def _stage_train(plan: Plan, cache, notify, events) -> list[_Candidate]:
    """Fit every feature set x classifier, through the fit store that
    ``featx compare`` shares: an identical fit made by either is reused.

    A feature set extracted by this run is planned again first: its rows
    (and so its fits' digests) are known only now. ``plan.train`` ends with
    every item's key."""
    from ..train import FitStore, split_features
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    _notify_leaks(p, ds, notify)
    extracted = {i.key for bb in plan.backbones for i in bb.items if i.action == "compute"}
    store = FitStore(cache)
    candidates = []
    n = 0
    for fset in _feature_sets(plan.backbones, p.classifiers["_fused"]):
        data = None
        for name in p.classifiers["names"]:
            item = plan.train[n]
            if any(part.key in extracted for part in fset.parts):
                data = split_features(cache, fset, ds) if data is None else data
                item = train_item(p, store, fset, data, name, manifest, plan.force)
            n += 1
            at = f"[train {n}/{len(plan.train)}] {item.name}"
            if item.action == "reuse":
                record = manifest.data["train"][item.key]
                notify(f"{at}: reused {record['file']} ({_score_text(record['row'])})")
                events.append(dataclasses.replace(item, action="reused"))
            else:
                data = split_features(cache, fset, ds) if data is None else data
                record = _fit(plan, store, cache, fset, data, name, at, notify)
                item = dataclasses.replace(item, key=fit_model_id(fset, name, record["digest"]))
                events.append(dataclasses.replace(item, action="computed"))
            plan.train[n - 1] = item
            candidates.append(_Candidate.from_record(item.key, record, order=n))
    return candidates


def _notify_leaks(p: Pipeline, ds, notify):
    from ..audit import leak_message, split_leaks
    leaks, dropped = split_leaks(ds), getattr(ds, "leaks_dropped", [])
    if leaks or dropped:
        notify("[train] " + leak_message(dropped or leaks, str(p.dataset["root"]), "[evaluate] drop_leaks = true",
                                         dropped=bool(dropped)))


def _fit(plan: Plan, store, cache, fset, data, name: str, at: str, notify) -> dict:
    """One fit (or the fit store's identical one), its model kept as
    ``models/MODEL_ID/`` and its record in the manifest under MODEL_ID
    (:func:`fit_model_id` of its digest); returns the record."""
    from .. import safemodel
    from ..classify import _fmt_value
    from ..train import fit_or_reuse
    p, manifest = plan.pipeline, plan.manifest
    seconds = [(manifest.data["extract"].get(s.key) or {}).get("seconds") for s in fset.parts]
    extract_seconds = None if all(x is None for x in seconds) else sum(x or 0.0 for x in seconds)
    fitted, pipe, reused = fit_or_reuse(store, cache, fset, data, plan.dataset.classes, name, jobs=p.engine["jobs"],
                                        extract_seconds=extract_seconds, need_model=True, **fit_settings(p, name))
    model_id = fit_model_id(fset, name, fitted["digest"])
    file = f"models/{model_id}/model.json"
    _write_folder_atomically(p.out_dir / "models" / model_id, lambda tmp: safemodel.save(pipe, tmp))
    record = _plain_json({**fitted, "file": file, "sha256": _file_sha(p.out_dir / file),
                          "spec": fset.parts[0].canonical(), "key": fset.key})
    manifest.data["train"][model_id] = record
    manifest.save()
    f, r = record["fit"], record["row"]
    how = "reused an identical fit from the fit store" if reused else f"fit {r['fit_seconds']:.2f} s"
    notify(f"{at}: {f['param_name']}={_fmt_value(f['chosen'])}, {_score_text(r)}, {how}")
    return record


def _score_text(r: dict) -> str:
    score = "-" if r.get("val_or_cv_score") is None else f"{r['val_or_cv_score']:.4f}"
    test = "-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.4f}"
    return f"{r.get('score_source') or 'score'} {score}, test {test}"


def _stage_finetune(plan: Plan, progress, notify, events) -> _Candidate | None:
    item = plan.finetune
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    if item.action == "skip":
        events.append(dataclasses.replace(item, action="skipped"))
        return None
    bundle = p.out_dir / "finetune.featx"
    if item.action == "reuse":
        record = manifest.data["finetune"]
        notify(f"[finetune] {item.name}: reused finetune.featx ({_score_text(record['row'])})")
        events.append(dataclasses.replace(item, action="reused"))
        return _Candidate.from_finetune(record)
    from ..bundle import load_bundle
    from ..classify import ComparisonRow
    from ..evaluate import evaluate_bundle
    from ..finetune import finetune
    ft, e = p.finetune, p.engine
    notify(f"[finetune] {item.name}")
    result = finetune(ds, ft["backbone"], bundle, weights=ft["weights"], resolved=ft.get("_weights"),
                      **{k: ft[k] for k in FINETUNE_ARGS if ft[k] is not None},
                      device=e["device"], seed=p.dataset["seed"], workers=e["workers"], cache=plan.cache_dir,
                      work_dir=p.out_dir / "finetune.work", restart="finetune" in plan.force,
                      progress=progress, notify=notify)
    if getattr(result, "interrupted", False):
        raise KeyboardInterrupt
    loaded = load_bundle(bundle)
    test = None
    if "test" in ds.splits:
        test = evaluate_bundle(loaded, ds, "test", cache=plan.cache_dir, progress=progress, notify=notify,
                               device=e["device"]).metrics
    row = ComparisonRow(ft["backbone"], "(fine-tuned)", 0, "finetune", "epoch", result.best_epoch,
                        result.best_val_acc, "val", test["accuracy"] if test else None,
                        test["macro"]["f1"] if test else None, result.seconds, None, list(result.notes))
    record = _plain_json({"inputs": _digest(item.inputs), "row": dataclasses.asdict(row), "test": test,
                        "sha256": _file_sha(bundle / "manifest.json"), "val_source": result.val_source,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    manifest.data["finetune"] = record
    manifest.save()
    notify(f"[finetune] best epoch {result.best_epoch}: {_score_text(record['row'])}")
    events.append(dataclasses.replace(item, action="computed"))
    return _Candidate.from_finetune(record)


def _comparison_rows(candidates, best):
    from ..classify import ComparisonRow, rank_rows
    rows = []
    for cand in candidates:
        row = ComparisonRow(**{**cand.row, "notes": list(cand.row.get("notes") or [])})
        if cand is best:
            row.notes.insert(0, "selected (best val/CV score)")
        rows.append(row)
    return rank_rows(rows)


def _best_bundle(plan: Plan, best: _Candidate, bundle_path: Path):
    """Write the best model as a bundle: a classifier's via save_bundle, the fine-tuned one copied."""
    from .. import safemodel
    from ..bundle import linear_manifest, save_bundle
    from ..cache import FeatureSpec
    from ..quantize import bundle_ranges
    from ..train import FeatureSet, fit_from_record
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    if best.model_id == "finetune":
        _write_folder_atomically(bundle_path, lambda tmp: shutil.copytree(p.out_dir / "finetune.featx", tmp,
                                                                          dirs_exist_ok=True))
        return
    record = manifest.data["train"][best.model_id]
    specs = [FeatureSpec.from_json(x) for x in record.get("specs") or [record["spec"]]]
    pipe = safemodel.load((p.out_dir / record["file"]).parent)
    fit = fit_from_record(record, pipe)
    parts = []
    for spec in specs:
        bb = next(bb for bb in plan.backbones if any(s.key == spec.key for s in bb.specs))
        parts.append((spec, bb.rw, bb.config["weights"]))
    m = linear_manifest(classes=ds.classes, spec=FeatureSet(tuple(specs)), weights_spec=parts[0][2],
                        resolved=parts[0][1], seed=p.dataset["seed"], dims=record["dims"], fit=fit,
                        pca=p.classifiers["pca"], dataset=ds, test_metrics=record.get("test"), parts=parts,
                        int8=bundle_ranges(plan.cache_dir, specs))
    m["pipeline"] = {"file": str(p.path.resolve()), "model": best.model_id}
    save_bundle(bundle_path, m, pipe)


def _stage_evaluate(plan: Plan, item: PlanItem, best, cache, progress, notify, events) -> dict:
    from ..bundle import load_bundle
    from ..evaluate import evaluate_bundle, write_evaluation
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    split = p.evaluate["split"]
    if item.action == "reuse":
        record = manifest.data["evaluate"]
        notify(f"[evaluate] {item.name}: reused ({split} accuracy {record['metrics']['accuracy']:.4f})")
        events.append(dataclasses.replace(item, action="reused"))
        return record["metrics"]
    bundle_path = p.out_dir / p.output["bundle"]
    _best_bundle(plan, best, bundle_path)
    bundle = load_bundle(bundle_path)
    ev = evaluate_bundle(bundle, ds, split, top_k=p.evaluate["top_k"], cache=cache, progress=progress,
                         notify=notify, device=p.engine["device"], runtime=p.engine["runtime"],
                         batch_size=p.engine["batch_size"], workers=p.engine["workers"])
    write_evaluation(ev, bundle, p.out_dir)
    manifest.data["evaluate"] = {"inputs": _digest(item.inputs), "model": best.model_id, "metrics": ev.metrics,
                                 "notes": ev.notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest.data["report"] = None          # report.html and metrics.json were just replaced
    manifest.save()
    notify(f"[evaluate] {item.name}: accuracy {ev.metrics['accuracy']:.4f} ({ev.metrics['n']} images); "
           f"wrote {p.output['bundle']}")
    events.append(dataclasses.replace(item, action="computed"))
    return ev.metrics


def _read_mistakes(path: Path, classes) -> list[dict]:
    import csv
    out = []
    with contextlib.suppress(OSError):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("correct") == "0":
                    out.append({"path": row["path"], "true": row["true"], "pred": row["predicted"],
                                "prob": float(row["probability"])})
    return out


def _stage_report(plan: Plan, item: PlanItem, best, rows, metrics, notify, events) -> Path | None:
    from ..classify import write_table
    from ..report import save_metrics_json, write_html_report
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    out = p.out_dir
    html = out / "report.html"
    if item.action == "reuse":
        notify(f"[report] reused {item.name}")
        events.append(dataclasses.replace(item, action="reused"))
        return html
    write_table(rows, out / "comparison.csv", out / "comparison.md")
    summary = {"pipeline": str(p.path.resolve()), "dataset": ds.name, "dataset_id": ds.id,
               "best": {"model": best.label, "model_id": best.model_id, **best.row,
                        "bundle": str(out / p.output["bundle"]), "chosen_by": "val/CV score"},
               "evaluation": metrics, "comparison": [dataclasses.asdict(r) for r in rows]}
    save_metrics_json(out / "metrics.json", summary)
    r = best.row
    model = [{"setting": k, "value": v} for k, v in [
        ("pipeline", str(p.path.resolve())), ("best model", best.label),
        ("chosen by", f"{r.get('score_source')} score "
                      + ("-" if r.get("val_or_cv_score") is None else f"{r['val_or_cv_score']:.4f}")),
        (r.get("param_name") or "parameter", r.get("chosen")), ("bundle", str(out / p.output["bundle"])),
        ("evaluated on", f"{metrics.get('split')} split of {ds.name}")]]
    comparison = [{"#": i + 1, "backbone": x.backbone, "layer": x.layer, "dims": x.dims, "classifier": x.classifier,
                   "parameter": f"{x.param_name}={x.chosen}", "val/cv": x.val_or_cv_score,
                   "source": x.score_source, "test acc": x.test_accuracy, "macro-F1": x.macro_f1,
                   "notes": "; ".join(x.notes)} for i, x in enumerate(rows)]
    classes = list(metrics.get("classes") or ds.classes)
    write_html_report(html, title=p.report["title"], metrics=metrics, classes=classes,
                      confusion_png=out / "confusion_matrix.png",
                      misclassified=_read_mistakes(out / "predictions.csv", classes),
                      extra_tables={"Best model": model, "Comparison (ranked by test accuracy; "
                                                         "the model is selected by val/CV score)": comparison},
                      max_misclassified=p.report["max_misclassified"])
    manifest.data["report"] = {"inputs": _digest(item.inputs), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest.save()
    notify(f"[report] wrote {item.name} in {shown(out)}")
    events.append(dataclasses.replace(item, action="computed"))
    return html
