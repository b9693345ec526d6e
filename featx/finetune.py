"""Fine-tuning: from a linear probe to the whole network, with the usual schedule.

The optional second regime, for data that frozen features do not fit well.
:func:`finetune` takes a registry backbone and a dataset and writes a model
bundle of kind ``"finetune"`` (``backbone.pt``: the state_dict of the whole
network with its new head) that ``featx evaluate`` and ``featx predict`` read
like any other bundle.

How a run goes
--------------
1. The final classifier layer (``BackboneInfo.head``) is replaced by one with
   a row per class; Inception v3's auxiliary head (``AuxLogits.fc``) too. Its
   loss is added with weight 0.4 in training and it is ignored in eval.
2. **Start.** With pretrained weights and a linear head, the new head starts
   from the linear probe: the logistic regression that ``featx train`` fits on
   the cached penultimate features (the head's input), its C chosen on val,
   its StandardScaler folded exactly into the Linear layer. Missing features
   of the train and val images are extracted first (one frozen inference
   pass, about a third of the cost of one training epoch, and they stay in
   the cache for ``featx train``/``compare``). Otherwise the head starts at
   random (N(0, 0.01), zero bias). Epoch 0 of the log is the start measured
   on val, so the gain of fine-tuning over the probe is read off directly.
3. **Stage 1** (``freeze_epochs``): only the head trains; the backbone's
   parameters and BatchNorm statistics do not change (BN in eval mode).
4. **Stage 2**: everything trains, with discriminative learning rates: the
   backbone's parameters, in definition order, form ``lr_groups`` groups of
   about equal depth (cut only between modules); group i gets
   ``lr / lr_mult ** ((G - i) / G)``, so the stem gets ``lr / lr_mult`` and
   the head ``lr``. One-cycle schedule per batch (OneCycleLR, per-group
   peaks, ``warmup`` of the steps rising from peak/25, then cosine down to
   peak/25e4). No weight decay on biases and norm parameters.
   BatchNorm rule (``bn="auto"``): pretrained statistics stay frozen (eval
   mode, affine parameters still train) when the batch is smaller than
   :data:`BN_MIN_BATCH`, because such batch statistics are noisier than the
   pretrained ones; from :data:`BN_MIN_BATCH` up, and always when training
   from random init, BN uses and updates batch statistics.
5. Train images: random resized crop to the weights' crop size, horizontal
   flip, colour jitter (``augment``); val images: the weights' own
   preprocessing (:func:`featx.extract.preprocess_image`), decoded once.
6. After every epoch: val loss and accuracy; the best epoch (by val accuracy,
   the earliest on ties, epoch 0 included) is kept; early stopping after
   ``patience`` stage-2 epochs without improvement; a checkpoint (model,
   optimizer, scheduler, epoch, history, best) is written atomically to the
   work dir, so running the same command again resumes after the last
   finished epoch. Ctrl-C writes the bundle from the best epoch so far.

Reproducibility: each epoch's randomness (shuffling, augmentation, dropout)
comes from a seed made of ``seed`` and the epoch number, so a resumed run
retraces an uninterrupted one; on CPU the same seed gives the same model
(with the same number of data-loading workers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .backbones import BackboneInfo, Preprocess, ResolvedWeights, get_backbone, load_backbone, resolve_weights
from .data import Dataset, Sample, load_image
from .errors import ConfigError, FeatxError, ImageError
from .extract import ImageFiles, collate, default_workers, preprocess_image, resolve_device
from .files import atomic_write_bytes, atomic_write_text

__all__ = [
    "AUGMENTS", "BN_MIN_BATCH", "FINETUNE", "FinetuneResult", "Interrupt", "backbone_from_bundle",
    "build_param_groups", "finetune", "fold_probe", "group_lrs", "head_names", "layer_groups",
    "make_one_cycle", "replace_head",
]

AUGMENTS = ("light", "standard", "none")
OPTIMIZERS = ("adamw", "sgd")
BN_MODES = ("auto", "train", "frozen")
PROBE_MODES = ("auto", "on", "off")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUX_LOSS_WEIGHT = 0.4
BN_MIN_BATCH = 16
DEFAULT_LR = {"adamw": 5e-4, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
CHECKPOINT_FORMAT = 1
# val images decoded once and kept in memory up to this many bytes
VAL_CACHE_BYTES = 1 << 30


class Interrupt(Exception):
    """Raised by an ``on_epoch_end`` callback to stop a run as a crash would
    (the checkpoint of that epoch is on disk; nothing else is written)."""


# --------------------------------------------------------------------------
# the network


def head_names(info: BackboneInfo, model: nn.Module) -> list[str]:
    """Dotted names of the classifier layers to replace: ``info.head``, plus
    Inception v3's auxiliary classifier when the model has one."""
    names = [info.head]
    if getattr(model, "AuxLogits", None) is not None:
        names.append("AuxLogits.fc")
    return names


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):   # SqueezeNet: a 1x1 conv, then ReLU and pooling
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride,
                        padding=old.padding, bias=old.bias is not None)
    else:
        raise ConfigError(f"cannot replace a head of type {type(old).__name__}")
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    if new.weight.device.type != "meta":
        nn.init.normal_(new.weight, 0.0, 0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def replace_head(model: nn.Module, info: BackboneInfo, num_classes: int) -> list[str]:
    """Give ``model`` a fresh ``num_classes``-way head (and aux head); returns their names.

    The new layers are initialised N(0, 0.01) with zero bias (seed torch
    first for a reproducible head). Same shapes as ``info.build(num_classes)``,
    so a bundle's ``backbone.pt`` loads strictly into a freshly built model.
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    names = head_names(info, model)
    for name in names:
        model.set_submodule(name, _new_head(model.get_submodule(name), num_classes))
    return names


def _head_parameter_names(model: nn.Module, heads: Sequence[str]) -> set[str]:
    return {f"{h}.{n}" for h in heads for n, _ in model.get_submodule(h).named_parameters()}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))


def layer_groups(model: nn.Module, heads: Sequence[str], groups: int) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters in definition order, cut into ``groups``
    groups of about equal depth (equal numbers of parameter tensors, cuts
    only between modules), then the head's parameters as the last group."""
    head_params = _head_parameter_names(model, heads)
    body = [(n, p) for n, p in model.named_parameters() if n not in head_params]
    head = [(n, p) for n, p in model.named_parameters() if n in head_params]
    owner = [n.rsplit(".", 1)[0] for n, _ in body]
    cuts = [0]
    for g in range(1, groups):
        i = max(math.ceil(g * len(body) / groups), cuts[-1] + 1)
        while 0 < i < len(body) and owner[i] == owner[i - 1]:
            i += 1
        if i < len(body):
            cuts.append(i)
    cuts.append(len(body))
    out = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    return out + [head]


def group_lrs(lr: float, lr_mult: float, groups: int) -> list[float]:
    """Peak learning rates of ``groups`` backbone groups then the head:
    geometric from ``lr / lr_mult`` (stem) to ``lr`` (head)."""
    return [lr / lr_mult ** ((groups - i) / groups) for i in range(groups)] + [lr]


def build_param_groups(model: nn.Module, heads: Sequence[str], *, lr: float, lr_mult: float, groups: int,
                       weight_decay: float) -> list[dict]:
    """Optimizer parameter groups for stage 2: per layer group (see
    :func:`layer_groups`) one group with weight decay and one without (biases
    and norm parameters). Each dict carries ``layer_group`` (0 = stem, last =
    head) and ``lr`` (the peak)."""
    parts = layer_groups(model, heads, groups)
    lrs = group_lrs(lr, lr_mult, len(parts) - 1)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    out = []
    for i, (part, group_lr) in enumerate(zip(parts, lrs)):
        decay = [p for _, p in part if p.ndim > 1 and id(p) not in norm_params]
        no_decay = [p for _, p in part if not (p.ndim > 1 and id(p) not in norm_params)]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": group_lr, "weight_decay": wd, "layer_group": i})
    return out


def _head_param_groups(model: nn.Module, heads: Sequence[str], lr: float, weight_decay: float) -> list[dict]:
    params = [p for h in heads for p in model.get_submodule(h).parameters()]
    return [{"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay, "layer_group": 0},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0, "layer_group": 0}]


def make_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    groups = [g for g in param_groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    raise ConfigError(f"--optimizer {name}: use one of {', '.join(OPTIMIZERS)}")


def make_one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.3):
    """OneCycleLR with each group's current ``lr`` as its peak: ``warmup`` of
    the steps rising (cosine) from peak/25, the rest annealing to peak/25e4.
    The peak is reached after step ``round(warmup * total_steps) - 1``."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(1, int(total_steps)), pct_start=warmup,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4)


def _set_trainable(model: nn.Module, heads: Sequence[str], stage: str) -> None:
    head_params = _head_parameter_names(model, heads)
    for n, p in model.named_parameters():
        p.requires_grad_(stage == "full" or n in head_params)


def _train_mode(model: nn.Module, bn_frozen: bool) -> None:
    model.train()
    if bn_frozen:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def compute_loss(outputs, targets: torch.Tensor, criterion: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits). Inception's train-mode output (logits, aux_logits)
    adds ``AUX_LOSS_WEIGHT`` x the aux loss."""
    aux = getattr(outputs, "aux_logits", None)
    logits = getattr(outputs, "logits", outputs)
    loss = criterion(logits, targets)
    if aux is not None:
        loss = loss + AUX_LOSS_WEIGHT * criterion(aux, targets)
    return loss, logits


class _Normalize(nn.Module):
    """uint8 NCHW in, float normalised by the weights' mean/std out."""

    def __init__(self, pre: Preprocess):
        super().__init__()
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x):
        return x.float() * self.scale + self.shift


# --------------------------------------------------------------------------
# data


def _order_key(seed: int, s: Sample) -> bytes:
    return hashlib.blake2b(f"{seed}:{s.id}:{s.path.name}".encode(), digest_size=8).digest()


def _by_class(samples: list[Sample], seed: int) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.label, []).append(s)
    return {c: sorted(v, key=lambda s: _order_key(seed, s)) for c, v in sorted(out.items())}


def stratified_take(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` samples with the class proportions of ``samples`` (at least one
    per class), chosen by a seeded hash of their content: deterministic."""
    if n >= len(samples):
        return list(samples)
    groups = _by_class(samples, seed)
    total = len(samples)
    quota = {c: max(1, math.floor(n * len(v) / total)) for c, v in groups.items()}
    rest = sorted(groups, key=lambda c: -(n * len(groups[c]) / total - math.floor(n * len(groups[c]) / total)))
    i = 0
    while sum(quota.values()) < n and rest:
        c = rest[i % len(rest)]
        if quota[c] < len(groups[c]):
            quota[c] += 1
        i += 1
    keep = {s.id + str(s.path) for c, v in groups.items() for s in v[:quota[c]]}
    return [s for s in samples if s.id + str(s.path) in keep]


def _split_train_val(ds: Dataset, max_train_images: int | None, seed: int, val_fraction: float = 0.15):
    """(train samples, val samples, where val came from)."""
    train = ds.subset("train") if "train" in ds.splits else []
    if "val" in ds.splits:
        val, source = ds.subset("val"), "val split"
    else:
        groups = _by_class(train, seed + 1)
        held = {id(s) for v in groups.values() if len(v) >= 2
                for s in v[:max(1, math.floor(len(v) * val_fraction + 0.5))]}
        val = [s for s in train if id(s) in held]
        train = [s for s in train if id(s) not in held]
        source = f"{len(val)} train images held out (stratified, {val_fraction:.0%}; the dataset has no val split)"
    if len(train) < 2:
        raise FeatxError(f"{ds.root}: {len(train)} train image(s); fine-tuning needs at least 2")
    if not val:
        raise FeatxError(f"{ds.root}: no images to validate on (no val split and too few train images to hold some out)")
    if max_train_images is not None and max_train_images < len(train):
        train = stratified_take(train, max_train_images, seed)
    return train, val, source


class TrainImages(torch.utils.data.Dataset):
    """Decoded, augmented train images (uint8 CHW), their labels, and an
    error string (empty when fine; a bad file becomes a zero image)."""

    def __init__(self, paths: Sequence, labels: Sequence[int], pre: Preprocess, augment: str):
        if augment not in AUGMENTS:
            raise ConfigError(f"--augment {augment}: use one of {', '.join(AUGMENTS)}")
        self.paths = [str(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.pre, self.augment = pre, augment
        self._transform = None

    def transform(self):
        if self._transform is None and self.augment != "none":
            from torchvision.transforms import InterpolationMode, v2
            interp = InterpolationMode(self.pre.interpolation) if self.pre.interpolation in \
                {m.value for m in InterpolationMode} else InterpolationMode.BILINEAR
            if self.augment == "light":
                scale, jitter = (0.35, 1.0), v2.ColorJitter(0.1, 0.1, 0.1)
            else:
                scale, jitter = (0.08, 1.0), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
            self._transform = v2.Compose([
                v2.RandomResizedCrop(self.pre.crop, scale=scale, interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip(), jitter, v2.PILToTensor()])
        return self._transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = load_image(self.paths[i], draft_size=self.pre.resize)
            if self.augment == "none":
                t = preprocess_image(im, self.pre)
            else:
                t = self.transform()(im)
            return t, self.labels[i], ""
        except ImageError as e:
            return torch.zeros((3, self.pre.crop, self.pre.crop), dtype=torch.uint8), self.labels[i], str(e)


def _collate_train(items):
    tensors, labels, errors = zip(*items)
    return torch.stack(tensors), torch.tensor(labels, dtype=torch.int64), list(errors)


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness: the same whether or not the run was resumed."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class _EvalImages:
    """The val images, preprocessed on first use and kept in memory when small."""

    def __init__(self, samples: list[Sample], labels: np.ndarray, pre: Preprocess, batch_size: int,
                 workers: int, pin: bool):
        self.samples, self.labels, self.pre = samples, labels, pre
        self.batch_size, self.workers, self.pin = batch_size, workers, pin
        self.errors: dict[int, str] = {}
        self.keep = len(samples) * 3 * pre.crop * pre.crop <= VAL_CACHE_BYTES
        self.cached = None

    def _read(self):
        loader = torch.utils.data.DataLoader(
            ImageFiles([s.path for s in self.samples], self.pre), batch_size=self.batch_size, shuffle=False,
            num_workers=self.workers, collate_fn=collate, pin_memory=self.pin)
        for images, idx, errors in loader:
            keep = [i for i, e in enumerate(errors) if not e]
            for i, e in enumerate(errors):
                if e:
                    self.errors[int(idx[i])] = e
            if keep:
                rows = idx[keep]
                yield images[keep], torch.from_numpy(self.labels[rows.numpy()])

    def __iter__(self):
        if self.keep and self.cached is None:
            self.cached = list(self._read())
        return iter(self.cached) if self.cached is not None else self._read()


# --------------------------------------------------------------------------
# precision


def resolve_train_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on CPU."""
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"--precision {precision}: use one of {', '.join(TRAIN_PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16: needs a CUDA GPU; use fp32 or bf16 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --------------------------------------------------------------------------
# linear-probe start


@dataclass
class ProbeStart:
    """How the head started."""

    start: str                          # "linear-probe" or "random"
    reason: str                         # in words, for the report
    C: float | None = None
    probe_val_acc: float | None = None  # the logistic regression on cached val features
    features_key: str | None = None
    extracted: int = 0
    weight: np.ndarray | None = field(default=None, repr=False)   # (classes, dims), float64
    bias: np.ndarray | None = field(default=None, repr=False)

    def describe(self) -> dict:
        return {"start": self.start, "reason": self.reason, "C": self.C, "probe_val_acc": self.probe_val_acc,
                "features_key": self.features_key, "extracted": self.extracted}


def fold_probe(pipeline, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight (num_classes, d) and bias of one Linear layer computing the
    logits of a fitted ``StandardScaler -> LogisticRegression`` pipeline:
    ``W' = W / scale``, ``b' = b - W' @ mean``. A binary model's single
    logit z becomes (-z/2, z/2): the same softmax. Classes the regression
    never saw get zero weights and a bias far below the others."""
    scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
    if len(pipeline.steps) != 2:
        raise ConfigError("the probe must be StandardScaler -> LogisticRegression (no PCA)")
    mean = scaler.mean_ if scaler.with_mean else np.zeros(scaler.n_features_in_)
    scale = scaler.scale_ if scaler.with_std else np.ones(scaler.n_features_in_)
    coef = np.asarray(clf.coef_, dtype=np.float64)
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:   # binary
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w_cls = coef / scale[None, :]
    b_cls = intercept - w_cls @ mean
    W = np.zeros((num_classes, coef.shape[1]))
    b = np.full(num_classes, b_cls.min() - 30.0)
    for row, c in enumerate(clf.classes_):
        W[int(c)] = w_cls[row]
        b[int(c)] = b_cls[row]
    return W, b


def _probe_start(mode: str, info: BackboneInfo, rw: ResolvedWeights, weights: str, model: nn.Module,
                 train: list[Sample], val: list[Sample], ds: Dataset, *, image_size, cache, seed, device,
                 progress, notify, lb) -> ProbeStart:
    from .cache import FeatureCache
    from .classify import fit_classifier
    from .extract import extract, feature_specs, resolve_precision
    if mode == "off":
        return ProbeStart("random", "--probe off")
    head = model.get_submodule(info.head)
    if not isinstance(head, nn.Linear):
        return ProbeStart("random", f"{info.name}'s head ({info.head}) is a {type(head).__name__}, "
                                    "not a linear layer on pooled features")
    if image_size is not None and image_size != rw.preprocess.crop:
        return ProbeStart("random", f"--image-size {image_size} differs from the weights' {rw.preprocess.crop} px, "
                                    "so cached features do not describe these inputs")
    if mode == "auto" and rw.kind == "none":
        return ProbeStart("random", "random-init weights (--weights none): nothing pretrained to probe")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    ids = list(dict.fromkeys(s.id for s in train + val))
    spec = None
    for precision in dict.fromkeys(["fp32", resolve_precision("auto", str(device))]):
        _, _, specs = feature_specs(info.name, weights, [info.default_layer], "avg", precision, seed=seed)
        if set(ids) <= set(cache.ids(specs[0].key)):
            spec = specs[0]
            break
    extracted = 0
    if spec is None:
        notify(f"linear-probe start: extracting {info.default_layer} features of the train and val images "
               "(one frozen pass; they stay in the cache)")
        report = extract(train + val, info.name, weights=weights, layers=[info.default_layer], pool="avg",
                         precision="fp32" if device.type == "cpu" else "auto", cache=cache, progress=progress,
                         seed=seed, notify=notify, loaded=lb, device=str(device))
        spec, extracted = report.specs[0], report.n_extracted
    have = set(cache.ids(spec.key))
    tr = [s for s in train if s.id in have]
    va = [s for s in val if s.id in have]
    X, y = cache.read(spec.key, [s.id for s in tr]), ds.labels(tr)
    Xv, yv = cache.read(spec.key, [s.id for s in va]), ds.labels(va)
    if X.shape[1] != head.in_features:
        return ProbeStart("random", f"cached {info.default_layer} features have {X.shape[1]} dims, "
                                    f"the head takes {head.in_features}")
    if len(np.unique(y)) < 2:
        return ProbeStart("random", "the train images hold a single class")
    fit = fit_classifier("logreg", X, y, X_val=Xv if len(va) else None, y_val=yv if len(va) else None,
                         seed=seed, n_jobs=1, class_names=ds.classes)
    W, b = fold_probe(fit.pipeline, len(ds.classes))
    how = "extracted now" if extracted else "cached"
    return ProbeStart("linear-probe", f"logistic regression on {info.default_layer} features {how} "
                                      f"(C={fit.chosen:g}, chosen {'on val' if fit.score_source == 'val' else 'by CV'})",
                      C=float(fit.chosen), probe_val_acc=fit.val_score, features_key=spec.key,
                      extracted=extracted, weight=W, bias=b)


def _apply_probe(model: nn.Module, info: BackboneInfo, probe: ProbeStart) -> None:
    head = model.get_submodule(info.head)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.weight).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(probe.bias).to(head.bias.dtype))


# --------------------------------------------------------------------------
# the run


@dataclass
class FinetuneResult:
    bundle: Path | None
    work_dir: Path
    history: list[dict]
    best_epoch: int | None
    best_val_acc: float | None
    start: dict                              # ProbeStart.describe()
    n_train: int
    n_val: int
    val_source: str
    interrupted: bool = False
    stopped_early: bool = False
    resumed_from: int | None = None          # the epoch a resumed run continued after
    seconds: float = 0.0
    bn_rule: str = ""
    notes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def start_val_acc(self) -> float | None:
        first = self.history[0] if self.history else None
        return first["val_acc"] if first and first["epoch"] == 0 else None


def default_work_dir(out) -> Path:
    """``runs/x.featx`` -> ``runs/x.finetune/`` (checkpoint, log, curves)."""
    out = Path(out)
    stem = out.name[:-len(".featx")] if out.name.endswith(".featx") else out.name
    return out.with_name(stem + ".finetune")


def _ids_digest(samples: list[Sample]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(f"{s.id}\t{s.label}\n".encode())
    return h.hexdigest()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged file
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it or pass --restart") from None


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _evaluate(model: nn.Module, norm: nn.Module, images: _EvalImages, device: torch.device, precision: str,
              criterion) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on the val images."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.inference_mode():
        for x, y in images:
            x = norm(x.to(device, non_blocking=True))
            y = y.to(device)
            with _autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(criterion(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise FeatxError("none of the val images could be read")
    return loss_sum / total, correct / total


def finetune(ds: Dataset, backbone: str, out, *, weights: str = "auto", epochs: int = 5,
             freeze_epochs: int | None = None, lr: float | None = None, lr_mult: float = 10.0, lr_groups: int = 4,
             batch_size: int = 32, optimizer: str = "adamw", weight_decay: float | None = None,
             augment: str = "light", bn: str = "auto", probe: str = "auto", device: str = "auto",
             precision: str = "auto", patience: int = 3, max_train_images: int | None = None,
             image_size: int | None = None, warmup: float = 0.3, seed: int = 0, workers: int | None = None,
             cache="cache", work_dir=None, restart: bool = False, progress: bool = True, notify=None,
             on_epoch_end: Callable[[dict, nn.Module], None] | None = None,
             on_start: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``ds`` and write the bundle ``out``.

    Parameters
    ----------
    ds : Dataset
        Trains on its train split; validates on its val split, else on a
        stratified 15 % of train held out.
    backbone, weights : str
        A registry backbone and a ``--weights`` spec (``none``: random init).
    epochs : int
        All epochs, the ``freeze_epochs`` head-only ones included.
    freeze_epochs : int, optional
        Stage-1 epochs (head only). Default 1 with pretrained weights, 0 from
        random init (a frozen random backbone teaches nothing).
    lr, lr_mult, lr_groups : float, float, int
        Peak learning rate of the head (default 5e-4 AdamW, 1e-2 SGD); the
        stem's is ``lr / lr_mult``; the backbone is cut into ``lr_groups``.
    batch_size, optimizer, weight_decay : int, {"adamw", "sgd"}, float
        SGD has Nesterov momentum 0.9. Weight decay (default 0.05 AdamW,
        1e-4 SGD) spares biases and norm parameters.
    augment : {"light", "standard", "none"}
    bn : {"auto", "train", "frozen"}
        BatchNorm in stage 2; see the module docstring for ``auto``.
    probe : {"auto", "on", "off"}
        Linear-probe start: ``auto`` with pretrained weights, ``on`` also
        from random init, ``off`` never.
    device, precision : str
        ``auto``: CUDA when present, with bf16 autocast (fp16 with a
        GradScaler where bf16 is missing); fp32 on CPU.
    patience : int
        Stop after this many stage-2 epochs without a better val accuracy
        (0: never).
    max_train_images : int, optional
        Train on a stratified, seeded subset of this size.
    image_size : int, optional
        Train and predict at this crop instead of the weights' (resize
        scaled alike); turns the probe start off.
    warmup : float
        Fraction of stage-2 steps rising to the peak learning rate.
    cache : str or FeatureCache
        Where the probe's features are found or put.
    work_dir : path, optional
        Checkpoint, log.jsonl and training_curves.png (default: beside
        ``out``, see :func:`default_work_dir`). A checkpoint there made with
        the same settings is resumed; ``restart=True`` discards it.
    on_epoch_end : callable, optional
        ``on_epoch_end(record, model)`` after each epoch's checkpoint.
    on_start : callable, optional
        ``on_start(header)`` once the train/val split is known, before any
        epoch: one line saying what is trained (backbone, weights, images,
        the BatchNorm rule).

    Returns
    -------
    FinetuneResult
    """
    from .bundle import check_destination, save_bundle
    from .report import plot_training_curves
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    notify = notify or (lambda msg: None)
    _check(epochs >= 1, f"--epochs {epochs}: must be at least 1")
    _check(lr_mult >= 1, f"--lr-mult {lr_mult}: must be at least 1 (the stem gets LR/M)")
    _check(lr_groups >= 1, f"--lr-groups {lr_groups}: must be at least 1")
    _check(batch_size >= 2, f"--batch-size {batch_size}: must be at least 2")
    _check(0 < warmup < 1, f"warmup {warmup}: must be between 0 and 1")
    _check(patience >= 0, f"--patience {patience}: must be 0 (off) or more")
    _check(optimizer in OPTIMIZERS, f"--optimizer {optimizer}: use one of {', '.join(OPTIMIZERS)}")
    _check(augment in AUGMENTS, f"--augment {augment}: use one of {', '.join(AUGMENTS)}")
    _check(bn in BN_MODES, f"--bn {bn}: use one of {', '.join(BN_MODES)}")
    _check(probe in PROBE_MODES, f"--probe {probe}: use one of {', '.join(PROBE_MODES)}")
    _check(max_train_images is None or max_train_images >= 2, f"--max-train-images {max_train_images}: must be at least 2")
    _check(image_size is None or image_size >= 32, f"--image-size {image_size}: must be at least 32")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    _check(lr > 0, f"--lr {lr}: must be positive")
    weight_decay = DEFAULT_WEIGHT_DECAY[optimizer] if weight_decay is None else float(weight_decay)
    out = check_destination(out)
    info = get_backbone(backbone)
    rw = resolve_weights(info, weights, seed=seed)
    pretrained = rw.kind != "none"
    if freeze_epochs is None:
        freeze_epochs = min(1, epochs - 1) if pretrained else 0
    _check(0 <= freeze_epochs <= epochs, f"--freeze-epochs {freeze_epochs}: must be between 0 and --epochs ({epochs})")
    dev = resolve_device(device)
    precision = resolve_train_precision(precision, dev)
    pre = rw.preprocess
    if image_size is not None and image_size != pre.crop:
        pre = Preprocess(max(image_size, round(image_size * pre.resize / pre.crop)), image_size, pre.mean, pre.std,
                         pre.interpolation)
    bn_frozen_stage2 = bn == "frozen" or (bn == "auto" and pretrained and batch_size < BN_MIN_BATCH)
    bn_rule = ("BatchNorm: frozen statistics in stage 1; in stage 2 "
               + ("frozen statistics (eval mode, affine parameters train)" if bn_frozen_stage2 else "batch statistics")
               + (f" (--bn {bn})" if bn != "auto" else
                  f" (batch {batch_size} {'<' if bn_frozen_stage2 else '>='} {BN_MIN_BATCH})" if pretrained
                  else " (random init: no pretrained statistics to keep)"))

    train, val, val_source = _split_train_val(ds, max_train_images, seed)
    if on_start is not None:
        # what is trained, before any epoch line (so a piped log reads in order)
        on_start(f"{info.name} from {rw.identity}: train {len(train)}, val {len(val)} ({val_source}); {bn_rule}")
    classes = list(ds.classes)
    y_train = ds.labels(train)
    y_val = ds.labels(val)
    stage2_epochs = epochs - freeze_epochs
    n_batches = max(1, len(train) // batch_size)
    workers = default_workers(len(train)) if workers is None else int(workers)

    config = {"format": CHECKPOINT_FORMAT, "backbone": info.name, "weights_identity": rw.identity,
              "dataset_id": ds.id, "train": _ids_digest(train), "val": _ids_digest(val), "classes": classes,
              "epochs": epochs, "freeze_epochs": freeze_epochs, "lr": lr, "lr_mult": lr_mult, "lr_groups": lr_groups,
              "batch_size": batch_size, "optimizer": optimizer, "weight_decay": weight_decay, "augment": augment,
              "bn": bn, "probe": probe, "precision": precision, "image_size": image_size, "warmup": warmup,
              "seed": seed, "preprocess": pre.as_dict()}
    work = Path(work_dir) if work_dir else default_work_dir(out)
    ckpt_path, log_path, curves_path = work / "checkpoint.pt", work / "log.jsonl", work / "training_curves.png"
    ckpt = None
    if ckpt_path.exists():
        if restart:
            ckpt_path.unlink()
            notify(f"--restart: removed {ckpt_path}")
        else:
            ckpt = _load_checkpoint(ckpt_path)
            if ckpt.get("config") != config:
                old = ckpt.get("config") or {}
                diff = [k for k in config if old.get(k) != config[k]]
                raise ConfigError(f"{ckpt_path}: a checkpoint made with other settings ({', '.join(diff) or 'format'} "
                                  "differ); pass --restart to discard it, or another --work-dir/--out")

    # the network
    lb = load_backbone(info.name, resolved=rw, seed=seed)
    model = lb.model
    if ckpt is None:
        start = _probe_start(probe, info, rw, weights, model, train, val, ds, image_size=image_size, cache=cache,
                             seed=seed, device=dev, progress=progress, notify=notify, lb=lb)
        start_info = start.describe()
    else:
        start, start_info = None, ckpt["start"]
    torch.manual_seed(seed)
    heads = replace_head(model, info, len(classes))
    if hasattr(model, "transform_input"):
        # bundles and load_backbone rebuild Inception with transform_input=True
        model.transform_input = True
    if start is not None and start.start == "linear-probe":
        _apply_probe(model, info, start)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    norm = _Normalize(pre).to(dev)
    criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    val_images = _EvalImages(val, y_val, pre, batch_size=max(batch_size, 32), workers=min(workers, 2) if len(val) >= 64 else 0,
                             pin=dev.type == "cuda")
    notes: list[str] = []

    history: list[dict] = list(ckpt["history"]) if ckpt else []
    best = dict(ckpt["best"]) if ckpt and ckpt.get("best") else None
    done_epoch = int(ckpt["epoch"]) if ckpt else 0
    resumed_from = done_epoch if ckpt else None
    stopped = bool(ckpt and ckpt.get("stopped_early"))
    if ckpt:
        notify(f"resuming after epoch {done_epoch} of {epochs} from {ckpt_path}"
               + (" (it had stopped early: nothing left to train)" if stopped else ""))

    def write_outputs():
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plot_training_curves(history, curves_path)

    def save_ckpt(epoch, stage, opt, sched):
        _save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch, "stage": stage,
            "model": _cpu_state(model), "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history, "best": best, "start": start_info, "stopped_early": stopped})

    def better(acc):
        return best is None or acc > best["val_acc"]

    # epoch 0: the start, measured
    interrupted = False
    opt = sched = None
    stage = None
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not history:
            t0 = time.perf_counter()
            vloss, vacc = _evaluate(model, norm, val_images, dev, precision, criterion)
            rec = {"epoch": 0, "stage": "start", "start": start_info["start"], "lrs": [], "train_loss": None,
                   "train_acc": None, "val_loss": vloss, "val_acc": vacc, "seconds": time.perf_counter() - t0,
                   "images": 0}
            history.append(rec)
            best = {"epoch": 0, "val_acc": vacc, "model": _cpu_state(model)}
            notify(_epoch_line(rec, epochs, True))
            save_ckpt(0, "start", None, None)
            write_outputs()

        for epoch in range(done_epoch + 1, (done_epoch if stopped else epochs) + 1):
            new_stage = "head" if epoch <= freeze_epochs else "full"
            if new_stage != stage:
                stage = new_stage
                _set_trainable(model, heads, stage)
                if stage == "head":
                    opt = make_optimizer(optimizer, _head_param_groups(model, heads, lr, weight_decay))
                    sched = None
                else:
                    opt = make_optimizer(optimizer, build_param_groups(model, heads, lr=lr, lr_mult=lr_mult,
                                                                       groups=lr_groups, weight_decay=weight_decay))
                    sched = make_one_cycle(opt, n_batches * stage2_epochs, warmup)
                if ckpt is not None and ckpt["stage"] == stage and ckpt["optimizer"] is not None:
                    opt.load_state_dict(ckpt["optimizer"])
                    if sched is not None and ckpt["scheduler"] is not None:
                        sched.load_state_dict(ckpt["scheduler"])
                    if scaler is not None and ckpt.get("scaler"):
                        scaler.load_state_dict(ckpt["scaler"])
                ckpt = None   # used once
            t0 = time.perf_counter()
            torch.manual_seed(epoch_seed(seed, epoch))
            gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            loader = torch.utils.data.DataLoader(
                TrainImages([s.path for s in train], y_train, pre, augment), batch_size=batch_size, shuffle=True,
                drop_last=len(train) >= batch_size, num_workers=workers, collate_fn=_collate_train,
                generator=gen, worker_init_fn=_seed_worker, pin_memory=dev.type == "cuda",
                prefetch_factor=4 if workers else None)
            _train_mode(model, bn_frozen=stage == "head" or bn_frozen_stage2)
            seen, loss_sum, correct = 0, 0.0, 0
            bar = tqdm(total=n_batches * min(batch_size, len(train)), unit="img", disable=not progress,
                       desc=f"epoch {epoch}/{epochs} {stage}", dynamic_ncols=True, leave=False, smoothing=0.1)
            try:
                for images, labels, errors in loader:
                    bad = [i for i, e in enumerate(errors) if e]
                    if bad and epoch == done_epoch + 1:
                        notes += [f"train image left out: {errors[i]}" for i in bad]
                    keep = [i for i in range(len(errors)) if not errors[i]]
                    if len(keep) >= 2 or (keep and stage == "head"):
                        x = norm(images[keep].to(dev, non_blocking=True))
                        if dev.type == "cuda":
                            x = x.contiguous(memory_format=torch.channels_last)
                        y = labels[keep].to(dev, non_blocking=True)
                        with _autocast(dev, precision):
                            loss, logits = compute_loss(model(x), y, criterion)
                        opt.zero_grad(set_to_none=True)
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            scaler.step(opt)
                            scaler.update()
                        else:
                            loss.backward()
                            opt.step()
                        loss_sum += float(loss.detach()) * len(keep)
                        correct += int((logits.detach().argmax(1) == y).sum())
                        seen += len(keep)
                    if sched is not None:
                        sched.step()
                    bar.update(len(errors))
                    if seen:
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            finally:
                bar.close()
            vloss, vacc = _evaluate(model, norm, val_images, dev, precision, criterion)
            lrs = _lrs_by_group(opt)
            rec = {"epoch": epoch, "stage": stage, "lrs": lrs, "train_loss": loss_sum / seen if seen else None,
                   "train_acc": correct / seen if seen else None, "val_loss": vloss, "val_acc": vacc,
                   "seconds": time.perf_counter() - t0, "images": seen}
            history.append(rec)
            improved = better(vacc)
            if improved:
                best = {"epoch": epoch, "val_acc": vacc, "model": _cpu_state(model)}
            notify(_epoch_line(rec, epochs, improved))
            save_ckpt(epoch, stage, opt, sched)
            write_outputs()
            if on_epoch_end is not None:
                on_epoch_end(dict(rec), model)
            # patience counts stage-2 epochs only: the head-only ones are not the model's last word
            if patience and stage == "full" and epoch < epochs and epoch - max(best["epoch"], freeze_epochs) >= patience:
                stopped = True
                save_ckpt(epoch, stage, opt, sched)   # a rerun must not train on
                notify(f"early stop: no better val accuracy for {patience} epochs")
                break
    except KeyboardInterrupt:
        if best is None:
            raise
        interrupted = True
        notify(f"interrupted: writing the bundle from the best epoch so far ({best['epoch']}); "
               "run the same command again to resume after the last finished epoch")

    notes += [f"val image {val[i].path} could not be read: left out" for i in sorted(val_images.errors)]
    model.load_state_dict(best["model"])
    model.eval()
    state_bytes = _state_bytes(_cpu_state(model))
    manifest = finetune_manifest(classes=classes, info=info, heads=heads, state_sha256=hashlib.sha256(state_bytes).hexdigest(),
                                 weights_spec=weights, resolved=rw, preprocess=pre,
                                 seed=seed, config=config, start=start_info, history=history, best=best,
                                 dataset=ds, n_train=len(train), n_val=len(val), val_source=val_source,
                                 bn_rule=bn_rule, interrupted=interrupted, stopped_early=stopped, device=str(dev))
    payload = {"state_bytes": state_bytes, "extras": [log_path, curves_path]}
    path = save_bundle(out, manifest, payload)
    return FinetuneResult(path, work, history, best["epoch"], best["val_acc"], start_info, len(train), len(val),
                          val_source, interrupted, stopped, resumed_from, time.perf_counter() - t_start, bn_rule,
                          notes, manifest)


def _lrs_by_group(opt) -> list[float]:
    seen: dict[int, float] = {}
    for g in opt.param_groups:
        seen.setdefault(g.get("layer_group", 0), float(g["lr"]))
    return [seen[k] for k in sorted(seen)]


def _epoch_line(rec: dict, epochs: int, best: bool) -> str:
    if rec["epoch"] == 0:
        return (f"epoch 0/{epochs} start ({rec['start']}): val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f}"
                f" ({rec['seconds']:.0f} s)")
    lrs = rec["lrs"]
    lr = f"lr {lrs[-1]:.2g}" if len(lrs) == 1 else f"lr {lrs[0]:.2g}..{lrs[-1]:.2g}"
    return (f"epoch {rec['epoch']}/{epochs} {rec['stage']}: {lr}, train loss {rec['train_loss']:.4f} "
            f"acc {rec['train_acc']:.4f}, val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f} "
            f"({rec['seconds']:.0f} s, {rec['images'] / max(rec['seconds'], 1e-9):.1f} img/s)" + (" *" if best else ""))


# --------------------------------------------------------------------------
# bundles of kind "finetune"


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def finetune_manifest(*, classes, info: BackboneInfo, heads: Sequence[str], state_sha256: str, weights_spec: str,
                      resolved: ResolvedWeights,
                      preprocess: Preprocess, seed: int, config: dict, start: dict, history: list[dict],
                      best: dict, dataset: Dataset | None, n_train: int, n_val: int, val_source: str,
                      bn_rule: str, interrupted: bool, stopped_early: bool, device: str) -> dict:
    """The manifest of a "finetune" bundle. The network's weights are
    ``backbone.pt`` itself: ``backbone.weights_identity`` is
    ``file:<its sha256>``, what ``--weights BUNDLE/backbone.pt`` resolves to;
    ``backbone.started_from`` names the weights training began with."""
    from .bundle import dataset_record, weights_sha256
    training = None
    if dataset is not None:
        training = {**dataset_record(dataset), "n_train": n_train, "n_val": n_val, "val_source": val_source}
    return {
        "kind": "finetune",
        "classes": [str(c) for c in classes],
        "backbone": {
            "name": info.name,
            "heads": list(heads),
            "started_from": {"spec": str(weights_spec), "kind": resolved.kind, "name": resolved.name,
                             "identity": resolved.identity, "sha256": weights_sha256(resolved)},
            "weights_kind": "file",
            "weights_identity": f"file:{state_sha256}",
            "weights_sha256": state_sha256,
            "seed": int(seed),
            "preprocess": preprocess.as_dict(),
            "layer": None,
            "pool": None,
        },
        "finetune": {
            "config": {k: v for k, v in config.items() if k not in ("format", "classes", "train", "val")},
            "start": start,
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"],
            "start_val_acc": history[0]["val_acc"] if history and history[0]["epoch"] == 0 else None,
            "epochs_run": max((r["epoch"] for r in history), default=0),
            "interrupted": interrupted,
            "stopped_early": stopped_early,
            "bn_rule": bn_rule,
            "device": device,
            "history": history,
        },
        "training": training,
    }


def _save_finetune(payload, folder: Path) -> None:
    """``payload``: ``{"state_bytes": torch.save output}`` (or ``"state_dict"``),
    and ``"extras"``: files copied beside it (log, curves)."""
    data = payload.get("state_bytes") or _state_bytes(payload["state_dict"])
    (folder / "backbone.pt").write_bytes(data)
    for extra in payload.get("extras", []):
        if Path(extra).is_file():
            shutil.copyfile(extra, folder / Path(extra).name)


def build_network(backbone: str, num_classes: int) -> nn.Module:
    """The architecture of a "finetune" bundle, randomly initialised, in eval mode."""
    info = get_backbone(backbone)
    # pretrained=True: Inception's transform_input, which fine-tuning always sets
    return info.build(num_classes=num_classes, pretrained=True).eval()


def _load_finetune(folder: Path, manifest: dict) -> nn.Module:
    from .bundle import BundleError
    b = manifest.get("backbone") or {}
    try:
        model = build_network(b["name"], len(manifest["classes"]))
    except (KeyError, FeatxError) as e:
        raise BundleError(f"{folder}: cannot rebuild the network ({e})") from None
    path = folder / "backbone.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad bundle
        raise BundleError(f"{path}: does not load into {b.get('name')} with {len(manifest['classes'])} classes "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _finetune_probabilities(bundle, samples: list, *, cache=None, weights=None, progress=True, notify=None,
                            device="auto", batch_size=None, workers=None, **_ignored):
    """Run the fine-tuned network on the images (no feature cache: the whole
    network is the model)."""
    from tqdm.auto import tqdm

    from .bundle import Predictions
    notify = notify or (lambda msg: None)
    if weights:
        notify("note: --weights does not apply to a fine-tuned bundle (it carries its weights in backbone.pt)")
    t0 = time.perf_counter()
    n_classes = len(bundle.classes)
    proba = np.full((len(samples), n_classes), np.nan)
    errors: list[str | None] = [None] * len(samples)
    if not samples:
        return Predictions(proba, [])
    pre = Preprocess.from_dict(bundle.manifest["backbone"]["preprocess"])
    dev = resolve_device(device)
    model = bundle.payload.to(dev).eval()
    norm = _Normalize(pre).to(dev)
    workers = default_workers(len(samples)) if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles([s.path for s in samples], pre), batch_size=batch_size or 32,
                                         shuffle=False, num_workers=workers, collate_fn=collate,
                                         pin_memory=dev.type == "cuda")
    bar = tqdm(total=len(samples), unit="img", desc=f"predict {bundle.name}", disable=not progress,
               dynamic_ncols=True, leave=False)
    done = 0
    try:
        with torch.inference_mode():
            for images, idx, errs in loader:
                keep = [i for i, e in enumerate(errs) if not e]
                for i, e in enumerate(errs):
                    if e:
                        errors[int(idx[i])] = e
                if keep:
                    logits = model(norm(images[keep].to(dev))).float()
                    proba[idx[keep].numpy()] = torch.softmax(logits, 1).cpu().numpy()
                    done += len(keep)
                bar.update(len(errs))
    finally:
        bar.close()
    return Predictions(proba, errors, extracted=done, cached=0, seconds=time.perf_counter() - t0)


def _finetune_kind():
    from .bundle import BundleKind
    return BundleKind("finetune", ("backbone.pt",), _save_finetune, _load_finetune, _finetune_probabilities)


FINETUNE = _finetune_kind()


def backbone_from_bundle(path) -> tuple[str, ResolvedWeights, dict]:
    """The fine-tuned network of a "finetune" bundle as a backbone for extraction.

    Returns ``(backbone name, ResolvedWeights, state_dict)``. The weights are
    of kind ``"file"`` pointing at the bundle's ``backbone.pt``, identity
    ``file:<sha256 of backbone.pt>`` (so the fine-tuned features get cache
    entries of their own, and ``--weights BUNDLE/backbone.pt`` names the same
    ones), preprocessing as the bundle was trained with, and
    ``num_classes`` = the bundle's classes. ``load_backbone(name,
    resolved=rw)`` loads it strictly.
    """
    from .bundle import BundleError, load_bundle, read_manifest
    manifest = read_manifest(path)      # the kind first: another kind's payload is not even loaded
    if manifest.get("kind") != "finetune":
        b = manifest.get("backbone") or {}
        raise BundleError(f"{Path(path).expanduser()}: a {manifest.get('kind')!r} bundle keeps its backbone frozen "
                          f"({b.get('name')} {b.get('weights_identity')}); extract with --backbone/--weights instead")
    bundle = load_bundle(path)          # backbone.pt is read with weights_only=True: tensors, no code
    from .backbones import sha256_of
    pt = bundle.path / "backbone.pt"
    sha = sha256_of(pt)      # load_bundle has checked it against the manifest
    b = bundle.backbone
    pre = Preprocess.from_dict(b["preprocess"])
    rw = ResolvedWeights(spec=str(bundle.path), kind="file", name=f"{bundle.path.name}/backbone.pt",
                         identity=f"file:{sha}", preprocess=pre, source=f"fine-tuned bundle {bundle.path}",
                         path=pt.resolve(), num_classes=len(bundle.classes),
                         meta={"sha256": sha, "bundle": str(bundle.path),
                               "started_from": (b.get("started_from") or {}).get("identity")})
    return b["name"], rw, bundle.payload.state_dict()


def summary_lines(result: FinetuneResult) -> list[str]:
    """What ``featx finetune`` prints at the end."""
    lines = []
    start = result.start
    s0 = result.start_val_acc
    lines.append(f"start: {start['start']} ({start['reason']})" + (f", val acc {s0:.4f}" if s0 is not None else ""))
    if result.best_epoch is not None:
        where = "the start itself" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
        gain = f" ({result.best_val_acc - s0:+.4f} over the start)" if s0 is not None else ""
        lines.append(f"best: {where}, val acc {result.best_val_acc:.4f}{gain}")
    ran = max((r["epoch"] for r in result.history), default=0)
    how = " (interrupted)" if result.interrupted else " (early stop)" if result.stopped_early else ""
    lines.append(f"trained {ran} epoch{'s' if ran != 1 else ''}{how} in {result.seconds:.0f} s; "
                 f"log and curves in {result.work_dir}")
    return lines
