"""Bundles of kind ``"finetune"``: the whole fine-tuned network in ``backbone.pt``.

Saved and loaded with ``weights_only`` torch files (tensors, no code);
``featx evaluate``/``predict`` run the network itself
(:func:`_finetune_probabilities`), and :func:`backbone_from_bundle` serves
it as a backbone for extraction.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..backbones import BackboneInfo, Preprocess, ResolvedWeights, get_backbone
from ..data import Dataset
from ..errors import FeatxError
from ..extract import resolve_device
from ..inference import ImageBatches
from ..preprocess import Normalize
from ..text import error_text

__all__ = ["FINETUNE", "backbone_from_bundle", "build_network", "finetune_manifest"]


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def finetune_manifest(*, classes, info: BackboneInfo, heads: Sequence[str], state_sha256: str, weights_spec: str,
                      resolved: ResolvedWeights,
                      preprocess: Preprocess, seed: int, config: dict, start: dict, history: list[dict],
                      best: dict, dataset: Dataset | None, n_train: int, n_val: int, val_source: str,
                      bn_rule: str, interrupted: bool, stopped_early: bool, device: str) -> dict:
    """The manifest of a "finetune" bundle. The network's weights are
    ``backbone.pt`` itself: ``backbone.weights_identity`` is
    ``file:<its sha256>``, what ``--weights BUNDLE/backbone.pt`` resolves to;
    ``backbone.started_from`` names the weights training began with."""
    from ..bundle import dataset_record, weights_sha256
    training = None
    if dataset is not None:
        training = {**dataset_record(dataset), "n_train": n_train, "n_val": n_val, "val_source": val_source}
    return {
        "kind": "finetune",
        "classes": [str(c) for c in classes],
        "backbone": {
            "name": info.name,
            "heads": list(heads),
            "started_from": {"spec": str(weights_spec), "kind": resolved.kind, "name": resolved.name,
                             "identity": resolved.identity, "sha256": weights_sha256(resolved)},
            "weights_kind": "file",
            "weights_identity": f"file:{state_sha256}",
            "weights_sha256": state_sha256,
            "seed": int(seed),
            "preprocess": preprocess.as_dict(),
            "layer": None,
            "pool": None,
        },
        "finetune": {
            "config": {k: v for k, v in config.items() if k not in ("format", "classes", "train", "val")},
            "start": start,
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"],
            "start_val_acc": history[0]["val_acc"] if history and history[0]["epoch"] == 0 else None,
            "epochs_run": max((r["epoch"] for r in history), default=0),
            "interrupted": interrupted,
            "stopped_early": stopped_early,
            "bn_rule": bn_rule,
            "device": device,
            "history": history,
        },
        "training": training,
    }


def _save_finetune(payload, folder: Path) -> None:
    """``payload``: ``{"state_bytes": torch.save output}`` (or ``"state_dict"``),
    and ``"extras"``: files copied beside it (log, curves)."""
    data = payload.get("state_bytes") or _state_bytes(payload["state_dict"])
    (folder / "backbone.pt").write_bytes(data)
    for extra in payload.get("extras", []):
        if Path(extra).is_file():
            shutil.copyfile(extra, folder / Path(extra).name)


def build_network(backbone: str, num_classes: int) -> nn.Module:
    """The architecture of a "finetune" bundle, randomly initialised, in eval mode."""
    info = get_backbone(backbone)
    # pretrained=True: Inception's transform_input, which fine-tuning always sets
    return info.build(num_classes=num_classes, pretrained=True).eval()


def _load_finetune(folder: Path, manifest: dict) -> nn.Module:
    from ..bundle import BundleError
    b = manifest.get("backbone") or {}
    try:
        model = build_network(b["name"], len(manifest["classes"]))
    except (KeyError, FeatxError) as e:
        raise BundleError(f"{folder}: cannot rebuild the network ({e})") from None
    path = folder / "backbone.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad bundle
        raise BundleError(f"{path}: does not load into {b.get('name')} with {len(manifest['classes'])} classes "
                          f"({error_text(e)})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _finetune_probabilities(bundle, samples: list, *, cache=None, weights=None, progress=True, notify=None,
                            device="auto", batch_size=None, workers=None, **_ignored):
    """Run the fine-tuned network on the images (no feature cache: the whole
    network is the model). Unreadable images get their reason as error
    (the caller names them)."""
    from ..bundle import Predictions
    notify = notify or (lambda msg: None)
    if weights:
        notify("note: --weights does not apply to a fine-tuned bundle (it carries its weights in backbone.pt)")
    t0 = time.perf_counter()
    proba = np.full((len(samples), len(bundle.classes)), np.nan)
    if not samples:
        return Predictions(proba, [])
    pre = Preprocess.from_dict(bundle.manifest["backbone"]["preprocess"])
    dev = resolve_device(device)
    model = bundle.payload.to(dev).eval()
    norm = Normalize(pre).to(dev)
    done = 0
    with ImageBatches([s.path for s in samples], pre, batch_size=batch_size or 32, workers=workers,
                      pin=dev.type == "cuda", report=False, progress=progress, desc=f"predict {bundle.name}",
                      leave=False) as batches, torch.inference_mode():
        for images, index in batches:
            logits = model(norm(images.to(dev))).float()
            proba[index] = torch.softmax(logits, 1).cpu().numpy()
            done += len(index)
    errors = [batches.errors.get(i) for i in range(len(samples))]
    return Predictions(proba, errors, extracted=done, cached=0, seconds=time.perf_counter() - t0)


def _finetune_kind():
    from ..bundle import BundleKind
    return BundleKind("finetune", ("backbone.pt",), _save_finetune, _load_finetune, _finetune_probabilities)


FINETUNE = _finetune_kind()


def backbone_from_bundle(path) -> tuple[str, ResolvedWeights, dict]:
    """The fine-tuned network of a "finetune" bundle as a backbone for extraction.

    Returns ``(backbone name, ResolvedWeights, state_dict)``. The weights are
    of kind ``"file"`` pointing at the bundle's ``backbone.pt``, identity
    ``file:<sha256 of backbone.pt>`` (so the fine-tuned features get cache
    entries of their own, and ``--weights BUNDLE/backbone.pt`` names the same
    ones), preprocessing as the bundle was trained with, and
    ``num_classes`` = the bundle's classes. ``load_backbone(name,
    resolved=rw)`` loads it strictly.
    """
    from ..bundle import BundleError, load_bundle, read_manifest
    manifest = read_manifest(path)      # the kind first: another kind's payload is not even loaded
    if manifest.get("kind") != "finetune":
        b = manifest.get("backbone") or {}
        raise BundleError(f"{Path(path).expanduser()}: a {manifest.get('kind')!r} bundle keeps its backbone frozen "
                          f"({b.get('name')} {b.get('weights_identity')}); extract with --backbone/--weights instead")
    bundle = load_bundle(path)          # backbone.pt is read with weights_only=True: tensors, no code
    from ..backbones import sha256_of
    pt = bundle.path / "backbone.pt"
    sha = sha256_of(pt)      # load_bundle has checked it against the manifest
    b = bundle.backbone
    pre = Preprocess.from_dict(b["preprocess"])
    rw = ResolvedWeights(spec=str(bundle.path), kind="file", name=f"{bundle.path.name}/backbone.pt",
                         identity=f"file:{sha}", preprocess=pre, source=f"fine-tuned bundle {bundle.path}",
                         path=pt.resolve(), num_classes=len(bundle.classes),
                         meta={"sha256": sha, "bundle": str(bundle.path),
                               "started_from": (b.get("started_from") or {}).get("identity")})
    return b["name"], rw, bundle.payload.state_dict()
