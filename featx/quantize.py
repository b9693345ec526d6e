"""int8 inference on the CPU: ONNX Runtime static quantization, calibrated on
the dataset's own images, and the on-disk store of exported networks.

How ``--precision int8`` works
------------------------------
1. **Calibration sample.** :data:`CALIBRATION_IMAGES` images of the dataset's
   train split (all its images when it has no train split), chosen by the
   seed alone: images are ordered by ``blake2b(f"{seed}:{content id}")`` and
   the first ones are taken, so the sample depends on the images' content
   and the seed, never on file names or listing order. Its identity
   (:func:`calibration_id`: the sample's content ids, its size and the
   quantization settings) goes into every int8 cache key, so int8 entries
   never mix with fp32 ones, nor with another calibration's.
2. **Quantization.** The network featx extracts with (BN folded, exported to
   ONNX) is quantized by ONNX Runtime's ``quantize_static``: QDQ format,
   uint8 activations whose ranges are the 99.99th percentiles of the
   sample's values (:data:`PERCENTILE`), int8 weights per output channel
   (what ONNX Runtime recommends for x86 CPUs with VNNI). Convolutions,
   matmuls and what fuses into them run in int8; normalisation, pooling and
   flattening stay fp32 (:data:`OP_TYPES`, :func:`_kept_fp32`).
   The percentile was chosen without labels: by the relative error of int8
   features against fp32 ones on 256 train images outside the calibration
   sample (MobileNetV2, clothing-small: 0.126 at 99.99, 0.133 at version 1's
   99.999, 0.144 at 99.95, 0.161 for min/max), among settings whose int8
   forward pass keeps at least 90% of version 1's speed on every network
   measured. A float stem (first convolution) cut the error to 0.118 but
   cost 9% of MobileNetV2's int8 speed and 27% of ResNet-50's, so the stem
   is int8. featx measures the ranges itself
   (:func:`measure_ranges`, exact percentiles of ``|x|``) in about 6 s for
   MobileNetV2 on 128 images, where ONNX Runtime's calibrator took 33 s and
   held every activation of every image in memory; once per network and
   calibration.
3. **The store.** ``<cache>/onnx/`` keeps the calibration ranges (JSON,
   plain numbers) and the quantized model: they are made from the dataset's
   images. The fp32 export is made from the weights alone (keyed by the
   network: backbone, weights identity, layers, pooling, preprocessing,
   feature format, torch, ONNX opset and featx), so it is kept where the weights
   are, once per user: :func:`shared_store_dir` (``$FEATX_HOME/onnx``,
   default ``~/.cache/featx/onnx``); every cache folder then starts without
   exporting. A second run loads them from disk and neither exports,
   calibrates nor quantizes again.

A quantization that fails, or whose features stray too far from fp32's
(relative error above :data:`MAX_RELATIVE_ERROR` on calibration images), is
raised as :class:`QuantizationError`; :func:`featx.extract.extract` then
extracts in fp32 instead, into fp32 entries, with a one-line notice. The
failure is recorded in the store (:meth:`ModelStore.add_failure`: network,
calibration and ONNX Runtime version), so later runs fall back at once with
the same notice, naming the ``.failed`` file to delete to try again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BackboneError
from .files import atomic_write_bytes, atomic_write_text
from .text import error_text

__all__ = ["CALIBRATION_IMAGES", "Calibration", "ModelStore", "QuantizationError", "bundle_ranges",
           "calibration_for", "calibration_id", "calibration_sample", "is_transient", "measure_ranges",
           "shared_store_dir"]

CALIBRATION_IMAGES = 128      # images whose activations set the int8 ranges
QUANT_VERSION = 2             # bump when the settings below change: new keys, new models
PERCENTILE = 99.99            # activation ranges: this percentile of the calibration images' values
# int8 features of the calibration images against fp32 ones, ||int8 - fp32|| / ||fp32||;
# measured 0.12-0.13 for MobileNetV2 and EfficientNet-Lite0 (real weights) on clothing-small:
# above this, quantization broke the network
MAX_RELATIVE_ERROR = 0.5
# what runs in int8: the convolutions and matmuls, and what ONNX Runtime fuses
# into them (activations, residual adds, max pooling); pooling to features,
# flattening and normalisation stay fp32, so features never pass an 8-bit output
OP_TYPES = ("Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool", "Concat")
# how ranges become an int8 model: what a bundle's ranges were made for (checked when it predicts)
APPLY = {"format": "QDQ", "activations": "uint8", "weights": "int8 per channel", "ops": list(OP_TYPES),
         "fp32": "outside the backbone"}
# what a calibration is (part of its id): how it is applied, and how ranges are measured
SETTINGS = {**{k: APPLY[k] for k in ("format", "activations", "weights")},
            "calibration": f"percentile {PERCENTILE} of |x|", "version": QUANT_VERSION}
EXPORT_VERSION = 1            # how featx exports a network to ONNX (opset, input names)
OPSET = 17


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
CALIBRATION_ID = re.compile(r"[0-9a-f]{16}")   # what calibration_id() makes
MAX_RANGES_BYTES = 4 << 20                     # a bundle's ranges: ~25 KB for ResNet-50


class QuantizationError(BackboneError):
    """The int8 model could not be made (or made badly): extraction falls back to fp32."""


# --------------------------------------------------------------------------
# the calibration sample


def _order_key(seed: int, sample_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()


def calibration_sample(samples, seed: int = 0, n: int = CALIBRATION_IMAGES) -> list:
    """The ``n`` images int8 ranges are measured on: train-split images (all
    of them when none is marked train), each content once, chosen by ``seed``."""
    train = [s for s in samples if getattr(s, "split", None) == "train"] or list(samples)
    unique = {s.id: s for s in train}
    return [unique[i] for i in sorted(unique, key=lambda i: _order_key(seed, i))[:n]]


def calibration_id(ids) -> str:
    """Identity of a calibration: its images' content ids and the settings."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    for i in sorted(ids):
        h.update(i.encode() + b"\n")
    return h.hexdigest()


@dataclass
class Calibration:
    """What an int8 extraction is calibrated on: ``id`` (in the cache keys),
    the images to measure ranges on (``samples``) and, when they are known
    already (a bundle carries them), the ``ranges`` themselves."""

    id: str
    samples: list = field(default_factory=list)
    ranges: dict | None = None
    network: str = ""    # backbone and weights identity: what the store's calibration record is filed under


def calibration_for(samples, seed: int = 0, store: "ModelStore | None" = None, network: str = "") -> Calibration:
    """The calibration of an extraction over ``samples`` (a dataset's, all
    splits): the seeded sample of its train images; but when ``store`` holds
    a calibration of ``network`` (backbone and weights identity) whose images
    are all among them, that one, so a dataset that grows keeps its int8
    entries (a new sample would mean a new key, every row again).

    Nothing is written here (plans and dry runs call it): the calibration is
    recorded in the store when its int8 model is made or used
    (:meth:`ModelStore.add_calibration`, from :class:`featx.extract.OnnxForward`)."""
    by_id = {s.id: s for s in samples if getattr(s, "split", None) == "train"} or {s.id: s for s in samples}
    for cal_id, ids in (store.calibrations(network) if store is not None else []):
        if all(i in by_id for i in ids):
            return Calibration(cal_id, [by_id[i] for i in ids], network=network)
    chosen = calibration_sample(samples, seed)
    return Calibration(calibration_id(s.id for s in chosen), chosen, network=network)


# --------------------------------------------------------------------------
# the store of exported and quantized networks


def network_id(lb, layers, pool: str, feature_format: int) -> str:
    """Identity of the network featx exports: what determines the ONNX file."""
    import torch

    from . import __version__
    what = {"backbone": lb.info.name, "weights": lb.weights.identity, "layers": list(layers), "pool": pool,
            "preprocess": lb.preprocess.as_dict(), "format": feature_format, "torch": torch.__version__,
            "opset": OPSET, "export": EXPORT_VERSION, "featx": __version__}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"{lb.info.name}-{digest}"


HOME_ENV = "FEATX_HOME"


def shared_store_dir() -> Path | None:
    """Where exported fp32 networks are kept for every cache folder of this
    user: ``$FEATX_HOME/onnx``, else ``$XDG_CACHE_HOME/featx/onnx``, else
    ``~/.cache/featx/onnx`` (as torch keeps its weights in ``~/.cache/torch``).
    ``FEATX_HOME=""`` turns it off: each cache folder keeps its own."""
    home = os.environ.get(HOME_ENV)
    try:
        if home is None:
            base = os.environ.get("XDG_CACHE_HOME")   # a relative one is to be ignored (XDG's rule)
            home = str(Path(base) / "featx") if base and Path(base).is_absolute() else "~/.cache/featx"
        return Path(home).expanduser().absolute() / "onnx" if home else None
    except (RuntimeError, KeyError, OSError):   # no home directory to find
        return None


_SHARED = object()


class ModelStore:
    """``<cache>/onnx/``: calibration ranges and int8 models (made from the
    dataset's images); and the exported fp32 networks (made from the weights
    alone), kept in ``shared`` (:func:`shared_store_dir`) so that every cache
    folder reuses them, or in ``<cache>/onnx/`` when there is no shared
    folder or it cannot be written. Files are written atomically (a reader
    never sees half a file; two writers of the same file write the same
    bytes), each with its sha256 beside it."""

    def __init__(self, root, shared=_SHARED):
        self.root = Path(root) / "onnx"
        self.shared = shared_store_dir() if shared is _SHARED else (Path(shared) if shared is not None else None)

    @classmethod
    def exports_only(cls) -> "ModelStore | None":
        """The per-user folder alone, where there is no cache folder at hand
        (a Dask worker: exports only, as int8 does not run there), or None
        when there is no such folder."""
        shared = shared_store_dir()
        return cls(shared.parent, shared=None) if shared is not None else None

    def path(self, net_id: str, suffix: str) -> Path:
        """The file of ``net_id`` + ``suffix``; names that are not plain file
        names (a bundle's calibration id with ``/`` or ``..``) are refused."""
        name = f"{net_id}{suffix}"
        if not _SAFE_NAME.fullmatch(name) or ".." in name:
            raise QuantizationError(f"{name!r} is not a model store file name")
        return self.root / name

    def get(self, net_id: str, suffix: str) -> bytes | None:
        """The file's bytes, or None when it is missing or does not match the
        sha256 written beside it (damaged: it is made again)."""
        return self._read(self.path(net_id, suffix))

    def export_paths(self, net_id: str) -> list[Path]:
        """Where the fp32 export of ``net_id`` may be, in the order read: this
        cache's own (a cache written before the shared folder, or copied with
        its exports), then the shared folder."""
        own = self.path(net_id, ".onnx")
        return [own] + ([self.shared / own.name] if self.shared is not None else [])

    def get_export(self, net_id: str) -> bytes | None:
        """The fp32 export's bytes, or None when neither place has it intact."""
        return next((data for p in self.export_paths(net_id) if (data := self._read(p)) is not None), None)

    def has_export(self, net_id: str) -> bool:
        def there(path: Path) -> bool:
            try:
                return path.is_file()
            except OSError:   # a folder this user cannot search: as good as missing
                return False
        return any(there(p) for p in self.export_paths(net_id))

    def put_export(self, net_id: str, data: bytes) -> bool:
        """Keep the fp32 export: in the shared folder, else (none, or it cannot
        be written) in this cache's own."""
        own = self.path(net_id, ".onnx")
        return (self.shared is not None and self._write(self.shared / own.name, data)) or self._write(own, data)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            data, want = path.read_bytes(), path.with_name(path.name + ".sha256").read_text().strip()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == want else None

    def calibrations(self, network: str) -> list[tuple[str, list[str]]]:
        """``(id, content ids)`` of the calibrations made for ``network``, oldest first."""
        out = []
        for path in sorted((self.root / "calibrations").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            cal_id = path.name.split(".")[0]   # <id>.<network digest>.json (records before: <id>.json)
            if isinstance(rec, dict) and rec.get("network") == network and rec.get("settings") == SETTINGS \
                    and isinstance(rec.get("ids"), list) and calibration_id(rec["ids"]) == cal_id:
                out.append((cal_id, rec["ids"]))
        return out

    def add_calibration(self, network: str, cal: Calibration) -> None:
        """Record ``cal`` (measured on images: a bundle's ranges are not) as a
        calibration of ``network``, once: a record already there keeps its age
        (:meth:`calibrations` prefers the oldest). Its file is named by the
        calibration and the network, so two backbones calibrated on the same
        images keep a record each."""
        digest = hashlib.blake2b(network.encode(), digest_size=8).hexdigest()
        path = self.root / "calibrations" / f"{cal.id}.{digest}.json"
        if not network or not cal.samples or cal.ranges is not None or any(c == cal.id for c, _ in
                                                                            self.calibrations(network)):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(
                {"network": network, "settings": SETTINGS, "ids": sorted(s.id for s in cal.samples)}) + "\n")
        except OSError:
            pass

    def failure_path(self, net_id: str, cal_id: str, ort_version: str) -> Path:
        """Where a failed quantization of ``net_id`` with calibration ``cal_id``
        under ONNX Runtime ``ort_version`` is recorded."""
        return self.path(net_id, f".{cal_id}.ort-{re.sub(r'[^A-Za-z0-9.]', '_', ort_version)}.failed")

    def failure(self, net_id: str, cal_id: str, ort_version: str) -> str | None:
        """The one-line reason a quantization failed before, or None."""
        try:
            rec = json.loads(self.failure_path(net_id, cal_id, ort_version).read_text())
        except (OSError, ValueError):
            return None
        reason = rec.get("reason") if isinstance(rec, dict) else None
        return " ".join(reason.split()) if isinstance(reason, str) and reason.strip() else None

    def add_failure(self, net_id: str, cal_id: str, ort_version: str, reason: str) -> Path | None:
        """Record that quantizing failed (``reason``, one line), so later runs
        fall back to fp32 at once; None when the store cannot be written."""
        path = self.failure_path(net_id, cal_id, ort_version)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"network": net_id, "calibration": cal_id, "onnxruntime": ort_version,
                                                "reason": " ".join(reason.split())}) + "\n")
        except OSError:
            return None
        return path

    def put(self, net_id: str, suffix: str, data: bytes) -> bool:
        """Keep ``data``; False when the store cannot be written (read-only
        cache, full disk): that only costs the next run the work again."""
        return self._write(self.path(net_id, suffix), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            atomic_write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest() + "\n")
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------
# export and quantization


def export_onnx(net, crop: int, n_outputs: int, name: str) -> bytes:
    """``net`` (uint8 NCHW in, pooled features out) as ONNX bytes, batch size free."""
    import inspect

    import torch
    example = torch.zeros((2, 3, crop, crop), dtype=torch.uint8)
    buf = io.BytesIO()
    # torch >= 2.5 defaults to (or offers) the dynamo exporter: 7x slower to export here, same model
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), buf, input_names=["images"],
                              output_names=[f"out{i}" for i in range(n_outputs)],
                              dynamic_axes={"images": {0: "n"}}, opset_version=OPSET, **legacy)
    except Exception as e:  # noqa: BLE001 - any export failure is reported the same way
        raise BackboneError(f"{name}: ONNX export failed ({error_text(e)}); use --runtime torch") from e
    return buf.getvalue()


class _TopK:
    """The ``k`` largest of the values seen so far, batch by batch: a value
    below the ``k``-th largest already seen can never be among them, so each
    batch costs a comparison, not a sort."""

    def __init__(self, k: int):
        self.k, self.kept, self.floor = k, np.zeros(0, np.float32), -np.inf

    def add(self, values: np.ndarray) -> None:
        values = values[values >= self.floor] if np.isfinite(self.floor) else values
        kept = np.concatenate([self.kept, values])
        if kept.size > self.k:
            kept = np.partition(kept, kept.size - self.k)[kept.size - self.k:]
        self.kept = kept
        if kept.size >= self.k:
            self.floor = float(kept.min())


MEASURE_BYTES = 1 << 30   # measure_ranges: at most about this much activation memory per pass


def measure_ranges(model_path: str, images: np.ndarray, threads: int | None = None) -> dict:
    """Activation ranges of the model at ``model_path`` over ``images``, in
    ONNX Runtime's calibration-cache format, for ``quantize_static``.

    For every float tensor into or out of an :data:`OP_TYPES` node (what
    ONNX Runtime's own calibrator measures), the range is
    ``(max(min x, -t), min(max x, t))``, or ``(min x, min(max x, t))`` when
    ``x`` is never negative, where ``t`` is the exact :data:`PERCENTILE`
    of ``|x|`` over all the images (values that are not finite left out).
    This is what ONNX Runtime's percentile calibrator estimates from
    2048-bin histograms: its ranges agree with these within 0.2% on
    MobileNetV2. This version runs the optimised graph on a few images at a
    time (as many as keep every activation under :data:`MEASURE_BYTES`, at
    most 8) and keeps only each tensor's largest values; ONNX Runtime keeps
    every intermediate output of every image in memory, runs the graph
    unoptimised and histograms it all, which is about 6x slower."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    if not len(images):
        raise QuantizationError("no calibration image to measure int8 ranges on")
    model = onnx.load(model_path)
    graph = model.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    weights = {i.name for i in graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    names = list(dict.fromkeys(t for n in graph.node if n.op_type in OP_TYPES for t in [*n.input, *n.output]
                               if t in infos and t not in weights
                               and infos[t].type.tensor_type.elem_type in floats))
    outputs = {o.name for o in graph.output}
    graph.output.extend(infos[t] for t in names if t not in outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # decode workers share the cores
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    low, high, top = {t: np.inf for t in names}, {t: -np.inf for t in names}, {}
    at, batch = 0, 1   # the first image alone: its activations' size sets the batch
    while at < len(images):
        x = images[at:at + batch]
        outs = session.run(names, {"images": x})
        for t, v in zip(names, outs):
            v = np.asarray(v, dtype=np.float32).reshape(-1)
            if t not in top:   # keep as many values as lie above the percentile over all images
                total = v.size // len(x) * len(images)
                top[t] = _TopK(max(1, total - math.ceil(PERCENTILE / 100 * total) + 1))
            lo, hi = v.min(initial=np.inf), v.max(initial=-np.inf)
            if not (np.isfinite(lo) and np.isfinite(hi)):   # NaN or inf: measured on the finite values
                v = v[np.isfinite(v)]
                lo, hi = v.min(initial=np.inf), v.max(initial=-np.inf)
            low[t], high[t] = min(low[t], float(lo)), max(high[t], float(hi))
            top[t].add(np.abs(v))
        if at == 0:
            per_image = sum(o.nbytes for o in outs) / len(x)
            batch = int(max(1, min(8, MEASURE_BYTES // max(per_image, 1))))
        at += len(x)
    data = {}
    for t in names:
        if not top[t].kept.size:
            raise QuantizationError(f"tensor {t} has no finite value on the calibration images")
        cut = float(top[t].kept.min())
        data[t] = {"lowest": low[t] if low[t] >= 0 else max(-cut, low[t]), "highest": min(cut, high[t]),
                   "CLS": "TensorData"}
    return {"CLS": "TensorsData", "data": data,
            "calibration_method": {"CLS": "CalibrationMethod", "value": "CalibrationMethod.Percentile"}}


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is one the next run may not
    meet: no memory, no disk, a tool that does not load. Such a failed
    quantization is not recorded as permanent."""
    words = ("out of memory", "bad_alloc", "failed to allocate", "no space left", "disk quota")
    seen: BaseException | None = error
    for _ in range(20):   # a chain of causes, not a cycle
        if seen is None:
            return False
        if isinstance(seen, (ImportError, OSError, MemoryError)) or any(w in str(seen).lower() for w in words):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _quantize_args():
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    # the ranges are featx's (measure_ranges), in the file quantize_static reads: the method must match
    return dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile)


def quantize(fp32: bytes, images: np.ndarray | None, ranges: dict | None, name: str,
             threads: int | None = None) -> tuple[bytes, dict]:
    """The int8 (QDQ) model of ``fp32`` and the ranges it was made with:
    measured on ``images`` (uint8 NCHW), or ``ranges`` given (a bundle's)."""
    import inspect
    try:
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except (ImportError, OSError) as e:
        raise QuantizationError(f"{name}: ONNX Runtime's quantization tools do not load ({e})") from e
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:   # ranges in, ranges out
        raise QuantizationError(f"{name}: this ONNX Runtime is too old for featx's int8 (it cannot save or reuse "
                                "calibration ranges); pip install -U onnxruntime")
    import logging
    log = logging.getLogger()
    level = log.level
    try:   # a full temporary disk, too, is a failed quantization (fp32 takes over), not a traceback
        with tempfile.TemporaryDirectory(prefix="featx-int8-") as d:
            src, pre, out, cal = (os.path.join(d, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx", "ranges.json"))
            Path(src).write_bytes(fp32)
            log.setLevel(logging.ERROR)   # ONNX Runtime's advice is logged at WARNING on the root logger
            # its tools print their progress: stdout stays featx's (CSV, JSON)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quant_pre_process(src, pre, skip_symbolic_shape=True)
                Path(cal).write_text(json.dumps(ranges if ranges is not None
                                                else measure_ranges(pre, images, threads)))
                quantize_static(pre, out, None, **_quantize_args(),
                                op_types_to_quantize=list(OP_TYPES), nodes_to_exclude=_kept_fp32(pre),
                                calibration_cache_path=cal)
            return Path(out).read_bytes(), json.loads(Path(cal).read_text())
    except Exception as e:  # noqa: BLE001 - any failure of the quantizer falls back the same way
        raise QuantizationError(f"{name}: int8 quantization failed ({error_text(e)})") from e
    finally:
        log.setLevel(level)


def _kept_fp32(path: str) -> list[str]:
    """Nodes that stay fp32: those outside the backbone (``/body/``), the
    input's normalisation and featx's own pooling."""
    import onnx
    return [n.name for n in onnx.load(path, load_external_data=False).graph.node if not n.name.startswith("/body/")]


_MEASURED: dict[tuple[str, str], dict] = {}   # (calibration id, network id) -> ranges measured in this process


def remember_ranges(cal_id: str, net_id: str, ranges: dict) -> None:
    """Keep ranges just measured for :func:`bundle_ranges`, for when the store
    could not be written (a read-only ``cache/onnx``): a bundle trained in
    this process still carries them."""
    _MEASURED[cal_id, net_id] = ranges


def bundle_ranges(cache_root, specs) -> dict:
    """``{calibration id: ranges}`` for the int8 ``specs`` (a bundle keeps them,
    so it predicts on machines whose store never saw the calibration images):
    the ranges of every network of that backbone and calibration in the
    store, and those measured in this process, merged (a tensor's range is
    the same in each)."""
    store, out = ModelStore(cache_root), {}
    for spec in specs:
        if spec.precision != "int8" or spec.calibration in out:
            continue
        merged = None
        stored = []
        for path in sorted(store.root.glob(f"{spec.backbone}-*.{spec.calibration}.ranges.json")):
            data = store.get(path.name[: -len(f".{spec.calibration}.ranges.json")], f".{spec.calibration}.ranges.json")
            stored.append(json.loads(data) if data is not None else {})
        for ranges in stored + [r for (c, _), r in _MEASURED.items() if c == spec.calibration]:
            if ranges.get("featx_network") != network_record(spec.backbone, spec.weights, spec.preprocess,
                                                             spec.format):   # another network's (weights, format)
                continue
            merged = ranges if merged is None else {**merged, "data": {**merged["data"], **ranges["data"]}}
        if merged is not None:
            out[spec.calibration] = {k: v for k, v in merged.items() if k != "featx_network"}
    return out


def network_record(backbone: str, weights: str, preprocess: dict, feature_format: int) -> dict:
    """What, besides the layers, decides a network's ranges: stored with them
    (by :class:`featx.extract.OnnxForward`), matched against a spec here."""
    return {"backbone": backbone, "weights": weights, "preprocess": preprocess, "format": feature_format}


def check_ranges(ranges, name: str) -> dict:
    """Calibration ranges read from a file someone else made: a dict of
    tensor names to plain numbers, or :class:`QuantizationError`."""
    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))
    if not isinstance(ranges, dict) or not isinstance(ranges.get("data"), dict) or not plain(ranges) \
            or len(json.dumps(ranges)) > MAX_RANGES_BYTES or not _finite(ranges["data"]):
        raise QuantizationError(f"{name}: the int8 calibration ranges are not plain, finite tensor ranges")
    return ranges


def _finite(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def relative_error(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """``||got - want|| / ||want||`` over every output (inf when not finite)."""
    num = sum(float(np.linalg.norm(g.astype(np.float64) - w)) ** 2 for w, g in zip(want, got))
    den = sum(float(np.linalg.norm(w.astype(np.float64))) ** 2 for w in want) or 1.0
    err = (num / den) ** 0.5
    return err if np.isfinite(err) else float("inf")
