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
each fitted model, the fine-tuned bundle, the evaluation and the report are
recorded in ``OUT/stages.json`` with a hash of their inputs, and are reused
while the hash matches. ``force`` redoes stages; :func:`plan_pipeline` says
what a run would do without doing it.

Everything a run writes lies under the output folder::

    pipeline.toml          the resolved pipeline (defaults filled, paths absolute)
    stages.json            the stage manifest: input hashes, what each stage produced
    models/*.joblib        every fitted classifier (a cache: safe to delete)
    best.featx/            the best model as a bundle (`featx predict` reads it)
    finetune.featx/, finetune.work/   the fine-tuned bundle and its checkpoint/log
    metrics.json           best model, its test metrics, the comparison
    comparison.csv, comparison.md
    confusion_matrix.png, predictions.csv, report.html
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .data import PACKAGE_DATASET_PREFIX, package_datasets, resolve_dataset_path, resolve_path  # noqa: F401
from .errors import ConfigError, FeatxError
from .options import CLASSIFY, DATASET, EXTRACT, FINETUNE, LAYOUTS, POOLS, PRECISIONS, STORAGES  # noqa: F401

__all__ = [
    "FORCE_STAGES", "PACKAGE_DATASET_PREFIX", "Pipeline", "Plan", "PlanItem", "RunResult", "SCHEMA",
    "STAGES", "dump_toml", "format_plan", "load_pipeline", "package_datasets", "plan_pipeline",
    "resolve_dataset_path", "run_pipeline", "summary_lines",
]

STAGES = ("extract", "train", "finetune", "evaluate", "report")
FORCE_STAGES = STAGES + ("all",)
MANIFEST_NAME = "stages.json"
MANIFEST_FORMAT = 1
REQUIRED = object()


# --------------------------------------------------------------------------
# schema: rules are data, so every message has the same shape


@dataclass(frozen=True)
class Key:
    """One key of a table: its type, default and what values are allowed.

    ``kind``: ``str``, ``int``, ``float`` (an int is accepted), ``bool``,
    ``str_list``, ``number_or_none``; ``choices``: allowed values (a
    callable returning them, for registries); ``check(value)`` returns a
    problem (``"must be at least 1"``) or None; ``what`` describes the
    value for the "missing" message.
    """

    kind: str
    default: Any = None
    choices: Any = None
    check: Callable[[Any], str | None] | None = None
    what: str = ""


def _at_least(n):
    return lambda v: None if v >= n else f"must be at least {n}"


def _regex(v):
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


def _pca(v):
    if isinstance(v, int):
        return None if v >= 1 else "must be a number of components >= 1 or a variance fraction in (0, 1)"
    return None if 0 < v < 1 else "must be a number of components >= 1 or a variance fraction in (0, 1)"


def _non_empty(v):
    return None if v else "must not be empty"


def _backbone_names():
    from .backbones import list_backbones
    return list_backbones()


def _classifier_names():
    from .classify import CLASSIFIERS
    return list(CLASSIFIERS)


def _keys(options, table: str) -> dict[str, Key]:
    """Schema keys generated from featx.options: one declaration per option."""
    from .options import problem
    return {o.name: Key(o.kind, o.default, choices=o.choices,
                        check=(lambda v, o=o: problem(o, v)) if o.low is not None or o.high is not None else None)
            for o in options if o.table == table}


SCHEMA: dict[str, dict[str, Key]] = {
    "dataset": {
        "path": Key("str", REQUIRED, what="the dataset folder or CSV manifest (relative to this file), "
                                          "or featx:NAME for a dataset shipped with featx"),
        **_keys(DATASET, "dataset"),
        "label_regex": Key("str", None, check=_regex),
    },
    "backbones": {
        "name": Key("str", REQUIRED, choices=_backbone_names, what="a backbone (see `featx backbones`)"),
        "weights": Key("str", "auto"),
        "layers": Key("str_list", None, check=_non_empty),
        **_keys(EXTRACT, "backbones"),
    },
    "classifiers": {
        "names": Key("str_list", ["logreg"], choices=_classifier_names, check=_non_empty),
        "grids": Key("table", {}),
        **_keys(CLASSIFY, "classifiers"),
        "pca": Key("number", None, check=_pca),
        "features": Key("str_list", [], what="fused feature sets, each \"A+B\" with parts LAYER or BACKBONE:LAYER"),
    },
    "finetune": {
        "enabled": Key("bool", True),
        "backbone": Key("str", None, choices=_backbone_names),
        "weights": Key("str", None),
        **_keys(FINETUNE, "finetune"),
    },
    "evaluate": {
        "split": Key("str", "test", choices=("train", "val", "test", "all")),
        "top_k": Key("int", 5, check=_at_least(1)),
        "drop_leaks": Key("bool", False),
    },
    "report": {
        "title": Key("str", None),
        "max_misclassified": Key("int", 100, check=_at_least(0)),
    },
    "output": {
        "dir": Key("str", None),
        "cache": Key("str", None),
        "bundle": Key("str", "best.featx"),
    },
    "engine": {
        "kind": Key("str", "local", choices=("local", "dask")),
        "scheduler": Key("str", None),
        "shard_size": Key("int", None, check=_at_least(1)),
        **_keys(EXTRACT, "engine"),
        **_keys(CLASSIFY, "engine"),
    },
}
REQUIRED_TABLES = ("dataset", "backbones")
ARRAY_TABLES = ("backbones",)

_KIND_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "str_list": "a list of strings", "number": "a number", "table": "a table"}


def _type_word(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _show(v) -> str:
    """A value as it would be written in TOML (short)."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{...}"
    text = json.dumps(v) if isinstance(v, list) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Where:
    """Builds the one-line messages: ``FILE: KEY: problem``."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")


def _suggest(word: str, allowed: Sequence[str]) -> str:
    from .errors import did_you_mean
    hint = did_you_mean(word, allowed)
    return f" ({hint})" if hint else ""


def _check_type(where: _Where, dotted: str, spec: Key, v):
    kind = spec.kind
    ok = {
        "str": isinstance(v, str),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str_list": isinstance(v, list) and all(isinstance(x, str) for x in v),
        "table": isinstance(v, dict),
    }[kind]
    if not ok:
        if kind == "str_list" and isinstance(v, list):
            bad = next(i for i, x in enumerate(v) if not isinstance(x, str))
            raise where.error(f"{dotted}[{bad}]", f"expected a string, got {_type_word(v[bad])} ({_show(v[bad])})")
        raise where.error(dotted, f"expected {_KIND_WORDS[kind]}, got {_type_word(v)} ({_show(v)})")
    if kind == "float":
        v = float(v)
    if spec.check is not None:
        problem = spec.check(v)
        if problem:
            raise where.error(dotted, f"{_show(v)} {problem}")
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices is not None:
        values = v if kind == "str_list" else [v]
        for i, x in enumerate(values):
            if x not in choices:
                at = f"{dotted}[{i}]" if kind == "str_list" else dotted
                raise where.error(at, f"{_show(x)} is not allowed{_suggest(x, choices)}; "
                                      f"use one of {', '.join(choices)}")
    return v


def _check_table(where: _Where, name: str, table, schema: dict[str, Key]) -> dict:
    if not isinstance(table, dict):
        raise where.error(name, f"expected a table ([{name}]), got {_type_word(table)} ({_show(table)})")
    for k in table:
        if k not in schema:
            raise where.error(f"{name}.{k}", f"unknown key{_suggest(k, schema)}; allowed: {', '.join(schema)}")
    out = {}
    for k, spec in schema.items():
        dotted = f"{name}.{k}"
        if k not in table:
            if spec.default is REQUIRED:
                raise where.error(dotted, f"missing; give {spec.what or _KIND_WORDS[spec.kind]}")
            out[k] = spec.default
            continue
        out[k] = _check_type(where, dotted, spec, table[k])
    return out


# --------------------------------------------------------------------------
# the pipeline


@dataclass
class Pipeline:
    """A validated pipeline file: every table with its defaults filled in.

    Paths are absolute (``dataset["root"]``, ``output["dir"]``,
    ``output["cache"]``, file weights); ``dataset["path"]`` keeps what the
    file says (``featx:NAME`` stays as it is).
    """

    path: Path
    dataset: dict
    backbones: list[dict]
    classifiers: dict
    finetune: dict | None
    evaluate: dict
    report: dict
    output: dict
    engine: dict

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def out_dir(self) -> Path:
        return Path(self.output["dir"])

    def resolved(self) -> dict:
        """The pipeline as a TOML-ready dict: defaults filled, paths absolute."""
        def clean(d):
            return {k: v for k, v in d.items() if v is not None and not k.startswith("_")}
        ds = clean(self.dataset)
        ds.pop("root", None)
        if not ds["path"].startswith(PACKAGE_DATASET_PREFIX):
            ds["path"] = str(self.dataset["root"])
        from .classify import get_classifier_spec
        grids = {k: list(v or get_classifier_spec(k).grid) for k, v in self.classifiers["grids"].items()}
        out = {"dataset": ds, "backbones": [clean(b) for b in self.backbones],
               "classifiers": clean({**self.classifiers, "grids": grids})}
        if self.finetune is not None:
            out["finetune"] = clean(self.finetune)
        out["evaluate"] = clean(self.evaluate)
        out["report"] = clean(self.report)
        out["output"] = clean({**self.output, "dir": str(self.output["dir"]),
                               "cache": str(self.output["cache"]) if self.output["cache"] else None})
        out["engine"] = clean(self.engine)
        return out


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give a pipeline .toml file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8 TOML expected)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _looks_like_path(weights: str) -> bool:
    return any(ch in weights for ch in "/\\") or weights.endswith((".pth", ".pt", ".bin", ".ckpt"))


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file; nothing heavy is loaded or computed.

    Checks, in order: TOML syntax; tables and keys (unknown, missing, types,
    allowed values); then what needs the registries: backbone names, weights
    (resolved, files relative to the pipeline file), layer names (against
    the backbone's graph), classifier grids, the dataset path, and whether
    the fine-tune stage and the dask engine exist here.

    Raises
    ------
    ConfigError
        One line: ``FILE: KEY: problem; what is allowed``.
    """
    path = Path(path)
    where = _Where(path)
    raw = _read_toml(path)
    base = path.resolve().parent
    for name in raw:
        if name not in SCHEMA:
            raise where.error(name, f"unknown table{_suggest(name, SCHEMA)}; allowed: {', '.join(SCHEMA)}")
    for name in REQUIRED_TABLES:
        if name not in raw:
            header = f"[[{name}]]" if name in ARRAY_TABLES else f"[{name}]"
            raise where.error(name, f"missing; add a {header} table")
    for name in SCHEMA:
        if name in ARRAY_TABLES and name in raw and not isinstance(raw[name], list):
            raise where.error(name, f"expected a list of tables ([[{name}]]), got {_type_word(raw[name])}")
        if name not in ARRAY_TABLES and name in raw and not isinstance(raw[name], dict):
            raise where.error(name, f"expected a table ([{name}]), got {_type_word(raw[name])} ({_show(raw[name])})")

    dataset = _check_table(where, "dataset", raw["dataset"], SCHEMA["dataset"])
    if not raw["backbones"]:
        raise where.error("backbones", "empty; add at least one [[backbones]] table")
    backbones = [_check_table(where, f"backbones[{i}]", b, SCHEMA["backbones"]) for i, b in enumerate(raw["backbones"])]
    classifiers = _check_table(where, "classifiers", raw.get("classifiers", {}), SCHEMA["classifiers"])
    finetune = _check_table(where, "finetune", raw["finetune"], SCHEMA["finetune"]) if "finetune" in raw else None
    evaluate = _check_table(where, "evaluate", raw.get("evaluate", {}), SCHEMA["evaluate"])
    report = _check_table(where, "report", raw.get("report", {}), SCHEMA["report"])
    output = _check_table(where, "output", raw.get("output", {}), SCHEMA["output"])
    engine = _check_table(where, "engine", raw.get("engine", {}), SCHEMA["engine"])

    # ---- cross-key rules and what needs the registries
    if dataset["val_fraction"] + dataset["test_fraction"] >= 1:
        raise where.error("dataset.test_fraction", f"val_fraction + test_fraction = "
                          f"{dataset['val_fraction'] + dataset['test_fraction']:g} must be below 1")
    if dataset["label_regex"] is not None and dataset["layout"] not in ("auto", "filenames"):
        raise where.error("dataset.label_regex", f"applies to layout \"filenames\" only, not {_show(dataset['layout'])}")
    try:
        dataset["root"] = resolve_dataset_path(dataset["path"], base)
    except ConfigError as e:
        raise where.error("dataset.path", str(e)) from None
    if not dataset["root"].exists():
        raise where.error("dataset.path", f"{_show(dataset['path'])}: no such file or folder ({dataset['root']})")

    seen = {}
    for i, b in enumerate(backbones):
        _resolve_backbone(where, f"backbones[{i}]", b, base, dataset["seed"])
        ident = (b["name"], b["_identity"], b["pool"], b["precision"], b["storage"])
        if ident in seen:
            raise where.error(f"backbones[{i}]", f"same backbone, weights, pool and precision as "
                                                 f"backbones[{seen[ident]}]; put all its layers in one table")
        seen[ident] = i

    names = list(dict.fromkeys(classifiers["names"]))
    if len(names) != len(classifiers["names"]):
        dup = next(n for n in names if classifiers["names"].count(n) > 1)
        raise where.error("classifiers.names", f"{_show(dup)} is listed twice")
    grids = {}
    for cname, values in classifiers["grids"].items():
        dotted = f"classifiers.grids.{cname}"
        if cname not in names:
            raise where.error(dotted, f"{cname} is not in classifiers.names ({', '.join(names)})")
        grids[cname] = _check_grid(where, dotted, cname, values)
    classifiers["grids"] = {n: grids.get(n) for n in names}
    classifiers["_fused"] = _check_fused(where, classifiers["features"], backbones)
    if classifiers["pca"] is not None and "sgd" in names:
        raise where.error("classifiers.pca", "does not apply to sgd (it streams features; PCA needs them all); "
                                             "drop pca or sgd")

    if finetune is not None:
        _resolve_finetune(where, finetune, backbones, base, dataset["seed"])

    output["dir"] = resolve_path(output["dir"], base) if output["dir"] else base / "runs" / path.stem
    if output["cache"]:
        output["cache"] = resolve_path(output["cache"], base)
    if not output["bundle"].endswith(".featx") or "/" in output["bundle"] or "\\" in output["bundle"]:
        raise where.error("output.bundle", f"{_show(output['bundle'])} must be a folder name ending in .featx "
                                           "(it is written inside output.dir)")
    if report["title"] is None:
        report["title"] = f"featx pipeline {path.stem}"
    _check_engine(where, engine, backbones)
    return Pipeline(path, dataset, backbones, classifiers, finetune, evaluate, report, output, engine)


def _check_fused(where, values, backbones) -> list:
    """``classifiers.features`` as requests ((backbone index, layer), ...): every
    part a layer that its [[backbones]] table extracts."""
    out = []
    for j, value in enumerate(values):
        dotted = f"classifiers.features[{j}]"
        parts = value.split("+")
        if len(parts) < 2 or any(not part.strip() for part in parts):
            raise where.error(dotted, f"{_show(value)}: write A+B, each part LAYER or BACKBONE:LAYER, "
                                      "no empty part")
        request = []
        for part in parts:
            name, sep, layer = part.rpartition(":")
            if sep and not layer:
                raise where.error(dotted, f"{_show(value)}: {_show(part)} names no layer")
            if sep:
                at = [i for i, b in enumerate(backbones) if b["name"] == name]
                if not at:
                    raise where.error(dotted, f"{_show(part)}: {name} is not one of the [[backbones]] "
                                              f"({', '.join(b['name'] for b in backbones)})")
            elif len(backbones) == 1:
                at = [0]
            else:
                raise where.error(dotted, f"{_show(part)}: with several [[backbones]] write BACKBONE:LAYER")
            i = at[0]
            if layer not in backbones[i]["layers"]:
                raise where.error(dotted, f"{_show(part)}: {backbones[i]['name']} does not extract {_show(layer)}; "
                                          f"add it to backbones[{i}].layers ({', '.join(backbones[i]['layers'])})")
            request.append((i, layer))
        if len(set(request)) != len(request):
            raise where.error(dotted, f"{_show(value)}: a part is listed twice")
        out.append(tuple(request))
    return out


def _check_grid(where, dotted, classifier, values) -> list:
    from .classify import get_classifier_spec
    spec = get_classifier_spec(classifier)
    if not isinstance(values, list) or not values:
        raise where.error(dotted, f"expected a non-empty list of numbers (values of {spec.param_name}), "
                                  f"got {_type_word(values)} ({_show(values)})")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise where.error(f"{dotted}[{i}]", f"expected a number, got {_type_word(v)} ({_show(v)})")
        if not v > 0:
            raise where.error(f"{dotted}[{i}]", f"{_show(v)}: {spec.param_name} must be positive")
        if spec.param_name == "n_neighbors":
            if v != int(v):
                raise where.error(f"{dotted}[{i}]", f"{_show(v)}: {classifier} tunes n_neighbors, give whole numbers")
            v = int(v)
        else:
            v = float(v)
        out.append(v)
    return list(dict.fromkeys(out))


def check_layer(backbone: str, layer: str) -> str | None:
    """None when ``layer`` can be extracted from ``backbone``; else the problem."""
    from .errors import did_you_mean
    from .extract import _known_layers, resolve_node
    names, listed, is_graph = _known_layers(backbone)      # the one layer listing, shared with extract
    found = resolve_node(layer, list(names)) if is_graph else (layer if layer in names else None)
    if found is not None:
        return None
    # suggest what `featx layers` lists (blocks), not the nodes deep inside them
    hint = did_you_mean(layer, listed, n=3, cutoff=0.5)
    hint = f" ({hint})" if hint else ""
    return f"no layer {_show(layer)} in {backbone}{hint}; list them with `featx layers {backbone}`"


def _resolve_weights_at(where, dotted, backbone, weights, base, seed):
    """ResolvedWeights for a pipeline's weights value (a file: relative to the pipeline)."""
    from .backbones import resolve_weights
    from .errors import WeightsError
    value = weights
    if _looks_like_path(weights):
        value = str(resolve_path(weights, base))
    try:
        rw = resolve_weights(backbone, value, seed=seed)
    except WeightsError as e:
        msg = str(e)
        prefix = f"--weights {value}: "
        raise where.error(dotted, f"{_show(weights)}: {msg[len(prefix):] if msg.startswith(prefix) else msg}") from None
    if rw.kind == "port" and not rw.available:
        # ported weights come from a package only; torchvision's may still download
        raise where.error(dotted, f"{_show(weights)}: not installed; {rw.hint}")
    return value, rw


def _resolve_backbone(where, at, b, base, seed):
    from .backbones import get_backbone
    info = get_backbone(b["name"])
    b["weights"], rw = _resolve_weights_at(where, f"{at}.weights", b["name"], b["weights"], base, seed)
    b["_identity"] = rw.identity
    layers = b["layers"] or [info.default_layer]
    if len(set(layers)) != len(layers):
        dup = next(x for x in layers if layers.count(x) > 1)
        raise where.error(f"{at}.layers", f"{_show(dup)} is listed twice")
    for j, layer in enumerate(layers):
        problem = check_layer(info.name, layer)
        if problem:
            raise where.error(f"{at}.layers[{j}]", problem)
    b["layers"] = list(layers)


def _finetune_function():
    """featx.finetune.finetune when this featx has it, else None."""
    try:
        module = importlib.import_module("featx.finetune")
    except ImportError:
        return None
    fn = getattr(module, "finetune", None)
    return fn if callable(fn) else None


# pipeline key -> keyword of featx.finetune.finetune
FINETUNE_ARGS = ("epochs", "freeze_epochs", "lr", "lr_mult", "lr_groups", "batch_size", "optimizer", "weight_decay",
                 "augment", "bn", "probe", "precision", "patience", "max_train_images", "image_size")


def _resolve_finetune(where, ft, backbones, base, seed):
    if ft["backbone"] is None:
        ft["backbone"] = backbones[0]["name"]
    if ft["weights"] is None:
        same = next((b for b in backbones if b["name"] == ft["backbone"]), None)
        ft["weights"] = same["weights"] if same else "auto"
    else:
        ft["weights"], _ = _resolve_weights_at(where, "finetune.weights", ft["backbone"], ft["weights"], base, seed)
    if ft["freeze_epochs"] is not None and ft["freeze_epochs"] > ft["epochs"]:
        raise where.error("finetune.freeze_epochs", f"{ft['freeze_epochs']} must be at most finetune.epochs ({ft['epochs']})")
    if not ft["enabled"]:
        return
    fn = _finetune_function()
    if fn is None:
        raise where.error("finetune", "this featx has no fine-tune stage (featx.finetune.finetune is missing); "
                                      "set enabled = false or remove [finetune]")
    import inspect
    params = inspect.signature(fn).parameters
    unknown = [k for k in FINETUNE_ARGS if ft[k] is not None and k not in params]
    if unknown:
        raise where.error(f"finetune.{unknown[0]}", "not supported by this featx's fine-tune stage")


def _check_engine(where, engine, backbones=()):
    if engine["kind"] == "local":
        for k in ("scheduler", "shard_size"):
            if engine[k] is not None:
                raise where.error(f"engine.{k}", 'needs engine.kind = "dask"')
    else:
        module = None
        with contextlib.suppress(ImportError):
            module = importlib.import_module("featx.distributed")
        if module is None or not (hasattr(module, "engine") or hasattr(module, "extract_dask")):
            raise where.error("engine.kind", '"dask" is not available in this featx (featx.distributed.extract_dask '
                                             'is missing); use "local"')
        if importlib.util.find_spec("distributed") is None:
            raise where.error("engine.kind", '"dask" needs `pip install featx[dask]`; or use "local"')
    device = engine["device"].lower()
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise where.error("engine.device", f"{_show(engine['device'])} is not allowed; use auto, cpu or cuda[:N]")
    if engine["jobs"] == 0:
        raise where.error("engine.jobs", "0 is not allowed; use -1 (all cores) or a number of parallel fits")
    if engine["kind"] == "local" and device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise where.error("engine.device", f"{_show(engine['device'])}: no CUDA GPU is available here; "
                                               "use auto or cpu")
    if engine["runtime"] == "onnx" or engine["compile"] == "on":
        # the one check of runtime, device, precision and compile (featx.extract.resolve_runtime)
        from .extract import RunOptionsError, resolve_precision, resolve_runtime
        import torch
        dev = torch.device("cpu") if device == "auto" and (engine["kind"] != "local" or not torch.cuda.is_available()) \
            else torch.device("cuda" if device == "auto" else device)
        keys = {"runtime": "engine.runtime", "device": "engine.device", "compile": "engine.compile"}
        for i, b in enumerate(backbones or [{"precision": "fp32"}]):
            names = {**keys, "precision": f"backbones[{i}].precision"}
            try:
                resolve_runtime(engine["runtime"], dev, resolve_precision(b["precision"], str(dev)), 0,
                                engine["compile"], names=names)
            except RunOptionsError as e:
                raise ConfigError(f"{where.path}: {e}") from None


# --------------------------------------------------------------------------
# TOML out (tomllib only reads)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Path):
        return json.dumps(str(v), ensure_ascii=False)
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_toml(data: dict, header: str = "") -> str:
    """Write ``data`` (tables of scalars, lists and sub-tables; lists of tables) as TOML."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def table(name: str, d: dict, array: bool = False):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
        if lines:
            lines.append("")
        lines.append(f"[[{name}]]" if array else f"[{name}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{_toml_key(k)}", v)
            elif _is_table_list(v):
                for item in v:
                    table(f"{name}.{_toml_key(k)}", item, array=True)

    for k, v in data.items():
        if isinstance(v, dict):
            table(_toml_key(k), v)
        elif _is_table_list(v):
            for item in v:
                table(_toml_key(k), item, array=True)
        else:
            raise TypeError(f"top-level {k!r} must be a table")
    return "\n".join(lines) + "\n"


def _is_table_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


# --------------------------------------------------------------------------
# stage manifest


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str | None:
    from .backbones import file_sha256
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


def _slug(text: str) -> str:
    from .data import _slug as slug
    return slug(text, "x")


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
        from .files import atomic_write_text
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
    from .cache import FeatureCache
    from .data import open_dataset
    d = p.dataset
    ds = open_dataset(d["root"], d["layout"], label_regex=d["label_regex"], val_fraction=d["val_fraction"],
                      test_fraction=d["test_fraction"], seed=d["seed"], hash_index=FeatureCache(cache_dir).hash_index)
    if p.evaluate.get("drop_leaks"):       # val/test copies of train images: out of everything the run measures
        from .audit import without_leaks
        ds = without_leaks(ds)
    return ds


def _spec_label(spec) -> str:
    return f"{spec.backbone} {spec.layer} ({spec.pool}, {spec.precision})"


def _model_inputs(spec, digest, classifier, grid, cv, pca, seed, final_fit="train+val") -> dict:
    import sklearn

    from . import safemodel
    from .classify import get_classifier_spec
    values = list(grid) if grid else list(get_classifier_spec(classifier).grid)
    return {"features": spec.canonical(), "data": digest, "classifier": classifier, "grid": values, "cv": cv,
            "pca": pca, "seed": seed, "sklearn": sklearn.__version__, "final_fit": final_fit,
            "model_format": safemodel.FORMAT}


def _feature_sets(plan_backbones, fused) -> list:
    """Every feature set a run trains on: each backbone's layers, then the fusions."""
    from .train import FeatureSet
    sets = [FeatureSet((spec,)) for bb in plan_backbones for spec in bb.specs]
    for request in fused:
        sets.append(FeatureSet(tuple(next(s for s in plan_backbones[i].specs if s.layer == layer)
                                     for i, layer in request)))
    return sets


def _finetune_inputs(p: Pipeline, digest: str) -> dict:
    from .backbones import resolve_weights
    ft = p.finetune
    rw = resolve_weights(ft["backbone"], ft["weights"], seed=p.dataset["seed"])
    return {"data": digest, "backbone": ft["backbone"], "weights": rw.identity, "seed": p.dataset["seed"],
            "settings": {k: ft[k] for k in FINETUNE_ARGS}}


def plan_pipeline(p: Pipeline, cache=None, force=(), *, dataset=None) -> Plan:
    """What :func:`run_pipeline` would do: opens the dataset (hashes new
    images), looks into the cache and the stage manifest, computes nothing."""
    from .cache import FeatureCache
    from .extract import feature_specs
    force = _check_force(force)
    cache_dir = default_cache_dir(p, cache)
    cache = FeatureCache(cache_dir)
    ds = dataset if dataset is not None else _open_dataset(p, cache_dir)
    digest = _data_digest(ds)
    manifest = StageManifest(p.out_dir)
    seed = p.dataset["seed"]
    unique_ids = {s.id for s in ds.samples}

    backbones = []
    for b in p.backbones:
        info, rw, specs = feature_specs(b["name"], b["weights"], b["layers"], b["pool"], b["precision"],
                                        b["storage"], seed, p.engine["device"])
        bb = _Backbone(b, info, rw, specs)
        for spec in specs:
            have = set(cache.ids(spec.key))
            known_bad = set((manifest.data["extract"].get(spec.key) or {}).get("unreadable", {}))
            missing = unique_ids - have - known_bad
            note = f"; {len(known_bad & unique_ids)} unreadable" if known_bad & unique_ids else ""
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
        backbones.append(bb)

    train = []
    c = p.classifiers
    for spec in _feature_sets(backbones, c.get("_fused") or []):
        for name in c["names"]:
            inputs = _model_inputs(spec, digest, name, c["grids"][name], c["cv"], c["pca"], seed,
                                   c.get("final_fit", "train+val"))
            model_id = f"{_slug(spec.backbone)}-{_slug(spec.layer)}-{name}-{_digest(inputs)[:10]}"
            record = manifest.data["train"].get(model_id)
            label = f"{spec.backbone} {spec.layer} {name}"
            usable = (record is not None and record.get("inputs") == _digest(inputs)
                      and str(record.get("file", "")).endswith("model.json")
                      and _file_sha(p.out_dir / record["file"]) == record.get("sha256"))
            if usable and "train" not in force:
                item = PlanItem("train", label, "reuse", record["file"], model_id, inputs)
            else:
                from .classify import PROBE_SEARCHED, get_classifier_spec
                n = len(inputs["grid"])
                why = " (forced)" if "train" in force and usable else ""
                values = f"{n} value{'s' if n != 1 else ''}"
                if c["grids"][name] is None and name in PROBE_SEARCHED and c["pca"] is None:
                    values = f"{min(inputs['grid']):.0e}..{max(inputs['grid']):.0e} (adaptive)"
                item = PlanItem("train", label, "compute",
                                f"{get_classifier_spec(name).param_name}: {values}{why}", model_id, inputs)
            train.append(item)

    if p.finetune is None or not p.finetune["enabled"]:
        ft = PlanItem("finetune", "-", "skip", "no [finetune] table" if p.finetune is None else "enabled = false")
    else:
        inputs = _finetune_inputs(p, digest)
        record = manifest.data.get("finetune") or {}
        bundle = p.out_dir / "finetune.featx"
        usable = record.get("inputs") == _digest(inputs) and (bundle / "manifest.json").is_file()
        name = f"{p.finetune['backbone']} ({p.finetune['epochs']} epochs)"
        if usable and "finetune" not in force:
            ft = PlanItem("finetune", name, "reuse", "finetune.featx", "finetune", inputs)
        else:
            ft = PlanItem("finetune", name, "compute", "(forced)" if usable else "", "finetune", inputs)

    ev_item, rep_item = _plan_evaluate_report(p, manifest, train, ft, digest, force)
    return Plan(p, cache_dir, force, ds, digest, backbones, train, ft, ev_item, rep_item, manifest)


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
    from .classify import ComparisonRow, rank_rows
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda c: c.order)
    rows = [ComparisonRow(**{**c.row, "notes": list(c.row.get("notes") or [])}) for c in ordered]
    best = rank_rows(rows)[0]
    return ordered[next(i for i, r in enumerate(rows) if r is best)]


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
    """Context manager yielding the extract function for [engine]."""
    e = p.engine
    if e["kind"] == "local":
        from .extract import extract
        return contextlib.nullcontext(extract)
    module = importlib.import_module("featx.distributed")
    if hasattr(module, "engine"):
        return module.engine("dask", e["scheduler"], shard_size=e["shard_size"], notify=notify)
    if hasattr(module, "extract_dask"):
        return contextlib.nullcontext(functools.partial(module.extract_dask, scheduler=e["scheduler"],
                                                        **({"shard_size": e["shard_size"]} if e["shard_size"] else {})))
    raise FeatxError(f"{p.path}: engine.kind: \"dask\" needs featx.distributed.extract_dask, which this featx lacks")


def _copy_folder_atomically(src: Path, dst: Path):
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(src, tmp)
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
    from .cache import FeatureCache
    from .files import atomic_write_text
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
        report = extract_fn(ds, bb.config["name"], weights=bb.config["weights"], layers=bb.config["layers"],
                            pool=bb.config["pool"], precision=bb.config["precision"], storage=bb.config["storage"],
                            batch_size=e["batch_size"], device=e["device"], cache=cache, workers=e["workers"],
                            progress=progress, seed=p.dataset["seed"], notify=notify, compile=e["compile"],
                            runtime=e["runtime"])
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


def _save_model_atomically(pipe, folder: Path):
    from . import safemodel
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        safemodel.save(pipe, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stage_train(plan: Plan, cache, notify, events) -> list[_Candidate]:
    """Fit every feature set x classifier, through the fit store that
    ``featx compare`` shares: an identical fit made by either is reused."""
    from .classify import _fmt_value
    from .train import FitStore, fit_or_reuse, split_features
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    from .audit import leak_message, split_leaks
    leaks, dropped = split_leaks(ds), getattr(ds, "leaks_dropped", [])
    if leaks or dropped:
        notify("[train] " + leak_message(dropped or leaks, str(p.dataset["root"]), "[evaluate] drop_leaks = true",
                                         dropped=bool(dropped)))
    c = p.classifiers
    items = iter(plan.train)
    candidates = []
    total = len(plan.train)
    store = FitStore(cache)
    n = 0
    for fset in _feature_sets(plan.backbones, c.get("_fused") or []):
        data = None
        for name in c["names"]:
            item = next(items)
            n += 1
            at = f"[train {n}/{total}] {item.name}"
            if item.action == "reuse":
                record = manifest.data["train"][item.key]
                r = record["row"]
                notify(f"{at}: reused {record['file']} ({_score_text(r)})")
                events.append(dataclasses.replace(item, action="reused"))
            else:
                if data is None:
                    data = split_features(cache, fset, ds)
                seconds = [(manifest.data["extract"].get(s.key) or {}).get("seconds") for s in fset.parts]
                extract_seconds = None if all(x is None for x in seconds) else sum(x or 0.0 for x in seconds)
                fitted, pipe, reused = fit_or_reuse(
                    store, cache, fset, data, ds.classes, name, grid=c["grids"][name], pca=c["pca"], cv=c["cv"],
                    jobs=p.engine["jobs"], seed=p.dataset["seed"], final_fit=c.get("final_fit", "train+val"),
                    extract_seconds=extract_seconds, need_model=True)
                file = f"models/{item.key}/model.json"
                _save_model_atomically(pipe, p.out_dir / "models" / item.key)
                record = _plain_json({**fitted, "inputs": _digest(item.inputs), "file": file,
                                      "sha256": _file_sha(p.out_dir / file), "spec": fset.parts[0].canonical(),
                                      "key": fset.key})
                manifest.data["train"][item.key] = record
                manifest.save()
                f, r = record["fit"], record["row"]
                how = "reused an identical fit from the fit store" if reused else f"fit {r['fit_seconds']:.2f} s"
                notify(f"{at}: {f['param_name']}={_fmt_value(f['chosen'])}, {_score_text(r)}, {how}")
                events.append(dataclasses.replace(item, action="computed"))
            candidates.append(_Candidate.from_record(item.key, record, order=n))
    return candidates


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
    from .bundle import load_bundle
    from .classify import ComparisonRow
    from .evaluate import evaluate_bundle
    finetune = _finetune_function()
    ft, e = p.finetune, p.engine
    notify(f"[finetune] {item.name}")
    result = finetune(ds, ft["backbone"], bundle, weights=ft["weights"],
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
    from .classify import ComparisonRow, rank_rows
    rows = []
    for cand in candidates:
        row = ComparisonRow(**{**cand.row, "notes": list(cand.row.get("notes") or [])})
        if cand is best:
            row.notes.insert(0, "selected (best val/CV score)")
        rows.append(row)
    return rank_rows(rows)


def _best_bundle(plan: Plan, best: _Candidate, bundle_path: Path):
    """Write the best model as a bundle: a classifier's via save_bundle, the fine-tuned one copied."""
    from . import safemodel
    from .bundle import linear_manifest, save_bundle
    from .cache import FeatureSpec
    from .train import FeatureSet, fit_from_record
    p, ds, manifest = plan.pipeline, plan.dataset, plan.manifest
    if best.model_id == "finetune":
        _copy_folder_atomically(p.out_dir / "finetune.featx", bundle_path)
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
                        pca=p.classifiers["pca"], dataset=ds, test_metrics=record.get("test"), parts=parts)
    m["pipeline"] = {"file": str(p.path.resolve()), "model": best.model_id}
    save_bundle(bundle_path, m, pipe)


def _stage_evaluate(plan: Plan, item: PlanItem, best, cache, progress, notify, events) -> dict:
    from .bundle import load_bundle
    from .evaluate import evaluate_bundle, write_evaluation
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
    from .classify import write_table
    from .report import save_metrics_json, write_html_report
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


def shown(path) -> str:
    """A path as the user reads it: relative to the working folder when inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


_NOUNS = {"extract": ("feature set", "feature sets"), "train": ("model", "models"),
          "finetune": ("fine-tuned model", "fine-tuned models"), "evaluate": ("evaluation", "evaluations"),
          "report": ("report", "reports")}


def _work_text(events, actions) -> str:
    parts = []
    for stage in STAGES:
        n = sum(1 for e in events if e.stage == stage and e.action in actions)
        if n:
            one, many = _NOUNS[stage]
            parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts) or "nothing"


def summary_lines(result: RunResult) -> list[str]:
    """What ``featx run`` prints at the end: best model, its test accuracy, where the report is, what was reused."""
    r = result.best["row"]
    m = result.metrics
    from .classify import _fmt_value
    chosen = f"{r['param_name']}={_fmt_value(r['chosen'])}" if r.get("param_name") else ""
    score = r.get("val_or_cv_score")
    lines = [f"best model: {result.best['label']}" + (f" ({chosen})" if chosen else "")
             + (f", chosen by {r['score_source']} score {score:.4f}" if score is not None else "")]
    lines.append(f"{m.get('split', 'test')} accuracy: {m['accuracy']:.4f} ({m['n']} images), "
                 f"macro-F1 {m['macro']['f1']:.4f}")
    lines.append(f"report: {shown(result.report)}")
    lines.append(f"bundle: {shown(result.best['bundle'])}")
    lines.append(f"computed: {_work_text(result.events, ('computed',))}; "
                 f"reused: {_work_text(result.events, ('cached', 'reused'))} ({result.seconds:.1f} s)")
    return lines
