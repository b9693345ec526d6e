"""Fitted scikit-learn models as plain arrays and JSON: saved and loaded without pickle.

:func:`dump` turns a fitted model into ``(structure, arrays)``: ``structure``
is JSON (each estimator's class name, its constructor parameters and its
fitted attributes that are not arrays), ``arrays`` the numeric arrays by
name. :func:`save` writes them as ``model.json`` and ``model.safetensors``;
:func:`load` reads them back and rebuilds a real fitted estimator whose
``predict_proba`` is bit-for-bit the original's.

Nothing in these files is code. Loading builds only the classes of
:data:`ALLOWED` (by name; any other name is refused), calls their
constructors with JSON values and sets JSON values or arrays as their
fitted attributes. What is rebuilt rather than stored (a k-NN search tree,
SGD's loss object) is made by this module from the stored numbers, the way
``fit`` makes it.

A model holding anything else (a class not in :data:`ALLOWED`, a callable
parameter, an object attribute this module does not know) cannot be
dumped: :class:`Unsupported` says which part.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALLOWED", "FORMAT", "Unsupported", "allowed_classes", "dump", "load", "rebuild", "save"]

FORMAT = 1
JSON_FILE = "model.json"
ARRAYS_FILE = "model.safetensors"

# numeric dtypes safetensors stores exactly
_DTYPES = {"float64", "float32", "float16", "int64", "int32", "int16", "int8",
           "uint64", "uint32", "uint16", "uint8", "bool"}
_ATTR = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")


class Unsupported(ValueError):
    """The model holds something that cannot be stored as arrays and JSON."""


def allowed_classes() -> dict[str, type]:
    """Name -> class of everything :func:`load` may build."""
    from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC
    return {c.__name__: c for c in (
        Pipeline, StandardScaler, PCA, LogisticRegression, SGDClassifier, LinearSVC, SVC, KNeighborsClassifier,
        CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration, StratifiedKFold, KFold)}


ALLOWED = ("Pipeline", "StandardScaler", "PCA", "LogisticRegression", "SGDClassifier", "LinearSVC", "SVC",
           "KNeighborsClassifier", "CalibratedClassifierCV", "_CalibratedClassifier", "_SigmoidCalibration",
           "StratifiedKFold", "KFold")

# fitted attributes that are objects made from the others: not stored, rebuilt on load (see _rebuild_derived)
_DERIVED = {"SGDClassifier": {"_loss_function_"}, "KNeighborsClassifier": {"_tree"}}
# classes whose whole state is their constructor arguments (no get_params)
_PLAIN = {"_CalibratedClassifier", "StratifiedKFold", "KFold"}


# --------------------------------------------------------------------------
# dump


class _Dumper:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.classes = allowed_classes()

    def value(self, v, where: str):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)) and type(v) in (int, float):
            return v
        if isinstance(v, np.generic):
            dtype = v.dtype.name
            if dtype not in _DTYPES:
                raise Unsupported(f"{where}: numpy scalar of dtype {dtype}")
            return {"$scalar": dtype, "value": v.item()}
        if isinstance(v, np.ndarray):
            return self.array(v, where)
        if isinstance(v, tuple):
            return {"$tuple": [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.value(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            return {"$dict": [[self.value(k, f"{where} key"), self.value(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if type(v).__name__ in self.classes and type(v) is self.classes[type(v).__name__]:
            return {"$estimator": self.estimator(v, where)}
        raise Unsupported(f"{where}: {type(v).__module__}.{type(v).__qualname__} is not one of the types "
                          f"a bundle can hold without pickle ({', '.join(ALLOWED)})")

    def array(self, a: np.ndarray, where: str):
        if a.dtype.name in _DTYPES:
            key = f"a{len(self.arrays)}"
            order = "F" if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous else "C"
            self.arrays[key] = np.ascontiguousarray(a)
            return {"$array": key, "order": order}
        if a.dtype.kind in "UO" and all(isinstance(x, str) for x in a.flat):
            return {"$strings": a.tolist(), "dtype": a.dtype.str if a.dtype.kind == "U" else "object",
                    "shape": list(a.shape)}
        raise Unsupported(f"{where}: array of dtype {a.dtype}")

    def estimator(self, est, where: str) -> dict:
        name = type(est).__name__
        state = dict(vars(est))
        if name in _PLAIN:
            params, state = state, {}
        else:
            params = est.get_params(deep=False)
            state = {k: v for k, v in state.items() if k not in params}
        for k in _DERIVED.get(name, ()):
            state.pop(k, None)
        return {"class": name,
                "params": {k: self.value(v, f"{where}.{name}({k}=)") for k, v in params.items()},
                "state": {k: self.value(v, f"{where}.{name}.{k}") for k, v in state.items()}}


def dump(model) -> tuple[dict, dict[str, np.ndarray]]:
    """``(structure, arrays)`` of a fitted model; :class:`Unsupported` if it holds other things."""
    d = _Dumper()
    if type(model).__name__ not in d.classes or type(model) is not d.classes[type(model).__name__]:
        raise Unsupported(f"{type(model).__module__}.{type(model).__qualname__} is not one of the types a bundle "
                          f"can hold without pickle ({', '.join(ALLOWED)})")
    structure = {"safemodel": FORMAT, "model": d.estimator(model, "model")}
    return structure, d.arrays


def save(model, folder: Path) -> None:
    """Write ``model.json`` and ``model.safetensors`` into ``folder``."""
    from safetensors.numpy import save_file
    structure, arrays = dump(model)
    import sklearn
    structure["scikit-learn"] = sklearn.__version__
    (Path(folder) / JSON_FILE).write_text(json.dumps(structure, indent=1) + "\n", encoding="utf-8")
    save_file(arrays, str(Path(folder) / ARRAYS_FILE))
    # safetensors creates its file owner-only; it gets what model.json (open()) gets
    os.chmod(Path(folder) / ARRAYS_FILE, (Path(folder) / JSON_FILE).stat().st_mode & 0o777)


# --------------------------------------------------------------------------
# load


class _Builder:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()
        self.classes = allowed_classes()

    def value(self, v, where: str):
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self.value(x, where) for x in v]
        if not isinstance(v, dict) or len(v) == 0:
            raise Unsupported(f"{where}: unexpected value {str(v)[:60]}")
        if "$scalar" in v:
            dtype = v["$scalar"]
            if dtype not in _DTYPES or not isinstance(v.get("value"), (bool, int, float)):
                raise Unsupported(f"{where}: bad scalar")
            return np.dtype(dtype).type(v["value"])
        if "$array" in v:
            key = v["$array"]
            if key not in self.arrays:
                raise Unsupported(f"{where}: array {key!r} is not in {ARRAYS_FILE}")
            self.used.add(key)
            a = np.array(self.arrays[key], copy=True)      # writable, owned
            return np.asfortranarray(a) if v.get("order") == "F" else a
        if "$strings" in v:
            dtype = v.get("dtype")
            if not (dtype == "object" or (isinstance(dtype, str) and re.fullmatch(r"[<>|]U\d+", dtype))):
                raise Unsupported(f"{where}: bad string dtype {dtype!r}")
            strings = v["$strings"]
            flat = np.asarray(strings, dtype=object).ravel()
            if not all(isinstance(x, str) for x in flat):
                raise Unsupported(f"{where}: non-string in a string array")
            out = np.empty(len(flat), dtype=object if dtype == "object" else np.dtype(dtype))
            out[:] = list(flat)
            return out.reshape(tuple(int(n) for n in v.get("shape", [len(flat)])))
        if "$tuple" in v:
            return tuple(self.value(x, where) for x in v["$tuple"])
        if "$dict" in v:
            return {self._key(k, where): self.value(x, where) for k, x in v["$dict"]}
        if "$estimator" in v:
            return self.estimator(v["$estimator"], where)
        raise Unsupported(f"{where}: unexpected value {str(v)[:60]}")

    def _key(self, k, where):
        k = self.value(k, where)
        if not isinstance(k, (str, int, float, bool, np.generic, type(None), tuple)):
            raise Unsupported(f"{where}: unhashable key")
        return k

    def estimator(self, node, where: str):
        if not isinstance(node, dict) or not isinstance(node.get("class"), str):
            raise Unsupported(f"{where}: no estimator class")
        name = node["class"]
        cls = self.classes.get(name)
        if cls is None:
            raise Unsupported(f"{where}: class {name[:60]!r} is not one a bundle may build ({', '.join(ALLOWED)})")
        params, state = node.get("params") or {}, node.get("state") or {}
        if not isinstance(params, dict) or not isinstance(state, dict):
            raise Unsupported(f"{where}.{name}: params and state must be objects")
        for k in list(params) + list(state):
            if not isinstance(k, str) or not _ATTR.match(k) or callable(getattr(cls, k, None)) \
                    or isinstance(getattr(cls, k, None), property):
                raise Unsupported(f"{where}.{name}: attribute {str(k)[:40]!r} is not allowed")
        kwargs = {k: self.value(v, f"{where}.{name}({k}=)") for k, v in params.items()}
        try:
            est = cls(**kwargs)
        except TypeError as e:
            raise Unsupported(f"{where}.{name}: {e}") from None
        if name not in _PLAIN:
            unknown = set(kwargs) - set(est.get_params(deep=False))
            if unknown:
                raise Unsupported(f"{where}.{name}: unknown parameter {sorted(unknown)[0]!r}")
        for k, v in state.items():
            setattr(est, k, self.value(v, f"{where}.{name}.{k}"))
        _rebuild_derived(est, f"{where}.{name}")
        return est


def _rebuild_derived(est, where: str) -> None:
    """What ``fit`` derives from the stored numbers and this module does not store."""
    name = type(est).__name__
    if name == "SGDClassifier" and hasattr(est, "coef_"):
        est._loss_function_ = est._get_loss_function(est.loss)
    elif name == "KNeighborsClassifier" and hasattr(est, "_fit_X"):
        from sklearn.neighbors import BallTree, KDTree
        method = getattr(est, "_fit_method", None)
        metric_params = getattr(est, "effective_metric_params_", None) or {}
        if not isinstance(metric_params, dict) or not all(isinstance(k, str) for k in metric_params):
            raise Unsupported(f"{where}: bad effective_metric_params_")
        if method in ("kd_tree", "ball_tree"):
            tree = KDTree if method == "kd_tree" else BallTree
            est._tree = tree(est._fit_X, est.leaf_size, metric=est.effective_metric_, **metric_params)
        elif method == "brute":
            est._tree = None
        else:
            raise Unsupported(f"{where}: unknown _fit_method {str(method)[:20]!r}")
    elif name == "SVC" and hasattr(est, "support_vectors_"):
        _check_svc(est, where)


def _check_svc(est, where: str) -> None:
    """libsvm reads these arrays by their sizes: they must agree (it does not check)."""
    sv, n_sv, dual, icpt = est.support_vectors_, est._n_support, est._dual_coef_, est._intercept_
    k = len(est.classes_)
    ok = (not est._sparse and isinstance(sv, np.ndarray) and sv.ndim == 2 and sv.dtype == np.float64
          and isinstance(n_sv, np.ndarray) and n_sv.dtype == np.int32 and n_sv.shape == (k,)
          and (n_sv >= 0).all() and int(n_sv.sum()) == sv.shape[0]
          and sv.shape[1] == est.n_features_in_
          and est.support_.dtype == np.int32 and est.support_.shape == (sv.shape[0],)
          and dual.dtype == np.float64 and dual.shape == (k - 1, sv.shape[0])
          and icpt.dtype == np.float64 and icpt.shape == (k * (k - 1) // 2,)
          and est._probA.dtype == np.float64 and est._probB.dtype == np.float64
          and est._probA.shape == est._probB.shape and est._probA.shape in ((0,), icpt.shape))
    if not ok:
        raise Unsupported(f"{where}: support vectors, counts and coefficients do not agree")
    # a precomputed kernel makes libsvm index the caller's matrix by support_: refused, as is any
    # setting libsvm would read without checking
    import numbers
    finite = all(isinstance(getattr(est, a, None), numbers.Real) and np.isfinite(getattr(est, a))
                 for a in ("_gamma", "coef0")) and isinstance(est.degree, numbers.Integral) and 0 <= est.degree <= 32
    support_ok = len(est.support_) == 0 or (int(est.support_.min()) >= 0
                                            and int(est.support_.max()) < int(est.shape_fit_[0]))
    if est.kernel not in ("linear", "poly", "rbf", "sigmoid") or est._impl != "c_svc" or not finite \
            or not support_ok:
        raise Unsupported(f"{where}: an SVC with kernel {est.kernel!r} ({est._impl}), its support indices or its "
                          "kernel parameters are not what a fitted featx rbf-svm holds")


def rebuild(structure: dict, arrays: dict[str, np.ndarray]):
    """The fitted model described by ``structure`` and ``arrays``; :class:`Unsupported` when it is not one."""
    if not isinstance(structure, dict) or structure.get("safemodel") != FORMAT:
        raise Unsupported(f"not a safemodel format {FORMAT} description")
    b = _Builder(arrays)
    return b.estimator(structure.get("model"), "model")


def load(folder: Path):
    """Rebuild the model saved by :func:`save` in ``folder`` (no pickle involved)."""
    from safetensors.numpy import load_file
    structure = json.loads((Path(folder) / JSON_FILE).read_text(encoding="utf-8"))
    arrays = load_file(str(Path(folder) / ARRAYS_FILE))
    return rebuild(structure, arrays)


def equal_models(a: Any, b: Any) -> bool:
    """True when two models dump to the same structure and arrays (a test helper)."""
    sa, aa = dump(a)
    sb, ab = dump(b)
    return sa == sb and aa.keys() == ab.keys() and all(
        aa[k].dtype == ab[k].dtype and np.array_equal(aa[k], ab[k], equal_nan=True) for k in aa)
