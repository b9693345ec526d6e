"""Model bundles: everything ``featx predict`` needs, in one folder.

A bundle is a directory, by convention ``NAME.featx/``::

    manifest.json   what a human (or another tool) needs to know: format
                    version, kind, class names, the backbone and the exact
                    weights (identity and sha256), layer, pooling,
                    preprocessing, the cache spec of the features, the
                    classifier and how its parameter was chosen, the
                    training data, library versions, and the sha256 of
                    every payload file
    model.json      kind "linear": the fitted scikit-learn Pipeline (scaler,
    model.safetensors  optional PCA, classifier) as data: each estimator's
                    class name, parameters and fitted numbers in JSON, its
                    arrays in safetensors (see :mod:`featx.safemodel`)
    backbone.pt     kind "finetune": the network's state_dict (tensors only)

Bundles carry no code. ``manifest.json`` is plain JSON; read it with any
tool. Loading a "linear" bundle builds only whitelisted scikit-learn classes
(:data:`featx.safemodel.ALLOWED`) from JSON and arrays; ``backbone.pt`` is
read with ``torch.load(weights_only=True)``, which builds tensors and
nothing else. What is still a pickle -- ``model.joblib`` of format 1
bundles, or of a model featx cannot store as data, written only when asked
with :class:`Pickled` -- can run any code when loaded, so
:func:`load_bundle` refuses it unless called with ``trust=True`` (the CLI's
``--trust-bundle``), and then says so on stderr first.
:func:`upgrade_bundle` rewrites such a bundle (once trusted) without pickle.
The sha256 of every payload file in ``manifest.json`` finds damage, not
malice: whoever can change a payload can change the manifest too.

A bundle is written to a temporary folder beside its destination and moved
into place only when complete; an existing bundle is replaced only then.

Kinds
-----
``kind`` says what the payload is and how it turns images into
probabilities. Each kind is a :class:`BundleKind` (payload files, save,
load, probabilities) found through :data:`KINDS`: the "linear" kind
(frozen backbone features from the cache, then the Pipeline) lives here;
"finetune" (the whole network in ``backbone.pt``) lives in
:mod:`featx.finetune`. A kind is added by naming its :class:`BundleKind` in
:data:`KINDS` (``"module:attribute"``, imported on first use) or with
:func:`register_kind`. Everything else
(:func:`load_bundle`, :func:`bundle_probabilities`, the CLI) dispatches
through :func:`get_kind`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ConfigError, FeatxError, WeightsError
from .files import file_sha256, fsync_path, sha256_of

__all__ = [
    "BUNDLE_FORMAT", "Bundle", "BundleError", "BundleKind", "KINDS", "Predictions",
    "Pickled", "bundle_probabilities", "check_destination", "check_weights", "dataset_record", "get_kind",
    "linear_manifest", "load_bundle", "read_manifest", "register_kind", "save_bundle", "upgrade_bundle",
]

# 2: "linear" payloads are model.json + model.safetensors (no pickle); 1: model.joblib (a pickle)
BUNDLE_FORMAT = 2
READS_FORMATS = (1, 2)
MANIFEST = "manifest.json"
SUFFIX = ".featx"


class BundleError(FeatxError):
    """Not a bundle, a damaged one, or one this featx cannot read."""


# --------------------------------------------------------------------------
# kinds


@dataclass(frozen=True)
class BundleKind:
    """How one kind of bundle stores its payload and makes probabilities.

    Attributes
    ----------
    name : str
        The ``kind`` written in ``manifest.json``.
    files : tuple of str
        Payload files inside the bundle (each gets a sha256 in the manifest).
    save : callable
        ``save(payload, folder)`` writes the payload files into ``folder``.
    load : callable
        ``load(folder, manifest) -> payload``.
    probabilities : callable
        ``probabilities(bundle, samples, **options) -> Predictions``; see
        :func:`bundle_probabilities` for the options.
    pickle_files : tuple of str
        The payload files ``save`` writes instead of ``files`` when the
        payload can only be stored as a pickle (and format 1 bundles of the
        kind always have); empty: the kind never pickles.
    load_pickle : callable, optional
        ``load_pickle(folder, manifest) -> payload`` reads ``pickle_files``;
        :func:`load_bundle` calls it only when trusted.
    """

    name: str
    files: tuple[str, ...]
    save: Callable[[Any, Path], None]
    load: Callable[[Path, dict], Any]
    probabilities: Callable[..., "Predictions"]
    pickle_files: tuple[str, ...] = ()
    load_pickle: Callable[[Path, dict], Any] | None = None


# kind -> BundleKind, or "module:attribute" naming one (imported when first used)
KINDS: dict[str, BundleKind | str] = {"linear": "featx.bundle:LINEAR", "finetune": "featx.finetune:FINETUNE"}


def register_kind(kind: BundleKind) -> None:
    """Make ``kind`` loadable (e.g. from the module that defines it)."""
    KINDS[kind.name] = kind


def get_kind(name: str) -> BundleKind:
    """The :class:`BundleKind` called ``name``; :class:`BundleError` when unknown."""
    entry = KINDS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise BundleError(f"unknown bundle kind {name!r}; this featx reads: {', '.join(KINDS)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        KINDS[name] = entry
    return entry


# --------------------------------------------------------------------------
# the bundle


@dataclass
class Bundle:
    """A loaded bundle: its folder, its manifest and its payload."""

    path: Path
    manifest: dict
    payload: Any
    warnings: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def backbone(self) -> dict:
        return self.manifest["backbone"]

    @property
    def feature_spec(self):
        """The FeatureSpec of the (first) part the classifier reads."""
        from .cache import FeatureSpec
        return FeatureSpec.from_json(self.manifest["features"]["spec"])

    @property
    def feature_parts(self) -> list[tuple[dict, Any]]:
        """``(backbone record, FeatureSpec)`` of every part, in column order:
        one for a plain layer, several for a fusion (``A+B``)."""
        from .cache import FeatureSpec
        parts = self.manifest.get("parts")
        if not parts:
            return [(self.backbone, self.feature_spec)]
        return [(p["backbone"], FeatureSpec.from_json(p["features"]["spec"])) for p in parts]

    @property
    def name(self) -> str:
        return self.path.name


def _bundle_versions() -> dict:
    """The libraries a bundle's model is saved and loaded with (scikit-learn's
    is checked at load), and what ran its network (ONNX Runtime for int8
    features); :func:`featx.cache._entry_versions` records
    what computed a cache entry's features instead."""
    import joblib
    import safetensors
    import sklearn

    from . import __version__
    from .cache import package_version   # torch, torchvision and ONNX Runtime: not imported for this
    return {"featx": __version__, "scikit-learn": sklearn.__version__, "joblib": joblib.__version__,
            "numpy": np.__version__, "torch": package_version("torch"), "torchvision": package_version("torchvision"),
            "onnxruntime": package_version("onnxruntime"), "safetensors": safetensors.__version__,
            "python": sys.version.split()[0]}


def check_destination(path: str | os.PathLike) -> Path:
    """``path`` if a bundle may be written there (nothing, or a bundle to replace)."""
    path = Path(path).expanduser()
    if path.exists() and not (path.is_dir() and (path / MANIFEST).is_file()):
        raise BundleError(f"{path}: exists and is not a featx bundle; choose another --out")
    return path


def save_bundle(path: str | os.PathLike, manifest: dict, payload: Any) -> Path:
    """Write a bundle atomically; returns its path.

    ``manifest`` must hold ``kind`` (and whatever that kind's loader reads);
    the format version, creation time, library versions and payload hashes
    are added here. The files go to a temporary folder beside ``path``,
    which replaces ``path`` only once complete. An existing ``path`` that is
    not a bundle is never replaced.
    """
    path = check_destination(path)
    kind = get_kind(manifest.get("kind"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        kind.save(payload, tmp)
        files = {}
        written = kind.files
        if kind.pickle_files and all((tmp / n).is_file() for n in kind.pickle_files) \
                and not any((tmp / n).is_file() for n in kind.files):
            written = kind.pickle_files
        for name in written:
            p = tmp / name
            if not p.is_file():
                raise BundleError(f"bundle kind {kind.name!r} did not write {name}")
            fsync_path(p)
            files[name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        full = {"featx_bundle": BUNDLE_FORMAT, **manifest,
                "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": _bundle_versions(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
        old = None
        if path.exists():
            # the old bundle steps aside only now that the new one is complete
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the bundle at ``path``, its format checked; loads no payload.

    Raises :class:`BundleError` with one line: not a bundle, unreadable, or
    a format this featx does not read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BundleError(f"{path}: no such model bundle (make one with `featx train ... --out {path.name}`)")
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        raise BundleError(f"{path}: not a featx model bundle (no {MANIFEST}; make one with `featx train`)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or "featx_bundle" not in manifest:
        raise BundleError(f"{path}: not a featx model bundle ({MANIFEST} has no 'featx_bundle' version)")
    version = manifest["featx_bundle"]
    if type(version) is not int or version not in READS_FORMATS:
        newer = type(version) is int and version > BUNDLE_FORMAT
        reads = " and ".join(str(v) for v in READS_FORMATS)
        raise BundleError(f"{path}: bundle format {version!r} is unknown to featx "
                          f"{_bundle_versions()['featx']}, which reads formats {reads}"
                          + ("; upgrade featx" if newer else ""))
    return manifest


def _payload_files(kind: BundleKind, manifest: dict) -> tuple[tuple[str, ...], bool]:
    """The payload files this bundle has, and whether they are a pickle."""
    if not kind.pickle_files:
        return kind.files, False
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    if manifest["featx_bundle"] == 1 or (all(n in listed for n in kind.pickle_files)
                                         and not any(n in listed for n in kind.files)):
        return kind.pickle_files, True
    return kind.files, False


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_bundle(path: str | os.PathLike, *, trust: bool = False, notify: Callable[[str], None] | None = None) -> Bundle:
    """Read a bundle: manifest, version and kind checks, payload hashes, payload.

    A payload that is a pickle (``model.joblib``: format 1 bundles, or a
    model saved as :class:`Pickled`) can run any code when loaded; it is
    loaded only with ``trust=True`` (the CLI's ``--trust-bundle``), after a
    one-line warning to ``notify`` (default: stderr). Other payloads are
    data and load either way.

    Raises :class:`BundleError` with one line saying what is wrong: not a
    bundle, a format or kind this featx does not read, missing or changed
    payload files, a pickle without ``trust``, a model description naming
    classes or values a bundle may not hold.
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    kind = get_kind_for(path, manifest.get("kind"))
    names, pickled = _payload_files(kind, manifest)
    for name in names:
        p = path / name
        if not p.is_file():
            raise BundleError(f"{path}: incomplete bundle, {name} is missing")
        want = (manifest.get("files") or {}).get(name, {}).get("sha256")
        if want and file_sha256(p) != want:
            raise BundleError(f"{p}: does not match the sha256 in {MANIFEST} (changed or damaged); "
                              "restore the bundle or train again")
    if pickled:
        why = "a format 1 bundle" if manifest["featx_bundle"] == 1 else "saved as a pickle"
        if not trust:
            raise BundleError(f"{path}: its model is a pickle ({names[0]}, {why}), which can run any code when "
                              "loaded; if you trust where this bundle came from, load it with --trust-bundle "
                              "(trust=True), and make it safe with featx.bundle.upgrade_bundle")
        (notify or _stderr)(f"warning: {path.name}: loading {names[0]}, a pickle that can run any code "
                            "(--trust-bundle was given)")
        payload = kind.load_pickle(path, manifest)
    else:
        payload = kind.load(path, manifest)
    warnings = []
    made_with = (manifest.get("versions") or {}).get("scikit-learn")
    here = _bundle_versions()["scikit-learn"]
    if made_with and made_with != here:
        warnings.append(f"{path.name} was made with scikit-learn {made_with}, this is {here}: "
                        "predictions may differ slightly")
    return Bundle(path, manifest, payload, warnings)


def get_kind_for(path: Path, name) -> BundleKind:
    try:
        return get_kind(name)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None


# --------------------------------------------------------------------------
# weights


def _short(sha: str | None) -> str:
    return sha[:16] if sha else "unknown"


def _describe(identity: str, sha: str | None) -> str:
    if identity.startswith("file:"):
        return f"weights file with sha256 {_short(sha or identity[5:])}"
    return f"{identity} (sha256 {_short(sha)})" if sha else identity


def weights_sha256(rw) -> str | None:
    """sha256 of the weights file behind a ResolvedWeights (None when there is no file)."""
    if rw.meta.get("sha256"):
        return rw.meta["sha256"]
    if rw.path is not None and Path(rw.path).is_file():
        return sha256_of(rw.path)
    return None


def _weights_request(backbone: dict) -> str:
    """What to ask resolve_weights for to get the bundle's weights back."""
    kind = backbone["weights_kind"]
    if kind == "file":
        saved = backbone.get("weights_path")
        return saved if saved and Path(saved).is_file() else backbone["weights_spec"]
    if kind == "none":
        return "none"
    return backbone["weights_name"]


def check_weights(bundle: Bundle, weights: str | None = None, backbone: dict | None = None):
    """The weights to run the bundle's backbone with, checked against the bundle.

    ``weights``: where to find them now (a ``--weights`` value, e.g. the
    file at its new place); default: what the bundle recorded.
    ``backbone``: the record of one part of a fused bundle (default: the
    bundle's first backbone). Returns the
    :class:`~featx.backbones.ResolvedWeights`; raises
    :class:`~featx.errors.WeightsError` naming both identities and hashes
    when the weights here are not the ones the bundle was made with.
    """
    from .backbones import get_backbone, resolve_weights
    b = backbone or bundle.backbone
    info = get_backbone(b["name"])
    want = _describe(b["weights_identity"], b.get("weights_sha256"))
    request = weights or _weights_request(b)
    try:
        rw = resolve_weights(info, request, seed=int(b.get("seed", 0)))
    except WeightsError as e:
        raise WeightsError(f"{bundle.path}: made with {b['name']} {want}, not available here: {e}; "
                           "give them with --weights FILE") from None
    if not rw.available:
        raise WeightsError(f"{bundle.path}: made with {b['name']} {want}, which is not on this machine "
                           f"({rw.hint}); give it with --weights FILE")
    sha = weights_sha256(rw)
    same = rw.identity == b["weights_identity"]
    if same and b.get("weights_sha256") and sha and sha != b["weights_sha256"]:
        same = False
    if not same:
        raise WeightsError(f"{bundle.path}: made with {b['name']} {want}, but the weights here are "
                           f"{_describe(rw.identity, sha)}; give the original weights with --weights FILE "
                           "or train again")
    return rw


# --------------------------------------------------------------------------
# probabilities


@dataclass
class Predictions:
    """Class probabilities for a list of samples, in their order.

    ``proba`` has one row per sample and one column per bundle class; rows
    of samples that could not be read are NaN and ``errors`` says why
    (None for the good ones). ``extracted``/``cached``: images whose
    features were computed now / read from the cache.
    """

    proba: np.ndarray
    errors: list[str | None]
    extracted: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def bundle_probabilities(bundle: Bundle, samples: Sequence, **options) -> Predictions:
    """Probabilities of every class for ``samples`` (``featx.data.Sample``).

    Dispatches on the bundle's kind. Options: ``cache`` (feature cache
    folder, default ``"cache"``), ``weights`` (where the bundle's weights
    are now), ``progress``, ``notify``, and extraction settings that do not
    change the numbers (``device``, ``batch_size``, ``workers``, ...), which
    the "linear" kind passes to :func:`featx.extract.extract`.
    """
    return get_kind(bundle.kind).probabilities(bundle, list(samples), **options)


def _linear_probabilities(bundle: Bundle, samples: list, *, cache="cache", weights=None, progress=True,
                          notify=None, **extract_options) -> Predictions:
    from .backbones import get_backbone
    from .cache import FeatureCache
    from .classify import predict_proba
    from .extract import RunOptions, Specs, extract

    parts = bundle.feature_parts
    # --weights says where the first backbone's weights are now: every part made with those same
    # weights looks there; the others where the bundle recorded theirs
    first = parts[0][0]
    same = lambda b: (b["name"], b.get("weights_identity")) == (first["name"], first.get("weights_identity"))  # noqa: E731
    resolved = [check_weights(bundle, weights if same(b) else None, backbone=b) for b, _ in parts]
    for _, spec in parts:   # the bundle's precision cannot change: say which runtime computes it
        runtime = extract_options.get("runtime")
        if runtime == "onnx" and spec.precision not in ("fp32", "int8"):
            raise ConfigError(f"--runtime onnx computes in fp32, and {bundle.path.name} was trained on "
                              f"{spec.precision} features: use --runtime torch (or auto)")
        if runtime == "torch" and spec.precision == "int8":
            raise ConfigError(f"--runtime torch cannot compute int8, and {bundle.path.name} was trained on "
                              "int8 features: use --runtime onnx (or auto)")
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    proba = np.full((len(samples), len(bundle.classes)), np.nan)
    if not samples:
        return Predictions(proba, [])
    reasons: dict[str, str] = {}
    extracted = cached = 0
    seconds = 0.0
    have: set[str] | None = None
    # every part a fusion needs, extracted where missing: the parts of one network (same weights,
    # pooling, precision, storage) in one pass over the images, as compare and train extract them
    passes: dict[tuple, list[int]] = {}
    for i, ((b, spec), rw) in enumerate(zip(parts, resolved)):
        passes.setdefault((b["name"], rw.identity, spec.pool, spec.precision, spec.storage, spec.format), []).append(i)
    run = RunOptions(progress=progress, **extract_options)
    for members in passes.values():
        (b, spec), rw = parts[members[0]], resolved[members[0]]
        # the bundle's specs, as they are: only the weights' place on this machine is resolved
        specs = Specs(get_backbone(b["name"]), rw, [parts[i][1] for i in members], int(b.get("seed", 0)))
        report = extract(samples, specs, run, cache=cache, notify=notify, calibration=_calibration(bundle, spec))
        for i, got in zip(members, report.specs):
            ids = set(cache.ids(got.key))
            have = ids if have is None else have & ids
        reasons.update(dict(report.skipped))
        extracted, cached = max(extracted, report.n_extracted), max(cached, report.n_cached)
        seconds += report.seconds
    errors = [None if s.id in have else reasons.get(str(s.path), "could not be read") for s in samples]
    good = [i for i, e in enumerate(errors) if e is None]
    if good:
        ids = [samples[i].id for i in good]
        blocks = [cache.read(spec.key, ids) for _, spec in parts]
        X = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
        proba[good] = predict_proba(bundle.payload, X, classes=len(bundle.classes))
    return Predictions(proba, errors, extracted, cached, seconds)


def _calibration(bundle: Bundle, spec):
    """An int8 spec's calibration: its id, and the ranges the bundle keeps
    (None for other precisions)."""
    from .quantize import APPLY, CALIBRATION_ID, Calibration, QuantizationError, check_ranges
    if spec.precision != "int8":
        return None
    if not CALIBRATION_ID.fullmatch(spec.calibration):
        raise BundleError(f"{bundle.path}: its int8 calibration id {spec.calibration!r} is not one featx makes; "
                          "train the model again")
    ranges = (bundle.manifest.get("int8") or {}).get(spec.calibration)
    try:
        ranges = None if ranges is None else check_ranges(ranges, bundle.path.name)
    except QuantizationError as e:
        raise BundleError(f"{bundle.path}: {e}; train the model again") from None
    # ranges made for another way of quantizing (a later featx's, say) would give other features;
    # bundles made before this was recorded quantized as featx does now
    if ranges is not None and ranges.get("featx_apply", APPLY) != APPLY:
        raise BundleError(f"{bundle.path}: its int8 ranges were made for another int8 quantization "
                          f"({ranges['featx_apply']}); predict with the featx that trained it, or train again")
    return Calibration(spec.calibration, [], ranges)


@dataclass(frozen=True)
class Pickled:
    """A model to store as a pickle (``model.joblib``) because it cannot be
    stored as data (see :mod:`featx.safemodel`): ``save_bundle(path,
    manifest, Pickled(model))``. Such a bundle loads only when trusted."""

    model: Any


def _save_linear(payload, folder: Path) -> None:
    """The Pipeline as model.json + model.safetensors; a :class:`Pickled` one as model.joblib."""
    from . import safemodel
    if isinstance(payload, Pickled):
        return _save_joblib(payload.model, folder)
    try:
        safemodel.save(payload, folder)
    except safemodel.Unsupported as e:
        raise BundleError(f"the model cannot be stored without pickle ({e}); save it as featx.bundle.Pickled(model) "
                          "to write model.joblib, which loads only with --trust-bundle") from None


def _load_linear(folder: Path, manifest: dict):
    """Rebuild the Pipeline from model.json + model.safetensors: data only, whitelisted classes."""
    from . import safemodel
    try:
        return safemodel.load(folder)
    except safemodel.Unsupported as e:
        raise BundleError(f"{folder / safemodel.JSON_FILE}: not a model this featx builds ({e}); "
                          "train the model again") from None
    except Exception as e:  # noqa: BLE001 - unreadable JSON or safetensors, inconsistent arrays: a bad bundle
        first = (str(e).splitlines() or [""])[0][:160]
        raise BundleError(f"{folder}: model.json/model.safetensors cannot be loaded ({type(e).__name__}: {first}); "
                          "restore the bundle or train again") from None


def _save_joblib(payload, folder: Path) -> None:
    import joblib
    joblib.dump(payload, folder / "model.joblib", compress=3)


def _load_joblib(folder: Path, manifest: dict):
    import warnings

    import joblib
    try:
        with warnings.catch_warnings():
            # a version difference is reported once, by load_bundle
            warnings.filterwarnings("ignore", message=".*Trying to unpickle estimator.*")
            return joblib.load(folder / "model.joblib")
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is a bad bundle
        raise BundleError(f"{folder / 'model.joblib'}: cannot be loaded ({type(e).__name__}: {str(e)[:160]})") from None


LINEAR = BundleKind("linear", ("model.json", "model.safetensors"), _save_linear, _load_linear, _linear_probabilities,
                    pickle_files=("model.joblib",), load_pickle=_load_joblib)


def upgrade_bundle(path: str | os.PathLike, out: str | os.PathLike | None = None, *, trust: bool = False,
                   notify: Callable[[str], None] | None = None) -> Path:
    """Rewrite a bundle whose model is a pickle (format 1) without pickle; returns where it is.

    The pickle is loaded first, so this needs ``trust=True`` as
    :func:`load_bundle` does. ``out``: where to write (default: replace
    ``path``). The manifest keeps everything it said and records the
    upgrade under ``"upgraded"``. A bundle that carries no pickle is left as
    it is (and ``path`` returned; with ``out``, :class:`BundleError`).
    """
    path = Path(path).expanduser()
    bundle = load_bundle(path, trust=trust, notify=notify)
    _, pickled = _payload_files(get_kind(bundle.kind), bundle.manifest)
    if not pickled:
        if out is not None:
            raise BundleError(f"{path}: carries no pickle, nothing to upgrade (copy the folder to {out} instead)")
        return path
    old = bundle.manifest
    manifest = {k: v for k, v in old.items() if k not in ("featx_bundle", "files", "versions")}
    manifest["upgraded"] = {"from_format": old["featx_bundle"], "from_files": old.get("files"),
                            "versions": old.get("versions"), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return save_bundle(out if out is not None else path, manifest, bundle.payload)


def dataset_record(dataset) -> dict:
    """What a manifest says about the training data: name, id, where, layout, split, counts."""
    return {"dataset": dataset.name, "dataset_id": dataset.id, "root": str(dataset.root),
            "layout": dataset.layout, "split_made": dataset.split_made,
            "counts": {s: dataset.counts(s) for s in dataset.splits}}


def _backbone_record(spec, weights_spec, resolved, seed) -> dict:
    return {
        "name": spec.backbone,
        "weights_spec": str(weights_spec),
        "weights_kind": resolved.kind,
        "weights_name": resolved.name,
        "weights_identity": resolved.identity,
        "weights_sha256": weights_sha256(resolved),
        "weights_path": str(resolved.path) if resolved.kind == "file" and resolved.path else None,
        "seed": int(seed),
        "layer": spec.layer,
        "pool": spec.pool,
        "precision": spec.precision,
        "storage": spec.storage,
        "preprocess": spec.preprocess,
    }


def linear_manifest(*, classes: Sequence[str], spec, weights_spec: str, resolved, seed: int, dims: int,
                    fit, pca, dataset=None, test_metrics: dict | None = None, parts=None,
                    int8: dict | None = None) -> dict:
    """The manifest of a "linear" bundle (see :func:`save_bundle` for what is added).

    ``spec``: the FeatureSpec (or :class:`featx.train.FeatureSet`) the
    classifier was trained on; ``resolved``: its ResolvedWeights; ``fit``:
    the :class:`~featx.classify.FitResult`; ``dataset``: the training
    :class:`~featx.data.Dataset`. A fusion lists every part in ``parts``,
    ``(FeatureSpec, ResolvedWeights, weights value)`` each, and the
    manifest records them all under ``"parts"`` (columns in that order);
    ``"backbone"`` and ``"features"`` then describe the first part.
    ``int8``: the calibration ranges of int8 features, by calibration id
    (:func:`featx.quantize.bundle_ranges`), kept under ``"int8"``.
    """
    from .classify import get_classifier_spec
    fused = parts is not None and len(parts) > 1
    if hasattr(spec, "parts"):                      # a FeatureSet
        spec = spec.parts[0]
    training = None
    if dataset is not None:
        training = dataset_record(dataset)
        if test_metrics is not None:
            training["test_accuracy"] = test_metrics["accuracy"]
            training["test_macro_f1"] = test_metrics["macro"]["f1"]
    manifest = {
        "kind": "linear",
        "classes": [str(c) for c in classes],
        "backbone": _backbone_record(spec, weights_spec, resolved, seed),
        "features": {"spec": spec.canonical(), "key": spec.key, "dims": int(dims)},
        "classifier": {
            "name": fit.name,
            "param_name": fit.param_name,
            "chosen": fit.chosen,
            "score_source": fit.score_source,
            "score": fit.score,
            "search": [[v, s] for v, s in fit.search],
            "pca": pca,
            "probability": get_classifier_spec(fit.name).probability,
            "notes": list(fit.notes),
            "fit_on": list(getattr(fit, "fit_on", ("train",))),
        },
        "training": training,
    }
    if fused:
        manifest["parts"] = [{"backbone": _backbone_record(p, w, rw, seed),
                              "features": {"spec": p.canonical(), "key": p.key}} for p, rw, w in parts]
        cross = len({q.backbone for q, _, _ in parts}) > 1
        manifest["features"]["fused"] = "+".join(f"{p.backbone}:{p.layer}" if cross else p.layer
                                                 for p, _, _ in parts)
    if int8:
        manifest["int8"] = int8
    return manifest
