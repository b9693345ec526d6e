"""The one loop that runs a network over image files, and its autocast.

:class:`ImageBatches` decodes images in DataLoader workers, sorts out the
ones that fail (reported and skipped, or fatal with ``--strict``) and shows
the progress; feature extraction (:func:`featx.extract.extract`),
prediction with a fine-tuned bundle and fine-tuning's val pass all read
their images through it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .backbones import Preprocess
from .cache import FORMAT_VERSION
from .data import load_image
from .errors import ImageError
from .preprocess import preprocess_image

__all__ = ["ImageBatches", "ImageFiles", "autocast", "collate", "default_workers", "sort_out_bad"]


def autocast(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 on ``device``; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes images for the model; a bad file becomes a flagged empty item.

    Items are ``(uint8 CHW tensor, position, error reason or "")``; the image
    is :func:`~featx.preprocess.preprocess_image`'s crop, or ``transform(PIL
    image)`` when given (fine-tuning's augmentation)."""

    def __init__(self, paths: Sequence[Path | str], pre: Preprocess, draft: bool = True,
                 feature_format: int = FORMAT_VERSION, transform: Callable | None = None):
        self.paths = [str(p) for p in paths]
        self.pre = pre
        self.draft = draft
        self.pil_resize = feature_format < 3   # how format-2 entries (and bundles) were made
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = load_image(self.paths[i], draft_size=self.pre.resize if self.draft else None)
            if self.transform is not None:
                return self.transform(im), i, ""
            return preprocess_image(im, self.pre, self.pil_resize), i, ""
        except ImageError as e:
            return torch.zeros((3, self.pre.crop, self.pre.crop), dtype=torch.uint8), i, e.reason


def collate(items):
    tensors, idx, errors = zip(*items)
    return torch.stack(tensors), torch.tensor(idx), list(errors)


def sort_out_bad(errors: list[str], path_of, strict: bool) -> tuple[list[int], list[tuple[str, str]]]:
    """Positions in a decoded batch to keep, and ``(path, reason)`` of the
    images that failed to decode; with ``strict`` the first one raises
    :class:`~featx.errors.ImageError`."""
    keep, bad = [], []
    for i, reason in enumerate(errors):
        if not reason:
            keep.append(i)
        elif strict:
            raise ImageError(path_of(i), reason + " (--strict stops at the first bad image)")
        else:
            bad.append((path_of(i), reason))
    return keep, bad


def default_workers(n_images: int) -> int:
    """Decode processes: none for a handful of images (starting workers
    costs more), else one per core but one, at least 2, at most 8."""
    if n_images < 64:
        return 0
    cpus = os.cpu_count() or 1
    return min(8, max(2, cpus - 1))


PREFETCH_BYTES = 256 << 20   # decoded images the workers may hold ready, all workers together


def _shared_memory_free() -> int | None:
    """Free bytes of /dev/shm, where workers hand batches over (64 MiB in a
    default Docker container), or None where there is none to measure."""
    import shutil
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def prefetch_batches(batch_size: int, workers: int, crop: int) -> int:
    """Batches each decode worker keeps ready (DataLoader's ``prefetch_factor``):
    as many as fit in :data:`PREFETCH_BYTES` of uint8 images, and in half of
    the free shared memory, from 2 to 16. A deep queue is filled while the
    network is being prepared (an ONNX export: seconds) and then fed to it
    without the workers competing for the cores; measured on 1000 photos, 2
    cores, mobilenet_v2 (16 batches of 32 against 4): 1.3 s off a 13.4 s
    first run, 0.6 s off a 10.6 s one whose export is stored (five runs
    each, alternated)."""
    budget, shm = PREFETCH_BYTES, _shared_memory_free()
    if shm is not None:
        budget = min(budget, shm // 2)
    per_batch = max(1, workers) * max(1, batch_size) * 3 * crop * crop
    return int(min(16, max(2, budget // per_batch)))


class ImageBatches:
    """The images of ``paths`` decoded in batches, in order.

    Iterating yields ``(images, index)``: the decodable images of a batch
    (uint8 NCHW) and their positions in ``paths``. An image that fails to
    decode is left out and recorded in ``errors`` (position -> reason) and
    ``skipped`` (path, reason); ``report`` names it on stderr above the
    progress bar as it is met (stdout stays clean for CSV/JSON); with
    ``strict`` it raises :class:`~featx.errors.ImageError` instead.

    Decoding starts here: a caller can prepare its network (an ONNX export,
    a compile) while the workers decode, and they were forked before any
    inference thread pool existed. ``close()`` (or leaving a ``with``
    block) ends the progress bar and the workers.
    """

    def __init__(self, paths: Sequence[Path | str], pre: Preprocess, *, batch_size: int, workers: int | None = None,
                 pin: bool = False, strict: bool = False, report: bool = True, progress: bool = True,
                 desc: str = "", leave: bool = True, feature_format: int = FORMAT_VERSION):
        from tqdm.auto import tqdm
        self.files = ImageFiles(paths, pre, feature_format=feature_format)
        self.strict, self.report = strict, report
        self.errors: dict[int, str] = {}
        self.skipped: list[tuple[str, str]] = []
        workers = default_workers(len(self.files)) if workers is None else workers
        with warnings.catch_warnings():   # more workers than cores is the caller's explicit choice
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            self._loader = iter(torch.utils.data.DataLoader(
                self.files, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                pin_memory=pin, persistent_workers=False,
                prefetch_factor=prefetch_batches(batch_size, workers, pre.crop) if workers else None))
        self.bar = tqdm(total=len(self.files), unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
                        leave=leave, smoothing=0.1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[int]]]:
        paths = self.files.paths
        for images, idx, errors in self._loader:
            keep, bad = sort_out_bad(errors, lambda i: paths[int(idx[i])], self.strict)
            for path, reason in bad if self.report else ():
                self.bar.write(f"skipped {path}: {reason}", file=sys.stderr)
            self.skipped += bad
            self.errors.update((int(idx[i]), e) for i, e in enumerate(errors) if e)
            if keep:
                yield (images[keep] if bad else images), [int(idx[i]) for i in keep]
            self.bar.update(len(errors))

    def close(self) -> None:
        self.bar.close()
        # decode workers end now, not whenever a kept traceback lets go of them
        getattr(self._loader, "_shutdown_workers", lambda: None)()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
