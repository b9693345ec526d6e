"""The stage manifest (``OUT/stages.json``) and the plan: what a run would
compute and what it reuses, found without computing anything."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from .load import FINETUNE_ARGS, Pipeline
from .schema import FORCE_STAGES, STAGES
from .summary import shown

MANIFEST_NAME = "stages.json"
MANIFEST_FORMAT = 1


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str | None:
    from ..files import file_sha256
    return file_sha256(path) if path.is_file() else None


def _plain_json(obj):
    """numpy scalars and paths to plain JSON values (what stages.json holds)."""
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    return json.loads(json.dumps(obj, default=default))


class StageManifest:
    """``OUT/stages.json``: per stage, the hash of its inputs and what it produced."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / MANIFEST_NAME
        self.data = {"featx_pipeline": MANIFEST_FORMAT, "extract": {}, "train": {}, "finetune": None,
                     "evaluate": None, "report": None}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                loaded = None     # unreadable: everything is recomputed, nothing is trusted
            if isinstance(loaded, dict) and loaded.get("featx_pipeline") == MANIFEST_FORMAT:
                self.data.update(loaded)

    def save(self):
        from ..files import atomic_write_text
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=False) + "\n")


# --------------------------------------------------------------------------
# the plan


@dataclass
class PlanItem:
    """One unit of work: ``action`` is ``compute``, ``cached``/``reuse`` or ``skip``."""

    stage: str
    name: str
    action: str
    detail: str = ""
    key: str = ""
    inputs: dict = field(default_factory=dict)


@dataclass
class _Backbone:
    config: dict
    info: Any
    rw: Any
    specs: list
    items: list = field(default_factory=list)       # extract PlanItems, one per layer
    missing: set = field(default_factory=set)       # keys of the specs whose cache entry lacks images
    seed: int = 0

    @property
    def ready(self):
        """The specs as :func:`featx.extract.extract` takes them (weights resolved at load)."""
        from ..extract import Specs
        return Specs(self.info, self.rw, self.specs, self.seed)


@dataclass
class Plan:
    pipeline: Pipeline
    cache_dir: Path
    force: frozenset
    dataset: Any
    data_digest: str
    backbones: list[_Backbone]
    train: list[PlanItem]
    finetune: PlanItem
    evaluate: PlanItem
    report: PlanItem
    manifest: StageManifest

    @property
    def items(self) -> list[PlanItem]:
        return [i for b in self.backbones for i in b.items] + self.train + [self.finetune, self.evaluate, self.report]


def _data_digest(ds) -> str:
    """What training sees of a dataset: contents, labels, splits (not file names)."""
    rows = sorted(f"{s.id}\t{s.label}\t{s.split}" for s in ds.samples)
    return _digest({"classes": ds.classes, "samples": rows})


def _check_force(force) -> frozenset:
    force = frozenset(force or ())
    bad = sorted(force - set(FORCE_STAGES))
    if bad:
        raise ConfigError(f"--force {bad[0]}: use one of {', '.join(FORCE_STAGES)}")
    return frozenset(STAGES) if "all" in force else force


def default_cache_dir(p: Pipeline, cache=None) -> Path:
    """--cache, else [output] cache, else $FEATX_CACHE, else ./cache."""
    if cache is not None:
        return Path(cache)
    if p.output["cache"]:
        return Path(p.output["cache"])
    return Path(os.environ.get("FEATX_CACHE", "cache"))


def _open_dataset(p: Pipeline, cache_dir: Path):
    from ..cache import FeatureCache
    from ..data import open_dataset
    d = p.dataset
    ds = open_dataset(d["root"], d["layout"], label_regex=d["label_regex"], val_fraction=d["val_fraction"],
                      test_fraction=d["test_fraction"], seed=d["seed"], hash_index=FeatureCache(cache_dir).hash_index)
    if p.evaluate.get("drop_leaks"):       # val/test copies of train images: out of everything the run measures
        from ..audit import without_leaks
        ds = without_leaks(ds)
    return ds


def _spec_label(spec) -> str:
    return f"{spec.backbone} {spec.layer} ({spec.pool}, {spec.precision})"


def _feature_sets(plan_backbones, fused) -> list:
    """Every feature set a run trains on: each backbone's layers, then the fusions."""
    from ..train import FeatureSet
    sets = [FeatureSet((spec,)) for bb in plan_backbones for spec in bb.specs]
    for request in fused:
        sets.append(FeatureSet(tuple(next(s for s in plan_backbones[i].specs if s.layer == layer)
                                     for i, layer in request)))
    return sets


def _finetune_inputs(p: Pipeline, digest: str) -> dict:
    from ..backbones import resolve_weights
    ft = p.finetune
    rw = ft.get("_weights") or resolve_weights(ft["backbone"], ft["weights"], seed=p.dataset["seed"])
    return {"data": digest, "backbone": ft["backbone"], "weights": rw.identity, "seed": p.dataset["seed"],
            "settings": {k: ft[k] for k in FINETUNE_ARGS}}


def plan_pipeline(p: Pipeline, cache=None, force=(), *, dataset=None) -> Plan:
    """What :func:`run_pipeline` would do: opens the dataset (hashes new
    images), looks into the cache and the stage manifest, computes nothing."""
    from ..cache import FeatureCache
    force = _check_force(force)
    cache_dir = default_cache_dir(p, cache)
    cache = FeatureCache(cache_dir)
    ds = dataset if dataset is not None else _open_dataset(p, cache_dir)
    digest = _data_digest(ds)
    manifest = StageManifest(p.out_dir)
    backbones = [_plan_extract(p, b, cache, ds, manifest, force) for b in p.backbones]
    train = _plan_train(p, backbones, cache, ds, manifest, force)
    ft = _plan_finetune(p, manifest, digest, force)
    ev_item, rep_item = _plan_evaluate_report(p, manifest, train, ft, digest, force)
    return Plan(p, cache_dir, force, ds, digest, backbones, train, ft, ev_item, rep_item, manifest)


def _plan_extract(p: Pipeline, b: dict, cache, ds, manifest: StageManifest, force) -> _Backbone:
    """One [[backbones]] table: an extract item per layer, cached or to compute."""
    from ..extract import calibrated, feature_specs
    ready = calibrated(feature_specs(b["name"], b["weights"], b["layers"], b["pool"], b["precision"], b["storage"],
                                     p.dataset["seed"], p.engine["device"], resolved=b["_weights"]), ds.samples, cache)
    info, rw, specs = ready
    bb = _Backbone(b, info, rw, specs, seed=ready.seed)
    unique_ids = {s.id for s in ds.samples}
    for spec in specs:
        known_bad = set((manifest.data["extract"].get(spec.key) or {}).get("unreadable", {}))
        missing = unique_ids - set(cache.ids(spec.key)) - known_bad
        note = f"; {len(known_bad & unique_ids)} unreadable" if known_bad & unique_ids else ""
        if missing:
            bb.missing.add(spec.key)
        if "extract" in force:
            item = PlanItem("extract", _spec_label(spec), "compute",
                            f"{len(unique_ids)} images (forced: entry dropped)", spec.key)
        elif missing:
            item = PlanItem("extract", _spec_label(spec), "compute",
                            f"{len(missing)} of {len(unique_ids)} images{note}", spec.key)
        else:
            item = PlanItem("extract", _spec_label(spec), "cached", f"{len(unique_ids)} images{note}", spec.key)
        if item.action == "compute" and not rw.available:
            item.detail += f"; weights {rw.source}"
        bb.items.append(item)
    return bb


def _plan_train(p: Pipeline, backbones: list[_Backbone], cache, ds, manifest: StageManifest, force) -> list[PlanItem]:
    """A train item per feature set x classifier. A fit's key is its
    :class:`~featx.train.FitStore` digest, known once every part of the
    feature set is in the cache (else the train stage finds it after extracting)."""
    from ..errors import CacheError
    from ..train import FitStore, split_features
    store = FitStore(cache)
    missing = set().union(*(bb.missing for bb in backbones))
    items = []
    for fset in _feature_sets(backbones, p.classifiers["_fused"]):
        data = None
        if not any(part.key in missing for part in fset.parts):
            with contextlib.suppress(CacheError):       # parts that disagree: the train stage says so
                data = split_features(cache, fset, ds)
        items += [train_item(p, store, fset, data, name, manifest, force) for name in p.classifiers["names"]]
    return items


def fit_settings(p: Pipeline, classifier: str) -> dict:
    """The keywords of :func:`featx.train.fit_or_reuse` that decide a fit, and
    so its :meth:`~featx.train.FitStore.digest`: plan and train stage use these."""
    import inspect

    from ..train import fit_or_reuse
    c = p.classifiers
    # sgd's chunk size is part of its digest: the library's default, as in `featx compare`
    rows = inspect.signature(fit_or_reuse).parameters["rows_per_chunk"].default
    return {"grid": c["grids"][classifier], "pca": c["pca"], "cv": c["cv"], "seed": p.dataset["seed"],
            "final_fit": c["final_fit"], "rows_per_chunk": rows}


def train_item(p: Pipeline, store, fset, data, name: str, manifest: StageManifest, force) -> PlanItem:
    """Fitting ``name`` on ``fset``: reused when the manifest holds the fit of
    the same digest and its model file is intact. ``data``: the feature set's
    cached rows (None: not known yet, the key stays empty)."""
    from ..classify import PROBE_SEARCHED, get_classifier_spec
    label = f"{fset.backbone} {fset.layer} {name}"
    digest = store.digest(fset, data, name, **fit_settings(p, name)) if data is not None else ""
    model_id = fit_model_id(fset, name, digest) if digest else ""
    record = manifest.data["train"].get(model_id) if digest else None
    usable = (record is not None and record.get("digest") == digest
              and str(record.get("file", "")).endswith("model.json")
              and _file_sha(p.out_dir / record["file"]) == record.get("sha256"))
    if usable and "train" not in force:
        return PlanItem("train", label, "reuse", record["file"], model_id, {"digest": digest})
    grid = p.classifiers["grids"][name]
    values = list(grid or get_classifier_spec(name).grid)
    text = f"{len(values)} value{'s' if len(values) != 1 else ''}"
    if grid is None and name in PROBE_SEARCHED and p.classifiers["pca"] is None:
        text = f"{min(values):.0e}..{max(values):.0e} (adaptive)"
    why = " (forced)" if usable else ""
    return PlanItem("train", label, "compute", f"{get_classifier_spec(name).param_name}: {text}{why}", model_id,
                    {"digest": digest})


def fit_model_id(fset, classifier: str, digest: str) -> str:
    """The name of a fit in the manifest and under ``models/``: readable, then
    the start of its fit-store digest."""
    from ..text import slug
    return f"{slug(fset.backbone, 'x')}-{slug(fset.layer, 'x')}-{classifier}-{digest[:10]}"


def _plan_finetune(p: Pipeline, manifest: StageManifest, digest: str, force) -> PlanItem:
    if p.finetune is None or not p.finetune["enabled"]:
        return PlanItem("finetune", "-", "skip", "no [finetune] table" if p.finetune is None else "enabled = false")
    inputs = _finetune_inputs(p, digest)
    record = manifest.data.get("finetune") or {}
    usable = record.get("inputs") == _digest(inputs) and (p.out_dir / "finetune.featx" / "manifest.json").is_file()
    name = f"{p.finetune['backbone']} ({p.finetune['epochs']} epochs)"
    if usable and "finetune" not in force:
        return PlanItem("finetune", name, "reuse", "finetune.featx", "finetune", inputs)
    return PlanItem("finetune", name, "compute", "(forced)" if usable else "", "finetune", inputs)


def _plan_evaluate_report(p, manifest, train, ft, digest, force, best=None):
    """The evaluate and report items; their inputs are known once the best model is."""
    if best is None and all(i.action == "reuse" for i in train) and ft.action in ("reuse", "skip"):
        rows = [_Candidate.from_record(i.key, manifest.data["train"][i.key]) for i in train]
        if ft.action == "reuse":
            rows.append(_Candidate.from_finetune(manifest.data["finetune"]))
        best = choose_best(rows)
    split = p.evaluate["split"]
    if best is None:
        ev = PlanItem("evaluate", f"best model on {split}", "compute", "(best model known after training)")
        rep = PlanItem("report", "report.html, metrics.json, comparison", "compute")
        return ev, rep
    ev_inputs = {"model": best.model_id, "model_sha": best.sha256, "split": split, "top_k": p.evaluate["top_k"],
                 "data": digest, "bundle": p.output["bundle"]}
    record = manifest.data.get("evaluate") or {}
    out = p.out_dir
    produced = [out / p.output["bundle"] / "manifest.json", out / "predictions.csv", out / "confusion_matrix.png"]
    usable = record.get("inputs") == _digest(ev_inputs) and all(f.is_file() for f in produced)
    if usable and "evaluate" not in force:
        ev = PlanItem("evaluate", f"{best.label} on {split}", "reuse", p.output["bundle"], "evaluate", ev_inputs)
    else:
        ev = PlanItem("evaluate", f"{best.label} on {split}", "compute", "(forced)" if usable else "",
                      "evaluate", ev_inputs)
    rep_inputs = {"evaluate": _digest(ev_inputs), "rows": [i.key for i in train] + ([ft.key] if ft.key else []),
                  "report": p.report, "pipeline": str(p.path.resolve())}
    record = manifest.data.get("report") or {}
    files = ["report.html", "metrics.json", "comparison.csv", "comparison.md"]
    usable = (ev.action == "reuse" and record.get("inputs") == _digest(rep_inputs)
              and all((out / f).is_file() for f in files))
    rep = PlanItem("report", ", ".join(files), "reuse" if usable and "report" not in force else "compute",
                   "(forced)" if usable and "report" in force else "", "report", rep_inputs)
    return ev, rep


def format_plan(plan: Plan) -> str:
    """The plan as a table: stage, what, action, detail."""
    p = plan.pipeline
    ds = plan.dataset
    splits = ", ".join(f"{s} {len(ds.subset(s))}" for s in ds.splits)
    lines = [f"pipeline {p.path} -> {shown(p.out_dir)}",
             f"dataset {ds.name}: {len(ds)} images, {len(ds.classes)} classes ({splits})",
             f"cache {shown(plan.cache_dir)}"]
    rows = [[i.stage, i.name, i.action, i.detail] for i in plan.items]
    widths = [max(len(r[j]) for r in rows) for j in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else ""))
    lines[-len(rows):] = [line.rstrip() for line in lines[-len(rows):]]
    todo = sum(1 for i in plan.items if i.action == "compute")
    done = sum(1 for i in plan.items if i.action in ("cached", "reuse"))
    lines.append(f"{todo} to compute, {done} cached or reused")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# running


@dataclass
class _Candidate:
    """A fitted model competing for 'best': a classifier or the fine-tuned network."""

    model_id: str
    label: str
    row: dict                      # ComparisonRow fields
    sha256: str | None
    order: int = 0

    @property
    def score(self):
        return self.row.get("val_or_cv_score")

    @classmethod
    def from_record(cls, model_id, record, order=0):
        r = record["row"]
        return cls(model_id, f"{r['backbone']} {r['layer']} {r['classifier']}", r, record.get("sha256"), order)

    @classmethod
    def from_finetune(cls, record, order=10 ** 6):
        r = record["row"]
        return cls("finetune", f"{r['backbone']} fine-tuned", r, record.get("sha256"), order)


def choose_best(candidates: Sequence[_Candidate]):
    """The first candidate as :func:`featx.classify.rank_rows` ranks their rows
    (the val/CV score; ties: lower held-out log-loss, the simpler model, the
    faster fit, then the one listed first in the pipeline), the same ranking
    as ``featx compare``.

    The test split never chooses: its accuracy stays an honest estimate."""
    from ..classify import ComparisonRow, rank_rows
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda c: c.order)
    rows = [ComparisonRow(**{**c.row, "notes": list(c.row.get("notes") or [])}) for c in ordered]
    best = rank_rows(rows)[0]
    return ordered[next(i for i, r in enumerate(rows) if r is best)]
