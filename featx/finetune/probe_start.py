"""The linear-probe start: the new head begins as the logistic regression on cached features.

With pretrained weights and a linear head, the logistic regression that
``featx train`` fits on the cached penultimate features (the head's input),
its C chosen on val, has its StandardScaler folded exactly into the Linear
layer (:func:`fold_probe`). Missing features of the train and val images
are extracted first (one frozen inference pass; they stay in the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..backbones import BackboneInfo, ResolvedWeights
from ..data import Dataset, Sample
from ..errors import ConfigError

__all__ = ["ProbeStart", "fold_probe"]


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
    from ..cache import FeatureCache
    from ..classify import fit_classifier
    from ..extract import extract, feature_specs, resolve_precision
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
        _, _, specs = feature_specs(info.name, layers=[info.default_layer], pool="avg", precision=precision,
                                    seed=seed, resolved=rw)   # the run's weights, resolved once
        if set(ids) <= set(cache.ids(specs[0].key)):
            spec = specs[0]
            break
    extracted = 0
    if spec is None:
        notify(f"linear-probe start: extracting {info.default_layer} features of the train and val images "
               "(one frozen pass; they stay in the cache)")
        report = extract(train + val, info.name, resolved=rw, layers=[info.default_layer], pool="avg",
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
