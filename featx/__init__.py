"""featx: transfer learning on images with frozen CNN features, cached in HDF5.

The library behind the ``featx`` command::

    import featx
    ds = featx.open_dataset("photos/")
    report = featx.extract(ds, "mobilenet_v2", cache="cache")
    X, y, ids = featx.load_features("cache", report.specs[0], ds, split="train")
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting starve featx's own decode workers
# (and everything else) on small machines: measured on 2 cores, end-to-end
# extraction went from 0.78x to 0.85x of the forward-only ceiling. Takes
# effect only when featx is imported before torch; a user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Names are imported on first use (PEP 562), so ``import featx`` and the
# ``featx`` command start without loading torch, h5py or scikit-learn.
_LAZY = {
    "get_backbone": "backbones", "list_backbones": "backbones", "load_backbone": "backbones",
    "resolve_weights": "backbones", "FeatureCache": "cache", "FeatureSpec": "cache", "Dataset": "data",
    "Sample": "data", "load_image": "data", "open_dataset": "data", "FeatxError": "errors",
    "extract": "extract", "feature_specs": "extract", "layer_table": "extract", "load_features": "extract",
    "train": "api", "compare": "api", "evaluate": "api", "predict": "api", "load_bundle": "api", "audit": "api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(type(_os)):
    """``featx.extract``, ``featx.train`` and ``featx.evaluate`` are functions of
    the API, like submodules of the same name: importing such a submodule
    must not replace the function (the module stays in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, type(_os)):
            return
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
