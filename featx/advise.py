"""Which transfer-learning regime fits a dataset, measured from the data.

The standard guidance (cs231n, "Transfer Learning"; Yosinski et al. 2014)
sorts a new dataset on two axes:

==================  =========================================  =============================================
                    similar to ImageNet                        different from ImageNet
==================  =========================================  =============================================
small               linear classifier on the top features       linear classifier on earlier-layer features
large               fine-tune the top of the network            fine-tune more of the network
==================  =========================================  =============================================

:func:`measure` takes the numbers from the dataset itself, on a stratified
sample of its train split, through the feature cache:

size
    median train images per class; *large* from :data:`LARGE_IMAGES_PER_CLASS`
    (1000) up: below that, a network with millions of weights overfits when
    fine-tuned, so frozen features win.
ImageNet entropy
    mean normalised entropy ``H(p) / ln(K)`` of the pretrained model's own
    ImageNet predictions (its logits layer, softmax). Images like ImageNet's
    get confident predictions (low entropy); images unlike anything in
    ImageNet spread their probability (high). At most
    :data:`SIMILAR_MAX_ENTROPY` counts as similar.
probe
    5-fold cross-validated logistic regression accuracy on the top features
    (the penultimate layer) and on an earlier layer (the last block before
    the final downsampling, e.g. MobileNetV2 ``features.13``, ResNet
    ``layer3``). When the earlier layer is clearly better, the top
    features are too ImageNet-specific for this data: *different*. "Clearly"
    is a margin of one standard error of the accuracy (at least
    :data:`PROBE_MIN_MARGIN`).

:func:`decide` turns the numbers into advice and is a pure function of
them (tests build synthetic cases in each quadrant). Similarity follows the
probe when its difference is beyond the margin (it measures the actual
task); within the margin, the entropy decides. :func:`pipeline_toml` writes
a pipeline file that implements the advice.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DatasetError

__all__ = ["Advice", "LARGE_IMAGES_PER_CLASS", "Measurements", "PROBE_MIN_MARGIN", "SIMILAR_MAX_ENTROPY",
           "advise", "decide", "earlier_layer", "format_advice", "measure", "pipeline_toml"]

#: From this many train images per class (median) a dataset counts as large.
LARGE_IMAGES_PER_CLASS = 1000
#: Mean normalised entropy of ImageNet predictions up to which images look like
#: ImageNet's: 0.4 of ln(1000) is a perplexity of about 16, i.e. the model spreads
#: its belief over ~16 of the 1000 classes. Measured with MobileNetV2: 0.235 on the
#: clothing-mini photos, 0.47 on coloured noise.
SIMILAR_MAX_ENTROPY = 0.4
#: Smallest accuracy difference between the probes that counts as a difference.
PROBE_MIN_MARGIN = 0.02
#: Grid of C for the quick probes (CV picks one per layer).
PROBE_GRID = (0.01, 0.1, 1.0)

REGIMES = {
    ("small", "similar"): ("linear-top", "linear classifier on the top features"),
    ("small", "different"): ("linear-earlier", "linear classifier on earlier-layer features"),
    ("large", "similar"): ("finetune-top", "fine-tune the top of the network"),
    ("large", "different"): ("finetune-more", "fine-tune more of the network"),
}


@dataclass(frozen=True)
class Measurements:
    """The numbers the advice is made of.

    ``entropy`` and the probe accuracies may be None (not measurable, e.g.
    weights without ImageNet classes); ``n_probe`` is the number of images
    the probes were cross-validated on.
    """

    n_classes: int
    images_per_class: float
    entropy: float | None = None
    probe_top: float | None = None
    probe_earlier: float | None = None
    n_probe: int = 0
    top_layer: str = "top"
    earlier_layer: str = "earlier"
    n_images: int = 0
    n_train: int = 0
    backbone: str = ""
    weights: str = ""


@dataclass(frozen=True)
class Advice:
    size: str                    # "small" | "large"
    similarity: str              # "similar" | "different"
    regime: str                  # linear-top | linear-earlier | finetune-top | finetune-more
    summary: str                 # the regime in words
    reasons: tuple[str, ...] = field(default_factory=tuple)   # one line per measurement, with its numbers


def probe_margin(m: Measurements) -> float:
    """One standard error of a CV accuracy around the probes' level, at least PROBE_MIN_MARGIN."""
    if m.probe_top is None or m.probe_earlier is None or m.n_probe <= 0:
        return PROBE_MIN_MARGIN
    p = min(max((m.probe_top + m.probe_earlier) / 2, 0.0), 1.0)
    return max(PROBE_MIN_MARGIN, math.sqrt(p * (1 - p) / m.n_probe))


def decide(m: Measurements) -> Advice:
    """The regime for these numbers (pure: no data, no model)."""
    if m.images_per_class < 0 or m.n_classes < 2:
        raise ValueError("need at least 2 classes and a non-negative images_per_class")
    size = "large" if m.images_per_class >= LARGE_IMAGES_PER_CLASS else "small"
    reasons = [f"size: {m.images_per_class:g} train images per class (median) "
               f"{'>=' if size == 'large' else '<'} {LARGE_IMAGES_PER_CLASS} -> {size}"]

    by_entropy = None
    if m.entropy is not None:
        by_entropy = "similar" if m.entropy <= SIMILAR_MAX_ENTROPY else "different"
        reasons.append(f"ImageNet entropy: {m.entropy:.3f} mean normalised entropy of the pretrained model's "
                       f"ImageNet predictions ({'<=' if by_entropy == 'similar' else '>'} {SIMILAR_MAX_ENTROPY}) "
                       f"-> {by_entropy}")
    by_probe = None
    if m.probe_top is not None and m.probe_earlier is not None:
        gap = m.probe_earlier - m.probe_top
        margin = probe_margin(m)
        where = (f"linear probe ({m.n_probe} images, CV): top {m.top_layer} {m.probe_top:.3f}, "
                 f"earlier {m.earlier_layer} {m.probe_earlier:.3f}")
        if gap > margin:
            by_probe = "different"
            reasons.append(f"{where}: earlier layer better by {gap:.3f} (> margin {margin:.3f}) -> different")
        elif gap < -margin:
            by_probe = "similar"
            reasons.append(f"{where}: top layer better by {-gap:.3f} (> margin {margin:.3f}) -> similar")
        else:
            reasons.append(f"{where}: within the margin {margin:.3f} -> no evidence either way")

    if by_probe is not None:
        similarity = by_probe
        if by_entropy is not None and by_entropy != by_probe:
            reasons.append(f"the probe measures this task directly, so it outweighs the entropy -> {similarity}")
    elif by_entropy is not None:
        similarity = by_entropy
    else:
        similarity = "similar"
        reasons.append("no similarity measurement: assuming similar (the usual case for photos)")
    regime, summary = REGIMES[(size, similarity)]
    return Advice(size, similarity, regime, summary, tuple(reasons))


# --------------------------------------------------------------------------
# measuring


# Where "the block before the last stage" is not what the rule below finds
# (VGG and AlexNet end in a pooling-only stage): pool4 / conv4.
EARLIER_LAYERS = {"vgg16": "features.23", "vgg16_bn": "features.33", "alexnet": "features.9"}


def earlier_layer(backbone: str) -> str:
    """The last layer before the final downsampling stage (ResNet ``layer3``,
    MobileNetV2 ``features.13``, VGG-16 pool4 ``features.23``): features still
    generic enough to transfer to images unlike ImageNet's."""
    from .backbones import get_backbone
    from .extract import layer_table
    info = get_backbone(backbone)
    if info.name in EARLIER_LAYERS:
        return EARLIER_LAYERS[info.name]
    rows = [r for r in layer_table(backbone) if len(r["shape"]) == 3 and r["shape"][1] > 1]
    if not rows:
        return info.default_layer
    sizes = sorted({r["shape"][1] for r in rows})
    wanted = sizes[1] if len(sizes) > 1 else sizes[0]
    return [r["layer"] for r in rows if r["shape"][1] == wanted][-1]


def _sample(samples, n: int, seed: int):
    """A stratified, seeded sample of about ``n`` samples (every class kept)."""
    from .data import stratified_take
    return stratified_take(samples, n, seed) if len(samples) > n else list(samples)


def _entropy(logits: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return float(np.mean(h / math.log(logits.shape[1])))


def _probe(X, y, seed: int, jobs) -> float | None:
    from .classify import fit_classifier
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.min() < 2:
        return None
    fit = fit_classifier("logreg", X, y, grid=PROBE_GRID, cv=min(5, int(counts.min())), n_jobs=jobs, seed=seed)
    return fit.cv_score


def measure(ds, backbone: str = "mobilenet_v2", *, weights: str = "auto", cache="cache", sample: int = 500,
            seed: int = 0, jobs: int | None = None, progress: bool = True, notify=None,
            **extract_options) -> Measurements:
    """Measure ``ds`` for :func:`decide`: sizes, ImageNet entropy, two linear probes.

    One extraction pass over a stratified sample of at most ``sample`` train
    images gives the top layer, the earlier layer and the logits (all cached,
    so a later ``featx run`` of the written pipeline reuses them).
    ``extract_options`` (device, batch_size, workers, ...) go to
    :func:`featx.extract.extract`.
    """
    from .backbones import get_backbone, resolve_weights
    from .cache import FeatureCache
    from .extract import extract, feature_specs, split_options
    info = get_backbone(backbone)
    rw = resolve_weights(info, weights, seed=seed)
    if "train" not in ds.splits:
        raise DatasetError(f"{ds.root}: no train split to measure")
    train = ds.subset("train")
    counts = [c for c in ds.counts("train").values()]
    per_class = float(statistics.median(counts))
    chosen = _sample(train, sample, seed)
    top, earlier, head = info.default_layer, earlier_layer(backbone), info.head
    layers = list(dict.fromkeys([top, earlier, head]))
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    spec_options, run_options = split_options(extract_options)
    specs = feature_specs(info.name, layers=layers, seed=seed, resolved=rw,   # the weights resolved above, once
                          device=extract_options.get("device", "auto"), **spec_options)
    report = extract(chosen, specs, cache=cache, progress=progress, notify=notify, **run_options)
    have = set(cache.ids(report.specs[0].key))
    chosen = [s for s in chosen if s.id in have]
    if not chosen:
        raise DatasetError(f"{ds.root}: none of the sampled train images could be read")
    ids = [s.id for s in chosen]
    y = ds.labels(chosen)
    by_layer = {spec.layer: spec for spec in report.specs}
    X_top = cache.read(by_layer[top].key, ids)
    X_earlier = cache.read(by_layer[earlier].key, ids)
    logits = cache.read(by_layer[head].key, ids)
    # entropy only means "like ImageNet" for a head over ImageNet's 1000 classes
    entropy = _entropy(logits) if logits.shape[1] == 1000 else None
    return Measurements(
        n_classes=len(ds.classes), images_per_class=per_class, entropy=entropy,
        probe_top=_probe(X_top, y, seed, jobs), probe_earlier=_probe(X_earlier, y, seed, jobs),
        n_probe=len(chosen), top_layer=top, earlier_layer=earlier, n_images=len(ds), n_train=len(train),
        backbone=info.name, weights=rw.name)


def format_advice(m: Measurements, a: Advice, dataset_name: str = "") -> str:
    """The printed reasoning: what was measured, each measurement's verdict, the regime."""
    lines = [f"dataset {dataset_name}: {m.n_images} images, {m.n_classes} classes; {m.n_train} in train",
             f"measured with {m.backbone} ({m.weights}) on {m.n_probe} train images:"]
    lines += [f"  {r}" for r in a.reasons]
    lines.append(f"advice: {a.size} and {a.similarity} -> {a.summary}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the pipeline that implements the advice


def _q(s: str) -> str:
    import json
    return json.dumps(s, ensure_ascii=False)


def pipeline_toml(m: Measurements, a: Advice, *, dataset: str, backbone: str, weights: str = "auto",
                  layout: str = "auto", label_regex: str | None = None, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0, output_dir: str = "runs/advice",
                  cache: str | None = None) -> str:
    """A pipeline file (TOML text, with comments) implementing ``a``.

    ``dataset``, ``output_dir`` and ``cache`` are written as given: relative
    paths are relative to the file's folder (``featx:NAME`` works too).
    """
    top, earlier = m.top_layer, m.earlier_layer
    layers = [top] if a.regime in ("linear-top", "finetune-top") else [earlier, top]
    reason_lines = "\n".join(f"#   {r}" for r in a.reasons)
    out = [f"# Written by `featx advise`: {a.size} and {a.similarity} -> {a.summary}.",
           "# Measured:", reason_lines,
           "# Run it with `featx run THIS_FILE`; `--dry-run` shows the plan first.", "",
           "[dataset]",
           f"path = {_q(dataset)}",
           f"layout = {_q(layout)}"]
    if label_regex:
        out.append(f"label_regex = {_q(label_regex)}")
    out += [f"val_fraction = {val_fraction!r}", f"test_fraction = {test_fraction!r}", f"seed = {seed}", "",
            "[[backbones]]",
            f"name = {_q(backbone)}",
            f"weights = {_q(weights)}"]
    if a.regime == "linear-earlier":
        out.append("# earlier-layer features transfer better to images unlike ImageNet's; the top layer")
        out.append("# stays in as the reference the advice was measured against")
    elif a.regime == "finetune-more":
        out.append("# the linear baseline the fine-tuned network has to beat, on both layers")
    elif a.regime == "finetune-top":
        out.append("# the linear baseline the fine-tuned network has to beat")
    out += [f"layers = [{', '.join(_q(x) for x in layers)}]", 'pool = "avg"', "",
            "[classifiers]",
            'names = ["logreg", "linear-svm"]',
            "cv = 5"]
    if a.regime == "finetune-top":
        out += ["",
                "# fine-tune the top: two epochs train the new head alone, then the stem learns at",
                "# lr/100 and the groups above it geometrically faster: the early layers barely move",
                "[finetune]",
                f"backbone = {_q(backbone)}",
                f"weights = {_q(weights)}",
                "epochs = 6", "freeze_epochs = 2", "lr_mult = 100.0", "lr_groups = 4"]
    elif a.regime == "finetune-more":
        out += ["",
                "# fine-tune more: one head-only epoch, then the whole network with the stem at",
                "# lr/10, so every layer adapts to images unlike ImageNet's",
                "[finetune]",
                f"backbone = {_q(backbone)}",
                f"weights = {_q(weights)}",
                "epochs = 10", "freeze_epochs = 1", "lr_mult = 10.0", "lr_groups = 4"]
    out += ["", "[output]", f"dir = {_q(output_dir)}"]
    if cache:
        out.append(f"cache = {_q(cache)}")
    return "\n".join(out) + "\n"


def relative_for(path: str | os.PathLike, folder: Path) -> str:
    """``path`` as written in a file in ``folder``: relative when it lies in
    ``folder`` or beside it (so the pair can move together), else absolute."""
    p = Path(path).resolve()
    try:
        rel = os.path.relpath(p, folder.resolve())
    except ValueError:       # another drive on Windows
        return str(p)
    return str(p) if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel


def advise(dataset: str, *, backbone: str = "mobilenet_v2", weights: str = "auto", write=None, cache="cache",
           layout: str = "auto", label_regex: str | None = None, val_fraction: float = 0.15,
           test_fraction: float = 0.15, seed: int = 0, sample: int = 500, jobs: int | None = None,
           progress: bool = True, notify=None, **extract_options):
    """Open ``dataset`` (a path or ``featx:NAME``), measure, decide, and write
    the pipeline file ``write`` when given (it is validated before it is kept).

    Returns ``(dataset, measurements, advice, written path or None)``.
    """
    from .cache import FeatureCache
    from .data import open_dataset
    from .pipeline import PACKAGE_DATASET_PREFIX, load_pipeline, resolve_dataset_path
    from .files import atomic_write_text
    if sample < 10:
        raise ConfigError(f"--sample {sample}: must be at least 10")
    root = resolve_dataset_path(str(dataset), Path.cwd())
    ds = open_dataset(root, layout, label_regex=label_regex, val_fraction=val_fraction, test_fraction=test_fraction,
                      seed=seed, hash_index=FeatureCache(cache).hash_index)
    m = measure(ds, backbone, weights=weights, cache=cache, sample=sample, seed=seed, jobs=jobs, progress=progress,
                notify=notify, **extract_options)
    a = decide(m)
    written = None
    if write is not None:
        target = Path(write)
        folder = target.resolve().parent
        folder.mkdir(parents=True, exist_ok=True)
        shipped = str(dataset).startswith(PACKAGE_DATASET_PREFIX)
        weights_text = relative_for(weights, folder) if Path(weights).is_file() else weights
        text = pipeline_toml(m, a, dataset=str(dataset) if shipped else relative_for(root, folder),
                             backbone=backbone, weights=weights_text, layout=layout, label_regex=label_regex,
                             val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                             output_dir=f"runs/{target.stem}", cache=relative_for(cache, folder))
        atomic_write_text(target, text)
        try:
            load_pipeline(target)
        except ConfigError:
            target.unlink()
            raise
        written = target
    return ds, m, a, written
