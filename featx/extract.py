"""Batched, frozen feature extraction into the cache.

The frozen model runs in eval mode under ``torch.inference_mode``; every
requested layer comes out of one forward pass (torchvision's
``create_feature_extractor``, which also drops whatever follows the last
requested layer, the final fc included). Images are decoded in DataLoader
workers; each finished batch is handed to a writer thread that stores it as
a part file, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .backbones import (BackboneInfo, DeferredBackbone, LoadedBackbone, Preprocess, ResolvedWeights, get_backbone, load_backbone,
                        resolve_weights)
from .cache import (COMMIT_EVERY_ROWS, FORMAT_VERSION, CacheWriteError, DiskFullError, FeatureCache, FeatureSpec,
                    disk_full_error, write_part_file)
from .data import Dataset, Sample
from .errors import BackboneError, ConfigError, ImageError, WeightsError
from .options import POOLS, PRECISIONS, STORAGES
from .quantize import ModelStore, QuantizationError
from .text import error_text
# preprocess_image, ImageFiles, collate, sort_out_bad and default_workers are imported from here too
from .inference import ImageBatches, ImageFiles, autocast, collate, default_workers, sort_out_bad  # noqa: F401
from .preprocess import Normalize, preprocess_image  # noqa: F401

# cache formats extraction can still make: 2 resized with PIL (bundles
# trained before format 3 keep predicting), 3 with torchvision's uint8 resize
COMPUTABLE_FORMATS = (2, 3)


# --------------------------------------------------------------------------
# the network


def pool_features(t: torch.Tensor, pool: str, layout: str = "nchw", prefix_tokens: int = 0,
                  layer: str = "") -> torch.Tensor:
    """One (N, D) vector per image from an activation.

    ``layout``: ``nchw`` feature maps, ``nhwc`` (Swin's stages: permuted
    first), or ``tokens`` (N, T, D) transformer tokens, of which the first
    ``prefix_tokens`` (the class token) are not patches: ``cls`` takes token
    0, ``avg``/``max``/``avgmax`` pool the patch tokens, ``none`` flattens
    all. A 2-d (N, D) vector is already pooled: every pool keeps it."""
    if t.ndim == 4 and layout == "nhwc":
        t = t.permute(0, 3, 1, 2)
    if t.ndim == 3 and layout == "tokens" and pool != "none":
        if pool == "cls":
            if prefix_tokens < 1:
                raise BackboneError(f"--pool cls: layer {layer} holds patch tokens only, no class token; "
                                    "use --pool avg, max or avgmax")
            return t[:, 0]
        patches = t[:, prefix_tokens:]
        if pool == "avg":
            return patches.mean(dim=1)
        if pool == "max":
            return patches.amax(dim=1)
        if pool == "avgmax":
            return torch.cat([patches.mean(dim=1), patches.amax(dim=1)], dim=1)
    if t.ndim == 4:
        if pool == "avg":
            return t.mean(dim=(2, 3))
        if pool == "max":
            return t.amax(dim=(2, 3))
        if pool == "avgmax":
            return torch.cat([t.mean(dim=(2, 3)), t.amax(dim=(2, 3))], dim=1)
        if pool == "cls":
            raise BackboneError(f"--pool cls: layer {layer} gives feature maps ({'x'.join(map(str, t.shape[1:]))}), "
                                "not tokens with a class token; use --pool avg, max or avgmax")
    if pool == "cls" and t.ndim > 2:
        raise BackboneError(f"--pool cls: layer {layer} gives a {'x'.join(map(str, t.shape[1:]))} tensor, "
                            "not tokens with a class token; use --pool avg, max, avgmax or none")
    return t.flatten(1)


def activation_layout(backbone: str, node: str) -> tuple[str, int]:
    """(layout, prefix tokens) of graph node ``node``'s output, for :func:`pool_features`."""
    try:
        info = get_backbone(backbone)
    except BackboneError:
        return "nchw", 0

    def under(prefixes):
        return any(node == p or node.startswith(p + ".") for p in prefixes)
    if under(info.channels_last):
        return "nhwc", 0
    if info.prefix_tokens:
        return "tokens", 0 if under(info.patch_tokens_only) else info.prefix_tokens
    return "nchw", 0


class FeatureNet(nn.Module):
    """uint8 NCHW images in, one pooled (N, D) tensor per requested layer out."""

    def __init__(self, model: nn.Module, layers: list[str], pool: str, pre: Preprocess, fuse: bool = False,
                 backbone: str = "BACKBONE"):
        super().__init__()
        self.layers = list(layers)
        self.pool = pool
        self.body, self.node_of = _feature_body(fuse_conv_bn(model) if fuse else model, self.layers, backbone)
        self.layout_of = {name: activation_layout(backbone, self.node_of[name]) for name in self.layers}
        self.normalize = Normalize(pre)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.body(self.normalize(x))
        return [self.pool_one(name, outs[self.node_of[name]], self.pool).float() for name in self.layers]

    def pool_one(self, name: str, t: torch.Tensor, pool: str) -> torch.Tensor:
        layout, prefix = self.layout_of[name]
        return pool_features(t, pool, layout, prefix, name)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into the
    conv (BN becomes Identity), keeping all module and node names.

    Inference only: the fused model computes the same function with one
    pass over memory instead of two (about 1.5x faster on CPU)."""
    import copy

    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models stay unfused
        return model
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), nn.Conv2d)
                and not modules[node.target].training and modules[node.target].track_running_stats):
            pairs.append((src.target, node.target))
    if not pairs:
        return model
    model = copy.deepcopy(model)  # the caller's model stays as it was
    modules = dict(model.named_modules())
    for conv, bn in pairs:
        model.set_submodule(conv, fuse_conv_bn_eval(modules[conv], modules[bn]))
        model.set_submodule(bn, nn.Identity())
    return model


class _Hooked(nn.Module):
    """For models torch.fx cannot trace: forward hooks on named modules."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.layers = layers
        modules = dict(model.named_modules())
        self._store: dict[str, torch.Tensor] = {}
        for name in layers:
            modules[name].register_forward_hook(self._saver(name))

    def _saver(self, name):
        def hook(_module, _inputs, output):
            self._store[name] = output
        return hook

    def forward(self, x):
        self._store = {}
        self.model(x)
        return dict(self._store)


def _feature_body(model: nn.Module, layers: list[str], backbone: str = "BACKBONE"):
    from torchvision.models.feature_extraction import create_feature_extractor
    names = graph_nodes(model)
    if names is not None:
        node_of = {}
        for layer in layers:
            node = resolve_node(layer, names)
            if node is None:
                raise BackboneError(_unknown_layer_message(layer, _block_names(model, names), backbone))
            node_of[layer] = node
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body = create_feature_extractor(model, return_nodes={n: n for n in node_of.values()})
        return body, node_of
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules or n == ""]
    if unknown:
        raise BackboneError(_unknown_layer_message(unknown[0], [m for m in modules if m], backbone))
    return _Hooked(model, layers), {n: n for n in layers}


def resolve_node(layer: str, nodes: list[str]) -> str | None:
    """A graph node, or a module whose output is its last node
    (``features.14`` of MobileNetV2 ends in ``features.14.add``)."""
    if layer in nodes:
        return layer
    inside = [n for n in nodes if n.startswith(layer + ".")]
    return inside[-1] if inside else None


def _unknown_layer_message(name: str, listed: list[str], backbone: str) -> str:
    """``listed``: what ``featx layers BACKBONE`` shows, the only names suggested."""
    from .errors import did_you_mean
    hint = did_you_mean(name, listed, n=3, cutoff=0.5)
    return (f"--layer {name}: no such layer in {backbone}{'; ' + hint if hint else ''} "
            f"(list them with `featx layers {backbone}`)")


@functools.lru_cache(maxsize=16)
def _known_layers(backbone: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(every extractable name, those ``featx layers`` lists, whether they are graph nodes)."""
    info = get_backbone(backbone)
    state = torch.random.get_rng_state()
    try:
        model = info.build(num_classes=1000, pretrained=False).eval()
    finally:
        torch.random.set_rng_state(state)
    nodes = graph_nodes(model)
    if nodes is None:
        names = tuple(n for n, _ in model.named_modules() if n)
        return names, names, False
    listed = _block_names(model, nodes)
    if info.default_layer not in listed:
        listed.append(info.default_layer)
    return tuple(nodes), tuple(listed), True


def check_layers(backbone: str, layers) -> None:
    """BackboneError naming the first of ``layers`` that ``backbone`` does not have.

    Builds the (randomly initialised) network to read its layer names, so a
    command can say so before it reads a dataset. Suggestions come from
    what ``featx layers BACKBONE`` lists.
    """
    info = get_backbone(backbone)
    # the default layer exists: no network built (nor torchvision imported) to say so
    layers = [layer for layer in (layers or []) if layer and layer != info.default_layer]
    if not layers:
        return
    names, listed, is_graph = _known_layers(info.name)
    for layer in layers:
        found = resolve_node(layer, list(names)) if is_graph else (layer if layer in names else None)
        if found is None:
            raise BackboneError(_unknown_layer_message(layer, list(listed), info.name))


def graph_nodes(model: nn.Module) -> list[str] | None:
    """Eval-mode torch.fx node names, or None when the model does not trace."""
    from torchvision.models.feature_extraction import get_graph_node_names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, ev = get_graph_node_names(model)
        return [n for n in ev if n != "x"]
    except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
        return None


def layer_table(backbone: str, all_nodes: bool = False) -> list[dict]:
    """Extractable layers with their output shape for one image.

    By default: top-level modules, the blocks inside top-level
    Sequential/ModuleList containers, and top-level functional nodes
    (``flatten``); ``all_nodes`` lists every graph node."""
    info = get_backbone(backbone)
    rw = resolve_weights(info, "none")
    torch.manual_seed(0)
    model = info.build(num_classes=1000, pretrained=False).eval()
    nodes = graph_nodes(model)
    if nodes is None or all_nodes:
        names = nodes or [n for n, _ in model.named_modules() if n]
    else:
        names = _block_names(model, nodes)
        if info.default_layer not in names:
            names.append(info.default_layer)
    net = FeatureNet(model, names, "none", rw.preprocess, backbone=info.name)
    x = torch.zeros((1, 3, rw.preprocess.crop, rw.preprocess.crop), dtype=torch.uint8)
    with torch.inference_mode():
        outs = net.body(net.normalize(x))
    rows = []
    for n in names:
        out = outs[net.node_of[n]]
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != 1:
            continue   # shape arithmetic, parameters: nothing per image to extract
        shape = tuple(out.shape[1:])
        pooled = int(net.pool_one(n, out, "avg").shape[1])
        rows.append({"layer": n, "shape": shape, "avg_dim": pooled, "default": n == info.default_layer})
    return rows


def _block_names(model: nn.Module, nodes: list[str]) -> list[str]:
    names = []
    for name, module in model.named_children():
        if resolve_node(name, nodes) is None:
            continue
        names.append(name)
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            names += [f"{name}.{child}" for child, _ in module.named_children()
                      if resolve_node(f"{name}.{child}", nodes) is not None]
    for blocks in getattr(model, "feature_blocks", ()):   # nested block containers (ViT's encoder.layers)
        names += [f"{blocks}.{child}" for child, _ in model.get_submodule(blocks).named_children()
                  if resolve_node(f"{blocks}.{child}", nodes) is not None]
    modules = {n for n, _ in model.named_modules()}
    top_functional = [n for n in nodes if "." not in n and n not in modules and not n.startswith(("getattr", "size"))
                      and getattr(model, "list_functional_nodes", True)]   # featx's ViTs: token plumbing only
    # keep graph order
    order = {n: i for i, n in enumerate(nodes)}
    wanted = set(names) | set(top_functional)
    # graph order; a container after its last block (same output node)
    return sorted(wanted, key=lambda n: (order.get(resolve_node(n, nodes), 0), -len(n)))


# --------------------------------------------------------------------------
# orchestration


def resolve_device(device: str | None, precision: str | None = None) -> torch.device:
    """``auto``: a CUDA GPU when there is one, else the CPU; with ``precision``
    int8 always the CPU (int8 runs on ONNX Runtime's CPU provider only; an
    explicit ``cuda`` with int8 is refused by :func:`resolve_runtime`)."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if precision != "int8" and torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device {device}: use auto, cpu or cuda[:N]")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware (elsewhere they are
    emulated and far slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``auto``: bf16 (else fp16) on GPUs, fp32 on CPUs (the fast CPU path is
    ONNX Runtime in fp32, and the same command then fills the same cache
    entries on every CPU machine; ``bf16`` is there to ask for on CPUs with
    AMX or AVX512-BF16). The resolved value is what goes into the cache key."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    dev = resolve_device(device if isinstance(device, str) or device is None else str(device))
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _check_computable(feature_format: int) -> None:
    if feature_format not in COMPUTABLE_FORMATS:
        raise ConfigError(f"features of cache format {feature_format} can no longer be computed "
                          f"(this featx makes formats {', '.join(map(str, COMPUTABLE_FORMATS))}); train the model again")


def feature_specs(backbone: str, weights: str | None = "auto", layers: list[str] | None = None,
                  pool: str = "avg", precision: str = "auto", storage: str = "float32", seed: int = 0,
                  device: str | None = "auto", resolved: ResolvedWeights | None = None,
                  feature_format: int = FORMAT_VERSION, calibration: str = ""):
    """The cache specs an extraction would fill, without loading anything heavy.

    ``resolved`` overrides ``weights`` (e.g. a fine-tuned bundle's network);
    ``feature_format`` makes features the way an older featx did, for the
    bundles it trained (see :data:`COMPUTABLE_FORMATS`); ``calibration`` is
    an int8 extraction's calibration id (:func:`featx.quantize.calibration_for`;
    empty, the specs only check the options)."""
    _check_computable(feature_format)
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool}: use one of {', '.join(POOLS)}")
    precision = resolve_precision(precision, device)
    if storage not in STORAGES:
        raise ConfigError(f"--storage {storage}: use one of {', '.join(STORAGES)}")
    info = get_backbone(backbone)
    if pool == "cls" and not info.prefix_tokens:
        raise ConfigError(f"--pool cls: {info.name} has no class token (ViT and DINOv2 have); "
                          "use --pool avg, max, avgmax or none")
    rw = resolved or resolve_weights(info, weights, seed=seed)
    layers = list(dict.fromkeys(layers or [info.default_layer]))
    specs = [FeatureSpec(info.name, rw.identity, layer, pool, rw.preprocess.as_dict(), precision, storage,
                         feature_format, calibration if precision == "int8" else "") for layer in layers]
    return Specs(info, rw, specs, seed)


@dataclass(frozen=True)
class Specs:
    """What :func:`feature_specs` resolved, once: the backbone, its weights
    and the cache spec of each layer (unpacks as ``info, weights, specs``).
    :func:`extract` takes it as it is, so one command resolves weights once."""

    info: BackboneInfo
    weights: ResolvedWeights
    specs: list[FeatureSpec]
    seed: int = 0

    def __iter__(self):   # info, rw, specs = feature_specs(...), as when it returned a tuple
        return iter((self.info, self.weights, self.specs))

    def __getitem__(self, i):
        return (self.info, self.weights, self.specs)[i]

    def with_specs(self, specs: list[FeatureSpec]) -> "Specs":
        return dataclasses.replace(self, specs=list(specs))


@dataclass(frozen=True)
class RunOptions:
    """How an extraction runs, as opposed to what it computes (:class:`Specs`):
    nothing here is in a cache key. :func:`resolve_runtime` checks device,
    precision, runtime and compile together."""

    device: str | None = "auto"
    runtime: str = "auto"
    compile: str | bool = "auto"
    batch_size: int | None = None
    workers: int | None = None
    strict: bool = False
    progress: bool = True

    def check(self, precision: str) -> torch.device:
        """The device; bad or clashing options raise before any work."""
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        dev = resolve_device(self.device, precision)
        resolve_runtime(self.runtime, dev, precision, 0, self.compile)
        return dev


@dataclass
class ExtractReport:
    specs: list[FeatureSpec]
    keys: list[str]
    n_images: int                    # unique images asked for
    n_cached: int                    # of those, already cached before this run
    n_extracted: int                 # newly computed
    n_resumed: int                   # rows recovered from a killed run's parts
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    cache_dir: str = ""
    runtime: str = "torch"           # what ran the forward pass: torch, onnx (ONNX Runtime); mixed (Dask)

    @property
    def where(self) -> str:
        """``cpu``, ``cuda:0``, ``cpu, onnxruntime``, ``cpu, onnxruntime int8`` (a Dask
        run names each worker's): for messages."""
        if self.runtime == "onnx" and not self.device.startswith("dask"):
            int8 = " int8" if self.specs and self.specs[0].precision == "int8" else ""
            return f"{self.device}, onnxruntime{int8}"
        return self.device

    @property
    def images_per_second(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else 0.0


def _unique_samples(samples: list[Sample]) -> list[Sample]:
    seen, out = set(), []
    for s in samples:
        if s.id not in seen:
            seen.add(s.id)
            out.append(s)
    return out


@dataclass
class ExtractPlan:
    """What an extraction has to do, worked out under the entries' lock."""
    unique: list[Sample]             # the images asked for, each content once
    todo: list[Sample]               # those missing from at least one entry
    needed: list[FeatureSpec]        # the entries (layers) missing something
    resumed: int                     # rows merged from an interrupted run's parts
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason): a read-only
    # cache's missing images that do not decode: skipped, as a writable cache's run would skip them

    @property
    def n_cached(self) -> int:
        return len(self.unique) - len(self.todo) - len(self.unreadable)


@contextlib.contextmanager
def planned(cache: FeatureCache, specs: list[FeatureSpec], samples: list[Sample], notify, strict: bool = False):
    """Lock ``specs``' entries, merge what a killed run left, and yield the
    :class:`ExtractPlan`; the lock is held until the block ends. Shared by the
    local and the Dask extraction, so both resume and skip alike. A cache
    that cannot be written is refused only when some missing image decodes
    (those that do not are skipped, or stop the run with ``strict``)."""
    unique = _unique_samples(samples)
    with cache.locked([s.key for s in specs], notify=notify):
        resumed = 0
        for spec in specs:
            if cache.needs_commit(spec.key):   # a killed run's batches, a format-3 file to migrate
                try:
                    resumed += cache.consolidate(spec.key, spec, notify=notify)
                except CacheWriteError as e:   # full or read-only: go on with what the entry holds
                    notify(f"pending rows of {spec.key} not merged: {e}; going on with the rows already merged")
        if resumed:
            notify(f"resumed: {resumed} rows from an interrupted run merged into the cache")
        # the rows this run would rely on are read through their checksums;
        # damaged ones are dropped here and so extracted again
        wanted = [s.id for s in unique]
        for spec in specs:
            bad = cache.damaged_rows(spec.key, wanted)
            if bad and not cache.writable():
                raise cache._damaged(spec.key, cache.path(spec.key), bad)
            if bad:
                cache.consolidate(spec.key, spec, notify=notify, repair=True)
        have = [cache.contains(s.key, wanted) for s in specs]     # sorted ids looked up, no set of strings
        todo = [s for s, *h in zip(unique, *have) if not all(h)]
        # only the layers that miss something are computed
        needed = [spec for spec, h in zip(specs, have) if not h.all()]
        unreadable = []
        if todo and not cache.writable():
            unreadable = _undecodable(todo, strict)
            if len(unreadable) < len(todo):
                cache.check_writable(f"{len(todo) - len(unreadable)} of the {len(unique)} images have no features "
                                     "there yet")
            todo, needed = [], []   # every missing image is unreadable: nothing to write
        yield ExtractPlan(unique, todo, needed, resumed, unreadable)


def _undecodable(samples: list[Sample], strict: bool) -> list[tuple[str, str]]:
    """``(path, reason)`` of the ``samples`` that do not decode (with
    ``strict`` the first raises, as in :func:`~featx.inference.sort_out_bad`)."""
    from .data import load_image

    def reason(s: Sample) -> str:
        try:
            load_image(s.path).close()
        except ImageError as e:
            return e.reason
        return ""
    return sort_out_bad([reason(s) for s in samples], lambda i: str(samples[i].path), strict)[1]


_SPEC_OPTIONS = ("weights", "layers", "pool", "precision", "storage", "seed", "resolved", "feature_format")
_RUN_OPTIONS = tuple(f.name for f in dataclasses.fields(RunOptions))


def split_options(options: dict) -> tuple[dict, dict]:
    """Keywords of :func:`extract` as ``(what feature_specs takes, the rest)``."""
    return ({k: v for k, v in options.items() if k in _SPEC_OPTIONS},
            {k: v for k, v in options.items() if k not in _SPEC_OPTIONS})


def extract(dataset: Dataset | list[Sample], specs: Specs | str | None = None, run: RunOptions | None = None, *,
            cache: FeatureCache | str | os.PathLike = "cache", notify=None, loaded: LoadedBackbone | None = None,
            calibration=None, backbone: str | None = None, **options) -> ExtractReport:
    """Extract ``specs`` (from :func:`feature_specs`) for every image not yet cached.

    ``run`` says how (:class:`RunOptions`). For short calls ``specs`` may be
    a backbone name (or ``backbone=``), with :func:`feature_specs`' and
    :class:`RunOptions`' keywords (``extract(ds, "resnet50", weights="none", device="cpu")``).
    int8 specs are calibrated on ``dataset``'s images (:mod:`featx.quantize`)
    unless ``calibration`` is given; when quantization fails, the images are
    extracted in fp32, into fp32 entries, and ``notify`` says so.

    Returns an :class:`ExtractReport`; a second identical call extracts
    nothing. Bad images are skipped and listed in ``report.skipped`` (or
    raise :class:`~featx.errors.ImageError` with ``strict=True``).
    """
    specs, run = specs_and_run(specs, run, backbone, options)
    notify = notify or (lambda msg: None)
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    samples = dataset.samples if isinstance(dataset, Dataset) else list(dataset)
    given = calibration is not None
    specs, calibration = _calibrated(specs, samples, calibration, cache)
    try:
        return _extract(dataset, samples, specs, run, cache, notify, loaded, calibration)
    except QuantizationError as e:
        if given or (calibration.samples == [] and calibration.ranges is None):
            raise   # a bundle's int8 features (or another calibration's): fp32 would not be them
        fp32 = specs.with_specs([dataclasses.replace(p, precision="fp32", calibration="") for p in specs.specs])
        notify(f"{e}; extracting in fp32 instead (entries {', '.join(p.key for p in fp32.specs)})")
        return _extract(dataset, samples, fp32, run, cache, notify, loaded, None)


def specs_and_run(specs: Specs | str | None, run: RunOptions | None, backbone: str | None = None,
                  options: dict | None = None, caller: str = "extract") -> tuple[Specs, RunOptions]:
    """The arguments :func:`extract` (and :func:`featx.distributed.extract_dask`)
    take, as :class:`Specs` and :class:`RunOptions`: ready ones are checked,
    a backbone name with keywords is resolved here, once."""
    options = {k: v for k, v in (options or {}).items() if not (k == "feature_format" and v is None)}
    unknown = set(options) - set(_SPEC_OPTIONS) - set(_RUN_OPTIONS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {', '.join(sorted(unknown))}")
    specs = backbone if specs is None else specs
    if specs is None:
        raise TypeError(f"{caller}() needs specs (from feature_specs) or a backbone name")
    if run is None:
        run = RunOptions(**{k: v for k, v in options.items() if k in _RUN_OPTIONS})
    elif any(k in _RUN_OPTIONS for k in options):
        raise TypeError(f"{caller}(): give run options in RunOptions, not beside it")
    if isinstance(specs, str):
        return feature_specs(specs, device=run.device, **split_options(options)[0]), run
    if any(k in _SPEC_OPTIONS for k in options):
        raise TypeError(f"{caller}(): give spec options to feature_specs(), not with ready Specs")
    pre = specs.weights.preprocess.as_dict()
    for spec in specs.specs:   # ready specs (a bundle's): what feature_specs would have checked
        _check_computable(spec.format)
        made = (spec.backbone, spec.weights, spec.preprocess)
        if made != (specs.info.name, specs.weights.identity, pre) or spec.pool not in POOLS \
                or spec.precision not in PRECISIONS or spec.storage not in STORAGES:
            raise ConfigError(f"features {spec.canonical()} are not what this featx computes from "
                              f"{specs.info.name} with weights {specs.weights.identity} (preprocess {pre}); "
                              "train the model again")
    return specs, run


def calibrated(specs: Specs, samples: list[Sample], cache: FeatureCache | str | os.PathLike) -> Specs:
    """``specs`` with the calibration id an :func:`extract` of ``samples`` into
    ``cache`` would give them (int8 only; other specs come back as they are):
    what a plan needs to know the keys before extracting."""
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    return _calibrated(specs, samples, None, cache)[0]


def _calibrated(specs: Specs, samples: list[Sample], calibration, cache: FeatureCache):
    """int8 specs with their calibration's id, and that calibration (None for
    other precisions): the one given, else the dataset's own (see
    :func:`featx.quantize.calibration_for`)."""
    from .quantize import Calibration, calibration_for
    if specs.specs[0].precision != "int8":
        return specs, None
    given = specs.specs[0].calibration
    if calibration is None:   # reads the store, writes nothing (OnnxForward records the calibration)
        calibration = calibration_for(samples, specs.seed, ModelStore(cache.root),
                                      f"{specs.info.name}:{specs.weights.identity}")
        if given and given != calibration.id:   # made on other images: only the store can have it
            calibration = Calibration(given)
    return specs.with_specs([dataclasses.replace(p, calibration=calibration.id) for p in specs.specs]), calibration


def _extract(dataset, samples: list[Sample], specs: Specs, run: RunOptions, cache: FeatureCache, notify,
             loaded, calibration) -> ExtractReport:
    t0 = time.perf_counter()
    info, rw, wanted = specs
    manifest = dataset.manifest() if isinstance(dataset, Dataset) else None
    precision = wanted[0].precision
    if loaded is None and rw.kind == "file":
        # a weights file that does not fit fails before any image is read
        loaded = load_backbone(info.name, resolved=rw, seed=specs.seed)
    dev = run.check(precision)
    if dev.type == "cpu" and (precision == "fp16" or (precision == "bf16" and not cpu_has_native_bf16())):
        notify(f"--precision {precision}: this CPU computes {precision} in software, many times slower than fp32 "
               "(measured: about 25x on an AVX2 CPU); --precision auto picks what runs fast here")
    extracted, skipped, used = 0, [], "torch"
    with planned(cache, wanted, samples, notify, run.strict) as plan:
        skipped = list(plan.unreadable)
        if plan.todo:
            lb = loaded or DeferredBackbone(info, rw, specs.seed)
            onnx = resolve_runtime(run.runtime, dev, precision, len(plan.todo), run.compile) == "onnx"
            if isinstance(lb, DeferredBackbone) and not (onnx and _export_stored(lb, plan.needed, cache)):
                lb.model   # built now: weights that do not load fail before any image is decoded
            try:
                extracted, skipped, used = _run(lb, plan.needed, plan.todo, cache, run, device=dev,
                                                precision=precision, notify=notify, calibration=calibration)
            except DiskFullError:
                raise disk_full_error(cache.root, _space_needed(cache, plan),
                                      " (finished batches are kept)") from None
        for spec in wanted:
            try:
                cache.consolidate(spec.key, spec, manifest=manifest, notify=notify)
            except CacheWriteError as e:
                if plan.todo:
                    raise
                notify(f"{spec.key} left as it was: {e}; every feature asked for is there, going on")
    return ExtractReport(wanted, [s.key for s in wanted], len(plan.unique), plan.n_cached,
                         extracted, plan.resumed, skipped, time.perf_counter() - t0, str(dev), str(cache.root), used)


def _export_stored(lb: LoadedBackbone, specs: list[FeatureSpec], cache: FeatureCache) -> bool:
    """Whether the ONNX export of ``specs``' network is stored (in the cache or
    the shared folder, :meth:`~featx.quantize.ModelStore.get_export`): then a
    run needs neither the network nor torchvision to build it."""
    from .quantize import network_id
    try:
        name = network_id(lb, [s.layer for s in specs], specs[0].pool, specs[0].format)
        return ModelStore(cache.root).has_export(name)
    except QuantizationError:   # not a plain file name
        return False


def _space_needed(cache: FeatureCache, plan: ExtractPlan) -> int:
    """Bytes an extraction of ``plan`` still needs: its part files, plus
    the segment they are merged into (committed rows are never copied)."""
    need = 0
    for spec in plan.needed:
        info = cache.info(spec.key)
        parts = sum(p.stat().st_size for p in cache._parts(spec.key))
        entry = info.size_bytes - parts
        per_row = parts / info.pending_rows if info.pending_rows else (entry / info.n if info.n else 4096)
        need += max(0, len(plan.todo) * per_row - parts) + len(plan.todo) * per_row
    return int(need) + (1 << 20)


class _PartWriter:
    """Writes finished batches from a background thread, so the model never
    waits for the disk; every ``commit_every`` rows they are committed as a
    segment (readable, and the parts folder stays small; the caller holds the
    entries' lock). ``close()`` re-raises a writer failure."""

    def __init__(self, cache: FeatureCache, specs: list[FeatureSpec], depth: int = 4,
                 commit_every: int = COMMIT_EVERY_ROWS):
        self.cache, self.specs = cache, specs
        self.commit_every, self.uncommitted = commit_every, 0
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="featx-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            ids, outs = item
            try:
                for spec, arr in zip(self.specs, outs):
                    write_part_file(self.cache.new_part_path(spec.key), spec, ids, arr)
                self.uncommitted += len(ids)
                if self.uncommitted >= self.commit_every:
                    for spec in self.specs:
                        self.cache.consolidate(spec.key, spec)
                    self.uncommitted = 0
            except BaseException as e:  # noqa: BLE001 - surfaced in close()
                self.error = e

    def put(self, ids, outs):
        if self.error is not None:
            raise self.error
        self.q.put((ids, outs))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def auto_batch_size(net: nn.Module, crop: int, device: torch.device, precision: str, start: int = 256) -> int:
    """CPU: 32 (bigger batches do not run faster there). GPU: the largest
    power of two up to ``start`` whose forward pass fits in memory."""
    if device.type != "cuda":
        return 32
    size = start
    while size > 1:
        try:
            x = torch.zeros((size, 3, crop, crop), dtype=torch.uint8, device=device)
            with torch.inference_mode(), autocast(device, precision):
                net(x.contiguous(memory_format=torch.channels_last))
            torch.cuda.synchronize(device)
            return size
        except torch.cuda.OutOfMemoryError:
            size //= 2
            torch.cuda.empty_cache()
    return 1


class Forward:
    """The frozen network as extraction runs it: BN folded into convs,
    channels_last, inference_mode, autocast in ``precision``, and optionally
    compiled with torch.compile (inductor, frozen weights).

    A compiled forward sees one batch shape only: a short last batch is
    padded and the padding dropped, so nothing recompiles. If compiling
    fails (no C++ compiler, say), it says so once and runs eagerly."""

    runtime = "torch"

    def __init__(self, lb: LoadedBackbone, layers: list[str], pool: str, device: torch.device,
                 precision: str, compile: bool = False, notify=None):
        self.net = FeatureNet(lb.model, layers, pool, lb.preprocess, fuse=True, backbone=lb.info.name).eval().to(device)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.device, self.precision = device, precision
        self.notify = notify or (lambda msg: None)
        self.compiled = torch.compile(self.net, dynamic=False) if compile else None
        self.batch_size: int | None = None

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        n = images.shape[0]
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if self.compiled is not None:
                if self.batch_size is None:
                    self.batch_size = n
                if n < self.batch_size:
                    pad = x.new_zeros((self.batch_size - n, *x.shape[1:])).contiguous(memory_format=torch.channels_last)
                    x = torch.cat([x, pad])
                try:
                    import torch._inductor.config as inductor_config
                    with inductor_config.patch(freezing=True):
                        outs = self.compiled(x)
                except Exception as e:  # noqa: BLE001 - any compile failure: fall back
                    self.notify(f"torch.compile failed ({error_text(e, 100)}); running eagerly")
                    self.compiled = None
                    outs = self.net(x)
            else:
                outs = self.net(x)
        return [o[:n].float().cpu().numpy() for o in outs]


RUNTIMES = ("auto", "torch", "onnx")
# below this many images, exporting the network (about 1 s; 4 s for VGG16)
# costs more than ONNX Runtime saves
ONNX_MIN_IMAGES = 200


def onnxruntime_available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


# how the run options are named on the command line; pipelines pass their keys
CLI_NAMES = {"runtime": "--runtime", "device": "--device", "precision": "--precision", "compile": "--compile"}


class RunOptionsError(ConfigError):
    """Run options that cannot go together; ``option`` names the one to change."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def resolve_runtime(runtime: str, device: torch.device, precision: str, n_images: int,
                    compile: str | bool = "auto", names: dict | None = None) -> str:
    """Who runs the forward pass: ``torch``, or ``onnx`` (ONNX Runtime).

    The one check of device, precision, runtime and compile together: the
    CLI, extraction, Dask and pipeline files all call it (``names`` says how
    the options are spelled where they came from, :data:`CLI_NAMES` by
    default; a conflict is a :class:`RunOptionsError` naming the option).

    ``auto`` picks ONNX Runtime for fp32 on the CPU when it is installed and
    the run has :data:`ONNX_MIN_IMAGES` images or more: on 2 AVX2 cores it
    ran MobileNetV2 2.4x and ResNet-50 1.5x faster than PyTorch's best fp32
    path. GPUs, bf16 and fp16 stay with torch, and so does ``compile="on"``
    (torch.compile)."""
    n = {**CLI_NAMES, **(names or {})}
    if runtime not in RUNTIMES:
        raise RunOptionsError("runtime", f"{n['runtime']} {runtime}: use one of {', '.join(RUNTIMES)}")
    compile_on = compile is True or compile == "on"
    if compile_on and runtime == "onnx":
        raise RunOptionsError("compile", f"{n['compile']} on is torch.compile: use it with {n['runtime']} torch "
                                         "(or auto)")
    if precision == "int8":
        return _int8_runtime(runtime, device, compile_on, n)
    if runtime == "torch" or compile_on:
        return "torch"
    if runtime == "onnx":
        if device.type != "cpu":
            raise RunOptionsError("device", f"{n['runtime']} onnx runs on the CPU; use {n['device']} cpu, or "
                                            f"{n['runtime']} torch on {device}")
        if precision != "fp32":
            raise RunOptionsError("precision", f"{n['runtime']} onnx computes in fp32; use {n['precision']} fp32, "
                                               f"or {n['runtime']} torch for {precision}")
        if not onnxruntime_available():
            raise RunOptionsError("runtime", f"{n['runtime']} onnx needs ONNX Runtime: pip install onnxruntime onnx "
                                             f"(or use {n['runtime']} torch)")
        return "onnx"
    if device.type == "cpu" and precision == "fp32" and n_images >= ONNX_MIN_IMAGES and onnxruntime_available():
        return "onnx"
    return "torch"


def _int8_runtime(runtime: str, device: torch.device, compile_on: bool, n: dict) -> str:
    """int8 is ONNX Runtime's, on the CPU, whatever the number of images."""
    if runtime == "torch" or compile_on:
        what = f"{n['runtime']} torch" if runtime == "torch" else f"{n['compile']} on"
        raise RunOptionsError("runtime" if runtime == "torch" else "compile",
                              f"{n['precision']} int8 runs on ONNX Runtime, not with {what}; use "
                              f"{n['runtime']} auto, or {n['precision']} fp32")
    if device.type != "cpu":
        raise RunOptionsError("device", f"{n['precision']} int8 runs on the CPU (ONNX Runtime); use {n['device']} cpu")
    if not onnxruntime_available():
        raise RunOptionsError("precision", f"{n['precision']} int8 needs ONNX Runtime: pip install onnxruntime onnx "
                                           f"(or use {n['precision']} fp32)")
    return "onnx"


class OnnxForward:
    """The same network as :class:`Forward` (folded BN included), exported to
    ONNX and run by ONNX Runtime on the CPU: in fp32, or in int8 when a
    :class:`~featx.quantize.Calibration` is given (see :mod:`featx.quantize`).

    A new export is checked against torch on three images before any real
    one is seen (an export that does not reproduce the network raises
    :class:`~featx.errors.BackboneError` instead of filling the cache), then
    kept in ``store`` (:class:`~featx.quantize.ModelStore`), as the int8
    model and its ranges are: the next run loads them and starts at once."""

    runtime = "onnx"

    def __init__(self, lb: LoadedBackbone, layers: list[str], pool: str, threads: int | None = None, *,
                 store=None, feature_format: int = FORMAT_VERSION, calibration=None, notify=None):
        from . import quantize as q
        self.notify = notify or (lambda msg: None)
        try:
            import onnxruntime as ort
        except (ImportError, OSError) as e:   # installed but broken (a missing shared library, say)
            raise BackboneError(f"onnxruntime does not load ({e}); use --runtime torch") from e
        self._ort, self.threads, self.name = ort, threads or torch.get_num_threads(), lb.info.name
        self.layers, self.crop = list(layers), lb.preprocess.crop
        net_id = q.network_id(lb, layers, pool, feature_format)
        fp32 = store.get_export(net_id) if store is not None else None
        if fp32 is None:
            net = FeatureNet(lb.model, layers, pool, lb.preprocess, fuse=True, backbone=lb.info.name).eval()
            fp32 = q.export_onnx(net, self.crop, len(layers), lb.info.name)
            self.session = self._session(fp32, "the exported network")
            self._check(net)   # 3 images: a batch size baked in by the trace fails
            if store is not None:
                store.put_export(net_id, fp32)
        else:
            self.session = self._session(fp32, "the exported network")
        self.precision = "fp32"
        if calibration is not None:
            self._quantize(lb, fp32, calibration, store, net_id, feature_format)

    def _session(self, model: bytes, what: str):
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # idle threads sleep instead of spinning, leaving the cores to the decode workers
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - an operator ONNX Runtime lacks, say
            raise BackboneError(f"{self.name}: ONNX Runtime cannot run {what} "
                                f"({error_text(e)}); use --runtime torch") from e

    def _quantize(self, lb: LoadedBackbone, fp32: bytes, calibration, store, net_id: str, feature_format: int):
        """Swap the fp32 session for the int8 one: from the store, or quantized
        now (ranges measured on the calibration images, or the given ones)."""
        from . import __version__
        from . import quantize as q
        model_key, ranges_key = f".{calibration.id}.int8.onnx", f".{calibration.id}.ranges.json"
        if calibration.ranges is not None:   # a bundle's: its own name, never taken for a measured calibration
            given = hashlib.sha256(json.dumps(calibration.ranges, sort_keys=True).encode()).hexdigest()[:16]
            model_key, ranges_key = f".{calibration.id}-given-{given}.int8.onnx", None
        int8 = store.get(net_id, model_key) if store is not None else None
        if int8 is not None and ranges_key is not None and store.get(net_id, ranges_key) is None:
            int8 = None   # its ranges are gone: made again, so bundles trained on these features carry them
        # a stored model this ONNX Runtime cannot load is made again
        session = self._int8_session(int8, q) if int8 is not None else None
        # a measured calibration's failure is recorded: later runs fall back to fp32 at once
        measured = store is not None and calibration.ranges is None
        version = f"{getattr(self._ort, '__version__', 'unknown')}+featx{__version__}"
        if session is None and measured and (failed := store.failure(net_id, calibration.id, version)):
            raise q.QuantizationError(f"{failed}, in an earlier run (delete "
                                      f"{store.failure_path(net_id, calibration.id, version)} to try int8 again)")
        if session is None:
            images = _decode_all([s.path for s in calibration.samples], lb.preprocess, feature_format)
            if calibration.ranges is None and not len(images):
                where = store.root if store is not None else "the model store"
                why = ("none of its calibration images could be read" if calibration.samples else
                       "there are neither its calibration images nor its ranges here (a bundle without "
                       "ranges predicts with the cache it was trained with: --cache)")
                raise q.QuantizationError(f"{self.name}: the int8 model of calibration {calibration.id} is not in "
                                          f"{where}, and {why}")
            if calibration.ranges is None:   # seconds before the first batch: said, not silent
                self.notify(f"{self.name}: int8: measuring activation ranges on {len(images)} calibration images "
                            f"and quantizing (once per network and calibration; later runs load the model"
                            f"{'' if store is None else ' from ' + str(store.root)})")
            try:
                int8, ranges = q.quantize(fp32, None if calibration.ranges is not None else images,
                                          calibration.ranges, self.name, threads=self.threads)
                session = self._int8_session(int8, q, strict=True)
                if len(images):   # how far int8 strays from fp32, on real images
                    self._check_int8(session, images[:32], q)
            except q.QuantizationError as e:
                if measured and not q.is_transient(e):   # no memory, no disk, tools missing: the next run may work
                    store.add_failure(net_id, calibration.id, version, str(e))
                raise
            if store is not None:
                if ranges_key is not None:   # with what they were measured on, for bundles (quantize.bundle_ranges)
                    record = q.network_record(lb.info.name, lb.weights.identity, lb.preprocess.as_dict(),
                                              feature_format)
                    ranges = {**ranges, "featx_network": record, "featx_apply": q.APPLY}
                    q.remember_ranges(calibration.id, net_id, ranges)   # a store that cannot be written still has them here
                    store.put(net_id, ranges_key, json.dumps(ranges).encode())
                if not store.put(net_id, model_key, int8):
                    self.notify(f"{self.name}: the int8 model could not be stored in {store.root} (read-only or "
                                "full?): the next run measures and quantizes again")
        if measured:   # written when int8 runs, never by a plan: a dataset that grows keeps this calibration
            store.add_calibration(calibration.network, calibration)
        self.session, self.precision = session, "int8"

    def _int8_session(self, model: bytes, q, strict: bool = False):
        """The session of an int8 model; one ONNX Runtime cannot start is a
        :class:`~featx.quantize.QuantizationError` (``strict``: fp32 takes
        over) or None (a stored model: it is made again)."""
        try:
            return self._session(model, "the int8 network")
        except BackboneError as e:
            if not strict:
                return None
            raise q.QuantizationError(f"{self.name}: ONNX Runtime cannot run the int8 network "
                                      f"({error_text(e.__cause__ or e)})") from e

    def _check_int8(self, session, images: np.ndarray, q) -> None:
        """int8 features of ``images`` near fp32's, or :class:`~featx.quantize.QuantizationError`."""
        try:
            got = self._outputs(session, images)
        except Exception as e:  # noqa: BLE001 - a kernel that fails at run time, say
            raise q.QuantizationError(f"{self.name}: the int8 network fails on calibration images "
                                      f"({error_text(e)})") from e
        err = q.relative_error(self(images), got)
        if not err <= q.MAX_RELATIVE_ERROR:
            raise q.QuantizationError(f"{self.name}: int8 features differ from fp32 ones by "
                                      f"{err:.2f} (relative) on calibration images")

    @staticmethod
    def _outputs(session, images: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in session.run(None, {"images": images})]

    def __call__(self, images) -> list[np.ndarray]:
        x = images.contiguous().numpy() if isinstance(images, torch.Tensor) else np.ascontiguousarray(images)
        return self._outputs(self.session, x)

    def _check(self, net: FeatureNet):
        shape = (3, 3, self.crop, self.crop)
        images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
        with torch.inference_mode():
            want = [t.numpy() for t in net(images)]
        try:
            got = self(images)
        except Exception as e:  # noqa: BLE001 - an operator ONNX Runtime lacks, say
            raise BackboneError(f"{self.name}: ONNX Runtime cannot run the exported network "
                                f"({error_text(e)}); use --runtime torch") from e
        for layer, w, g in zip(net.layers, want, got):
            if g.shape != w.shape:
                raise BackboneError(f"{self.name}: ONNX Runtime's output of layer {layer} has shape {g.shape}, "
                                    f"torch's {w.shape}; use --runtime torch")
            scale = float(np.abs(w).max()) or 1.0
            err = float(np.abs(w - g).max()) / scale
            if not err <= 1e-3:  # fp32 against fp32 is ~1e-6; this also catches NaN
                raise BackboneError(f"{self.name}: ONNX Runtime's output of layer {layer} differs from torch's "
                                    f"(relative error {err:.1e}); use --runtime torch")


def _decode_all(paths, pre: Preprocess, feature_format: int) -> np.ndarray:
    """``paths`` decoded and preprocessed as extraction does (the same
    :class:`~featx.inference.ImageBatches` loop, in this process), as one
    uint8 NCHW array; unreadable images are left out."""
    with ImageBatches(list(paths), pre, batch_size=64, workers=0, report=False, progress=False,
                      feature_format=feature_format) as batches:
        kept = [images.numpy() for images, _ in batches]
    return np.concatenate(kept) if kept else np.zeros((0, 3, pre.crop, pre.crop), dtype=np.uint8)


def make_forward(lb: LoadedBackbone, layers: list[str], pool: str, device: torch.device, precision: str, *,
                 n_images: int, compile: str | bool = "auto", runtime: str = "auto", notify=None,
                 store: ModelStore | None = None, feature_format: int = FORMAT_VERSION, calibration=None):
    """The forward pass extraction runs: :class:`OnnxForward` or :class:`Forward`.

    ``compile="on"`` asks for torch.compile, hence torch. With
    ``runtime="auto"`` an ONNX export that fails (or does not reproduce the
    network) is reported through ``notify`` and torch runs instead; int8
    (``calibration``) runs only on ONNX Runtime, and its failures raise
    :class:`~featx.quantize.QuantizationError`."""
    notify = notify or (lambda msg: None)
    chosen = resolve_runtime(runtime, device, precision, n_images, compile)
    if chosen == "onnx":
        try:
            return OnnxForward(lb, layers, pool, store=store, feature_format=feature_format,
                               calibration=calibration if precision == "int8" else None, notify=notify)
        except BackboneError as e:
            if runtime == "onnx" or precision == "int8" or isinstance(e, WeightsError):
                raise   # weights that do not load fail torch just as well
            notify(f"{str(e).removesuffix('; use --runtime torch')}; running with torch instead")
    return Forward(lb, layers, pool, device, precision,
                   compile=should_compile(compile, n_images, device), notify=notify)


def should_compile(compile: str | bool, n_images: int, device: torch.device) -> bool:
    """``auto``: compile when the run is long enough to repay compiling."""
    if isinstance(compile, bool):
        return compile
    if compile not in ("auto", "on", "off"):
        raise ConfigError(f"--compile {compile}: use auto, on or off")
    if compile != "auto":
        return compile == "on"
    # Measured on 2 CPU cores: inductor gains 1.05x over BN folding +
    # channels_last for mobilenet_v2 and 1.3x for resnet50, and compiling
    # costs 20-60 s: worth it only for long runs (on CPU, ONNX Runtime is
    # faster still and is what runtime "auto" picks for fp32).
    return n_images >= (5000 if device.type == "cpu" else 20000)


def _run(lb: LoadedBackbone, specs, todo: list[Sample], cache: FeatureCache, run: RunOptions, *, device,
         precision, notify, calibration=None):
    def build_forward():
        return make_forward(lb, [s.layer for s in specs], specs[0].pool, device, precision, n_images=len(todo),
                            compile=run.compile, runtime=run.runtime, notify=notify, store=ModelStore(cache.root),
                            feature_format=specs[0].format, calibration=calibration)

    forward, batch_size = None, run.batch_size
    if batch_size is None:
        if device.type == "cuda":   # the batch size is measured on the network itself
            forward = build_forward()
        batch_size = auto_batch_size(forward and forward.net, lb.preprocess.crop, device, precision)
    batches = ImageBatches([s.path for s in todo], lb.preprocess, batch_size=batch_size, workers=run.workers,
                           pin=device.type == "cuda", strict=run.strict, progress=run.progress,
                           desc=f"extract {lb.info.name}", feature_format=specs[0].format)
    writer = None
    done = 0
    try:
        # the workers are decoding from here on: preparing the network overlaps with them
        if forward is None:
            forward = build_forward()
        writer = _PartWriter(cache, specs)
        for images, index in batches:
            writer.put([todo[i].id for i in index], forward(images))
            done += len(index)
    finally:
        batches.close()
        if writer is not None:
            writer.close()
    return done, batches.skipped, forward.runtime


# --------------------------------------------------------------------------
# reading back


def load_features(cache: FeatureCache | str | os.PathLike, spec: FeatureSpec | str, dataset: Dataset,
                  split: str | None = None, *, skip_missing: bool = False):
    """Features of one split of ``dataset`` from the cache.

    Returns ``(X, y, ids)``: float32 (n, d) features, int labels indexing
    ``dataset.classes``, and the content ids in the same order. Images the
    cache does not hold raise :class:`~featx.errors.CacheError`, or are
    dropped with ``skip_missing=True`` (e.g. images skipped as unreadable).

    Examples
    --------
    >>> ds = featx.open_dataset("photos/")                         # doctest: +SKIP
    >>> _, _, specs = featx.feature_specs("mobilenet_v2")          # doctest: +SKIP
    >>> X, y, ids = featx.load_features("cache", specs[0], ds, "train")  # doctest: +SKIP
    """
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    key = spec.key if isinstance(spec, FeatureSpec) else cache.resolve_key(spec)
    samples = dataset.subset(split)
    if skip_missing:
        have = set(cache.ids(key))
        samples = [s for s in samples if s.id in have]
    ids = [s.id for s in samples]
    X = cache.read(key, ids)
    y = dataset.labels(samples)
    return X, y, ids

