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

from .backbones import get_backbone, list_backbones, load_backbone, resolve_weights  # noqa: E402
from .cache import FeatureCache, FeatureSpec  # noqa: E402
from .data import Dataset, Sample, load_image, open_dataset  # noqa: E402
from .errors import FeatxError  # noqa: E402
from .extract import extract, feature_specs, layer_table, load_features  # noqa: E402

__all__ = [
    "__version__", "open_dataset", "Dataset", "Sample", "load_image", "list_backbones", "get_backbone",
    "resolve_weights", "load_backbone", "FeatureCache", "FeatureSpec", "extract", "feature_specs",
    "load_features", "layer_table", "FeatxError",
]
