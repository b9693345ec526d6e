"""Declarative pipelines: one TOML file describes an experiment; ``featx run`` does
only the work whose inputs changed.

A pipeline file (Python's ``tomllib``, no new dependency)::

    [dataset]                     # what to learn from
    path = "photos"               # folder or CSV, relative to this file; or featx:clothing-mini
    [[backbones]]                 # one table per frozen network
    name = "mobilenet_v2"
    layers = ["features.14", "flatten"]
    [classifiers]
    names = ["logreg", "linear-svm"]
    [output]
    dir = "runs/photos"           # relative to this file

Every table and key is listed in :data:`SCHEMA` (type, default, allowed
values); pipelines/template-folders.toml explains each one. The whole file
is validated before any work starts (unknown keys, wrong types, missing
values, unknown backbones, layers, weights, classifiers): a mistake is one
:class:`~featx.errors.ConfigError` line naming the file, the dotted key
(``backbones[1].layers``, counting from 0) and what is allowed.

Stages, in order::

    extract   every layer of each backbone in one pass, into the feature cache
    train     every backbone x layer x classifier, parameter chosen on val (else CV)
    finetune  optional ([finetune] table): the whole network, a bundle of its own
    evaluate  the best model (by its val/CV score, never by test) becomes
              OUT/best.featx and is evaluated on the test split through the bundle
    report    OUT/report.html, metrics.json, comparison.csv/.md

Reuse: features come from the cache (keyed by what determines their numbers);
each fitted model is named by its digest in the fit store that ``featx
compare`` shares (:class:`featx.train.FitStore`); the fine-tuned bundle, the
evaluation and the report are recorded in ``OUT/stages.json`` with a hash of
their inputs. Each is reused while its digest or hash matches. ``force`` redoes stages; :func:`plan_pipeline` says
what a run would do without doing it.

Everything a run writes lies under the output folder::

    pipeline.toml          the resolved pipeline (defaults filled, paths absolute)
    stages.json            the stage manifest: input hashes, what each stage produced
    models/ID/model.json   every fitted classifier, code-free (a cache: safe to delete)
    best.featx/            the best model as a bundle (`featx predict` reads it)
    finetune.featx/, finetune.work/   the fine-tuned bundle and its checkpoint/log
    metrics.json           best model, its test metrics, the comparison
    comparison.csv, comparison.md
    confusion_matrix.png, predictions.csv, report.html

The package: :mod:`.schema` (the keys), :mod:`.load` (reading and
cross-checks), :mod:`.toml_write` (the resolved copy), :mod:`.plan` (the
stage manifest and the plan), :mod:`.stages` (running), :mod:`.summary`
(the closing lines).
"""

from __future__ import annotations

from ..data import PACKAGE_DATASET_PREFIX, package_datasets, resolve_dataset_path
from .load import Pipeline, check_layer, load_pipeline
from .plan import Plan, PlanItem, StageManifest, default_cache_dir, format_plan, plan_pipeline
from .schema import FORCE_STAGES, SCHEMA, STAGES, Key
from .stages import RunResult, run_pipeline
from .summary import shown, summary_lines
from .toml_write import dump_toml

__all__ = [
    "FORCE_STAGES", "Key", "PACKAGE_DATASET_PREFIX", "Pipeline", "Plan", "PlanItem", "RunResult", "SCHEMA",
    "STAGES", "StageManifest", "check_layer", "default_cache_dir", "dump_toml", "format_plan", "load_pipeline",
    "package_datasets", "plan_pipeline", "resolve_dataset_path", "run_pipeline", "shown", "summary_lines",
]
