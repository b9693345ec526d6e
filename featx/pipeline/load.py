"""Reading a pipeline file: TOML, the schema, then the cross-checks that
need the registries (weights, layers, grids, fusions, fine-tuning, engine)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..data import PACKAGE_DATASET_PREFIX, resolve_dataset_path, resolve_path
from ..errors import ConfigError
from .schema import ARRAY_TABLES, REQUIRED_TABLES, SCHEMA, _check_table, _show, _suggest, _type_word, _Where


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
    from ..classify import get_classifier_spec
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
    from ..errors import did_you_mean
    from ..extract import _known_layers, resolve_node
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
    from ..backbones import resolve_weights
    from ..errors import WeightsError
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
    from ..backbones import get_backbone
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
        from ..extract import RunOptionsError, resolve_precision, resolve_runtime
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
