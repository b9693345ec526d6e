"""Reading a pipeline file: TOML, the schema, then the cross-checks that
need the registries (weights, layers, grids, fusions, fine-tuning, engine)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..data import PACKAGE_DATASET_PREFIX, resolve_dataset_path, resolve_path
from ..errors import ConfigError
from ..options import FINETUNE
from .schema import ARRAY_TABLES, REQUIRED_TABLES, SCHEMA, _check_table, _show, _suggest, _type_word, _Where


@dataclass
class Pipeline:
    """A validated pipeline file: every table with its defaults filled in.

    Paths are absolute (``dataset["root"]``, ``output["dir"]``,
    ``output["cache"]``, file weights); ``dataset["path"]`` keeps what the
    file says (``featx:NAME`` stays as it is). Keys that start with ``_`` are
    what loading found (``backbones[i]["_weights"]``: the ResolvedWeights;
    ``classifiers["_fused"]``: the fusions as requests); the resolved copy
    leaves them out.
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
        from ..classify import get_classifier_spec
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
    allowed values); then what needs the registries: the dataset path,
    backbone names, weights (resolved, files relative to the pipeline file),
    layer names (against the backbone's graph), classifier grids and
    fusions, fine-tuning, the output names and the engine.

    Raises
    ------
    ConfigError
        One line: ``FILE: KEY: problem; what is allowed``.
    """
    path = Path(path)
    where = _Where(path)
    tables = _read_tables(where, _read_toml(path))
    base = path.resolve().parent
    dataset, backbones = tables["dataset"], tables["backbones"]
    _resolve_dataset(where, dataset, base)
    _resolve_backbones(where, backbones, base, dataset["seed"])
    _resolve_classifiers(where, tables["classifiers"], backbones)
    if tables["finetune"] is not None:
        _resolve_finetune(where, tables["finetune"], backbones, base, dataset["seed"])
    _resolve_output(where, tables["output"], tables["report"], base, path.stem)
    _check_engine(where, tables["engine"], backbones)
    return Pipeline(path, **tables)


def _read_tables(where: _Where, raw: dict) -> dict:
    """Every table of :data:`SCHEMA` checked against it, defaults filled
    (``finetune`` None when the file has no [finetune])."""
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
    tables = {}
    for name, schema in SCHEMA.items():
        if name in ARRAY_TABLES:
            if not raw[name]:
                raise where.error(name, f"empty; add at least one [[{name}]] table")
            tables[name] = [_check_table(where, f"{name}[{i}]", t, schema) for i, t in enumerate(raw[name])]
        elif name == "finetune" and name not in raw:
            tables[name] = None
        else:
            tables[name] = _check_table(where, name, raw.get(name, {}), schema)
    return tables


def _resolve_dataset(where: _Where, dataset: dict, base: Path):
    """Cross-key rules of [dataset]; ``dataset["root"]``: the folder or CSV it names."""
    from ..data import _check_fractions
    try:
        _check_fractions(dataset["val_fraction"], dataset["test_fraction"])    # data's rule, the file's words
    except ConfigError:
        raise where.error("dataset.test_fraction", f"val_fraction + test_fraction = "
                          f"{dataset['val_fraction'] + dataset['test_fraction']:g} must be below 1") from None
    if dataset["label_regex"] is not None and dataset["layout"] not in ("auto", "filenames"):
        raise where.error("dataset.label_regex", f"applies to layout \"filenames\" only, not {_show(dataset['layout'])}")
    try:
        dataset["root"] = resolve_dataset_path(dataset["path"], base)
    except ConfigError as e:
        raise where.error("dataset.path", str(e)) from None
    if not dataset["root"].exists():
        raise where.error("dataset.path", f"{_show(dataset['path'])}: no such file or folder ({dataset['root']})")


def _resolve_backbones(where: _Where, backbones: list[dict], base: Path, seed: int):
    """Weights and layers of every [[backbones]] table; no two tables make the same features."""
    seen = {}
    for i, b in enumerate(backbones):
        _resolve_backbone(where, f"backbones[{i}]", b, base, seed)
        ident = (b["name"], b["_weights"].identity, b["pool"], b["precision"], b["storage"])
        if ident in seen:
            raise where.error(f"backbones[{i}]", f"same backbone, weights, pool and precision as "
                                                 f"backbones[{seen[ident]}]; put all its layers in one table")
        seen[ident] = i


def _resolve_classifiers(where: _Where, classifiers: dict, backbones: list[dict]):
    """Names listed once, a grid per name (None: the default), fusions as requests (``_fused``)."""
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


def _resolve_output(where: _Where, output: dict, report: dict, base: Path, stem: str):
    """Absolute output and cache folders (default: runs/STEM beside the file), the bundle name, the title."""
    output["dir"] = resolve_path(output["dir"], base) if output["dir"] else base / "runs" / stem
    if output["cache"]:
        output["cache"] = resolve_path(output["cache"], base)
    if not output["bundle"].endswith(".featx") or "/" in output["bundle"] or "\\" in output["bundle"]:
        raise where.error("output.bundle", f"{_show(output['bundle'])} must be a folder name ending in .featx "
                                           "(it is written inside output.dir)")
    if report["title"] is None:
        report["title"] = f"featx pipeline {stem}"


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
    """A grid of numbers, each checked by :func:`featx.train.parse_grid` (the rule ``--C`` follows)."""
    from ..classify import get_classifier_spec
    from ..train import parse_grid
    if not isinstance(values, list) or not values:
        raise where.error(dotted, f"expected a non-empty list of numbers (values of "
                                  f"{get_classifier_spec(classifier).param_name}), "
                                  f"got {_type_word(values)} ({_show(values)})")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise where.error(f"{dotted}[{i}]", f"expected a number, got {_type_word(v)} ({_show(v)})")
        try:
            out += parse_grid(classifier, [repr(v)])
        except ConfigError as e:
            raise where.error(f"{dotted}[{i}]", _unprefixed(e, "--C ")) from None
    return list(dict.fromkeys(out))


def _unprefixed(error: Exception, prefix: str) -> str:
    """A library message without the command-line words it starts with (``--C ``)."""
    msg = str(error)
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def check_layer(backbone: str, layer: str) -> str | None:
    """None when ``layer`` can be extracted from ``backbone`` (as
    :func:`featx.extract.check_layers` decides); else the problem."""
    from ..errors import BackboneError, did_you_mean
    from ..extract import _known_layers, check_layers
    try:
        check_layers(backbone, [layer])
        return None
    except BackboneError:
        pass
    # suggest what `featx layers` lists (blocks), not the nodes deep inside them
    hint = did_you_mean(layer, _known_layers(backbone)[1], n=3, cutoff=0.5)
    hint = f" ({hint})" if hint else ""
    return f"no layer {_show(layer)} in {backbone}{hint}; list them with `featx layers {backbone}`"


def _resolve_weights_at(where, dotted, backbone, weights, base, seed):
    """ResolvedWeights for a pipeline's weights value (a file: relative to the pipeline)."""
    from ..backbones import resolve_weights
    from ..errors import WeightsError
    value = str(resolve_path(weights, base)) if _looks_like_path(weights) else weights
    try:
        rw = resolve_weights(backbone, value, seed=seed)
    except WeightsError as e:
        raise where.error(dotted, f"{_show(weights)}: {_unprefixed(e, f'--weights {value}: ')}") from None
    if rw.kind == "port" and not rw.available:
        # ported weights come from a package only; torchvision's may still download
        raise where.error(dotted, f"{_show(weights)}: not installed; {rw.hint}")
    return value, rw


def _resolve_backbone(where, at, b, base, seed):
    from ..backbones import get_backbone
    info = get_backbone(b["name"])
    b["weights"], rw = _resolve_weights_at(where, f"{at}.weights", b["name"], b["weights"], base, seed)
    b["_weights"] = rw             # resolved once: the plan builds its feature specs from it
    layers = b["layers"] or [info.default_layer]
    if len(set(layers)) != len(layers):
        dup = next(x for x in layers if layers.count(x) > 1)
        raise where.error(f"{at}.layers", f"{_show(dup)} is listed twice")
    for j, layer in enumerate(layers):
        problem = check_layer(info.name, layer)
        if problem:
            raise where.error(f"{at}.layers[{j}]", problem)
    b["layers"] = list(layers)


#: the [finetune] keys that are keywords of featx.finetune.finetune (tests/test_options.py holds it to them)
FINETUNE_ARGS = tuple(o.name for o in FINETUNE if o.table == "finetune")


def _resolve_finetune(where, ft, backbones, base, seed):
    """The backbone (default: the first [[backbones]]) and its weights (default: that table's)."""
    if ft["backbone"] is None:
        ft["backbone"] = backbones[0]["name"]
    same = next((b for b in backbones if b["name"] == ft["backbone"]), None)
    if ft["weights"] is None and same is not None:   # that table's, already resolved
        ft["weights"], ft["_weights"] = same["weights"], same["_weights"]
    else:   # resolved once, here: the plan keys the stage by it and the trainer loads it
        ft["weights"], ft["_weights"] = _resolve_weights_at(where, "finetune.weights", ft["backbone"],
                                                            ft["weights"] or "auto", base, seed)
    if ft["freeze_epochs"] is not None and ft["freeze_epochs"] > ft["epochs"]:
        raise where.error("finetune.freeze_epochs", f"{ft['freeze_epochs']} must be at most finetune.epochs ({ft['epochs']})")


def _check_engine(where, engine, backbones):
    """[engine]: dask settings only with dask, a device this machine has, and the
    run options checked together by :func:`featx.extract.resolve_runtime`."""
    if engine["kind"] == "local":
        for k in ("scheduler", "shard_size"):
            if engine[k] is not None:
                raise where.error(f"engine.{k}", 'needs engine.kind = "dask"')
    elif importlib.util.find_spec("distributed") is None:
        raise where.error("engine.kind", '"dask" needs `pip install featx[dask]`; or use "local"')
    device = engine["device"].lower()
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise where.error("engine.device", f"{_show(engine['device'])} is not allowed; use auto, cpu or cuda[:N]")
    if engine["jobs"] == 0:
        raise where.error("engine.jobs", "0 is not allowed; use -1 (all cores) or a number of parallel fits")
    import torch

    from ..extract import RunOptionsError, resolve_device, resolve_precision, resolve_runtime
    if engine["kind"] == "local":
        try:
            dev = resolve_device(device)
        except ConfigError:          # the one problem left: no GPU on this machine
            raise where.error("engine.device", f"{_show(engine['device'])}: no CUDA GPU is available here; "
                                               "use auto or cpu") from None
    else:                            # the workers' devices are not known here: auto counts as the CPU
        dev = torch.device("cpu" if device == "auto" else device)
    int8 = [i for i, b in enumerate(backbones) if b["precision"] == "int8"]
    if int8 and engine["kind"] != "local":
        raise where.error("engine.kind", f"Dask workers do not run int8 (backbones[{int8[0]}].precision); "
                                         "use kind = \"local\" or precision fp32")
    if engine["runtime"] != "onnx" and engine["compile"] != "on" and not int8:
        return                       # torch, compiled or not, runs with every device and float precision
    keys = {"runtime": "engine.runtime", "device": "engine.device", "compile": "engine.compile"}
    for i, b in enumerate(backbones):
        names = {**keys, "precision": f"backbones[{i}].precision"}
        # auto is the CPU for int8 (ONNX Runtime's CPU provider), whatever the other backbones get
        bdev = resolve_device(device, b["precision"]) if engine["kind"] == "local" else dev
        try:
            resolve_runtime(engine["runtime"], bdev, resolve_precision(b["precision"], str(bdev)), 0,
                            engine["compile"], names=names)
        except RunOptionsError as e:
            raise ConfigError(f"{where.path}: {e}") from None
