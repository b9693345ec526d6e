"""Image preprocessing, one definition for extraction, prediction and fine-tuning.

Decoded PIL images become uint8 (3, crop, crop) tensors in DataLoader
workers (:func:`preprocess_image`: the weights' resize and center crop, or
:func:`train_transform`'s augmentation while fine-tuning); normalisation by
the weights' mean and std happens on the model side (:class:`Normalize`), on
the device, where it is one multiply-add.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones import Preprocess

__all__ = ["Normalize", "preprocess_image", "resize_uint8", "scaled_to_crop", "train_transform"]

_TV_INTERP = ("bilinear", "bicubic")   # resized as uint8 tensors by torchvision
_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# fine-tuning's augmentations: random resized crop scale range and colour jitter (brightness, contrast,
# saturation[, hue]); "none" trains on the eval crop
_AUGMENTS = {"light": ((0.35, 1.0), (0.1, 0.1, 0.1)), "standard": ((0.08, 1.0), (0.4, 0.4, 0.4, 0.1))}


# --------------------------------------------------------------------------
# resize and crop


def preprocess_image(im: Image.Image, pre: Preprocess, pil_resize: bool = False) -> torch.Tensor:
    """Resize the short side to ``pre.resize``, center-crop ``pre.crop``:
    a uint8 (3, crop, crop) tensor; normalisation happens on the model side.

    The sizes, rounding and crop offsets are torchvision's
    ``weights.transforms()``. Bilinear and bicubic resizing run on the uint8
    tensor with torchvision's antialiased kernels (:func:`resize_uint8`),
    within one grey level of PIL's resize and faster; other filters, and
    ``pil_resize=True`` (features of cache format 2), use PIL."""
    if pre.interpolation not in _TV_INTERP or pil_resize:
        return torch.from_numpy(_preprocess_pil(im, pre)).permute(2, 0, 1)
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    h, w = x.shape[1:]
    if min(h, w) != pre.resize:
        x = resize_uint8(x, list(_short_side_to(h, w, pre.resize)), pre.interpolation)
    c = pre.crop
    h, w = x.shape[1:]
    if h < c or w < c:  # torchvision pads; with resize >= crop this never happens
        x = resize_uint8(x, [max(h, c), max(w, c)], pre.interpolation)
        h, w = x.shape[1:]
    top, left = _center_offsets(h, w, c)
    return x[:, top:top + c, left:left + c].contiguous()


def resize_uint8(x: torch.Tensor, size: list[int], mode: str) -> torch.Tensor:
    """A uint8 (C, H, W) tensor resized to ``size`` (H, W), antialiased, as
    ``torchvision.transforms.v2.functional.resize`` resizes it, value for
    value (tested against it): ``interpolate`` on the uint8 tensor where
    torchvision 0.29 does that (bicubic; bilinear on AVX2, AVX-512 and ARM
    CPUs), else in float32, rounded. Called directly because importing
    torchvision imports ``torch._dynamo``: 1-3 s of every command's start-up;
    with another torchvision than the one this was checked against
    (:func:`~featx.backbones.torchvision_table_is_current`), whose rule may
    differ, torchvision's own resize runs."""
    import platform

    from torch.nn.functional import interpolate

    from .backbones import torchvision_table_is_current
    if not torchvision_table_is_current():
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F
        return F.resize(x, list(size), interpolation=InterpolationMode(mode), antialias=True)
    native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
        or platform.machine() in ("aarch64", "arm64")
    c, h, w = x.shape
    if list(size) == [h, w]:
        return x
    img = x.reshape(1, c, h, w)
    if img.is_contiguous(memory_format=torch.channels_last) and img.numel() != img.stride()[0]:
        # as torchvision restrides it: the output stays channels_last (torch issue 68430)
        img = img.as_strided((1, c, h, w), (img.numel(), *img.stride()[1:]))
    y = interpolate(img if native else img.float(), size=list(size), mode=mode, align_corners=False, antialias=True)
    if not native:
        y = (y.clamp_(0, 255) if mode == "bicubic" else y).round_().to(torch.uint8)
    return y[0]


def _short_side_to(h: int, w: int, side: int) -> tuple[int, int]:
    """(height, width) with the short side ``side``, the long one rounded
    down, as torchvision sizes ``Resize(side)``."""
    long = int(side * max(h, w) / min(h, w))
    return (side, long) if h <= w else (long, side)


def _center_offsets(h: int, w: int, c: int) -> tuple[int, int]:
    """Top and left of a centered c x c crop, rounded as torchvision rounds."""
    return int(round((h - c) / 2.0)), int(round((w - c) / 2.0))


def _preprocess_pil(im: Image.Image, pre: Preprocess) -> np.ndarray:
    """:func:`preprocess_image` with PIL's resize: uint8 HWC."""
    w, h = im.size
    if min(w, h) != pre.resize:
        new_h, new_w = _short_side_to(h, w, pre.resize)
        im = im.resize((new_w, new_h), _INTERP.get(pre.interpolation, Image.BILINEAR))
    w, h = im.size
    c = pre.crop
    if w < c or h < c:
        im = im.resize((max(w, c), max(h, c)), _INTERP.get(pre.interpolation, Image.BILINEAR))
        w, h = im.size
    top, left = _center_offsets(h, w, c)
    im = im.crop((left, top, left + c, top + c))
    return np.array(im, dtype=np.uint8)  # a writable copy, as torch wants


def scaled_to_crop(pre: Preprocess, crop: int | None) -> Preprocess:
    """``pre`` at another crop (``--image-size``), the resize scaled alike; ``pre`` itself for None or its own crop."""
    if crop is None or crop == pre.crop:
        return pre
    return Preprocess(max(crop, round(crop * pre.resize / pre.crop)), crop, pre.mean, pre.std, pre.interpolation)


# --------------------------------------------------------------------------
# augmentation (fine-tuning's train images)


def train_transform(pre: Preprocess, augment: str):
    """PIL image -> augmented uint8 (3, crop, crop) tensor: random resized
    crop to ``pre.crop``, horizontal flip, colour jitter; None for
    ``augment="none"`` (train on :func:`preprocess_image`'s eval crop)."""
    if augment == "none":
        return None
    from torchvision.transforms import InterpolationMode, v2
    interp = InterpolationMode(pre.interpolation) if pre.interpolation in \
        {m.value for m in InterpolationMode} else InterpolationMode.BILINEAR
    scale, jitter = _AUGMENTS[augment]
    return v2.Compose([v2.RandomResizedCrop(pre.crop, scale=scale, interpolation=interp, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ColorJitter(*jitter), v2.PILToTensor()])


# --------------------------------------------------------------------------
# normalisation (model side)


class Normalize(nn.Module):
    """uint8 NCHW in, float normalised by the weights' mean/std out:
    ``(x/255 - mean)/std`` as one multiply-add."""

    def __init__(self, pre: Preprocess):
        super().__init__()
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift
