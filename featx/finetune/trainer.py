"""The fine-tuning run: plan, epoch 0 (the start measured), the two stages, checkpoints, the bundle.

:func:`finetune` checks its settings (:class:`~featx.finetune.config.FinetuneConfig`),
plans the run (:class:`_Plan`: weights, device, preprocessing, the
train/val split, the checkpoint's identity), builds the network with its
new head (:func:`_build_model`), and hands it to :class:`_Run`, which
trains epoch by epoch, keeps the best one and writes a checkpoint after
each; the best epoch becomes the bundle (:func:`_write_bundle`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..backbones import BackboneInfo, Preprocess, ResolvedWeights, get_backbone, load_backbone, resolve_weights
from ..data import Dataset, Sample, samples_digest, split_train_val
from ..errors import ConfigError, FeatxError
from ..extract import resolve_device
from ..files import atomic_write_bytes, atomic_write_text
from ..inference import ImageBatches, ImageFiles, autocast, collate, default_workers, sort_out_bad
from ..preprocess import Normalize, scaled_to_crop, train_transform
from .config import FinetuneConfig
from .kind import _state_bytes, finetune_manifest
from .probe_start import _apply_probe, _probe_start
from .surgery import (_head_param_groups, _set_trainable, _train_mode, build_param_groups, make_one_cycle,
                      make_optimizer, replace_head)

__all__ = ["FinetuneResult", "Interrupt", "compute_loss", "default_work_dir", "epoch_seed", "finetune",
           "summary_lines"]

AUX_LOSS_WEIGHT = 0.4
CHECKPOINT_FORMAT = 1
# val images decoded once and kept in memory up to this many bytes
VAL_CACHE_BYTES = 1 << 30


class Interrupt(Exception):
    """Raised by an ``on_epoch_end`` callback to stop a run as a crash would
    (the checkpoint of that epoch is on disk; nothing else is written)."""


@dataclass
class FinetuneResult:
    bundle: Path | None
    work_dir: Path
    history: list[dict]
    best_epoch: int | None
    best_val_acc: float | None
    start: dict                              # ProbeStart.describe()
    n_train: int
    n_val: int
    val_source: str
    interrupted: bool = False
    stopped_early: bool = False
    resumed_from: int | None = None          # the epoch a resumed run continued after
    seconds: float = 0.0
    bn_rule: str = ""
    notes: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def start_val_acc(self) -> float | None:
        first = self.history[0] if self.history else None
        return first["val_acc"] if first and first["epoch"] == 0 else None


def compute_loss(outputs, targets: torch.Tensor, criterion: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits). Inception's train-mode output (logits, aux_logits)
    adds ``AUX_LOSS_WEIGHT`` x the aux loss."""
    aux = getattr(outputs, "aux_logits", None)
    logits = getattr(outputs, "logits", outputs)
    loss = criterion(logits, targets)
    if aux is not None:
        loss = loss + AUX_LOSS_WEIGHT * criterion(aux, targets)
    return loss, logits


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness: the same whether or not the run was resumed."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class _EvalImages:
    """The val images, preprocessed on first use and kept in memory when small;
    ``errors``: position -> reason of those that could not be read."""

    def __init__(self, samples: list[Sample], labels: np.ndarray, pre: Preprocess, batch_size: int,
                 workers: int, pin: bool):
        self.samples, self.labels, self.pre = samples, labels, pre
        self.batch_size, self.workers, self.pin = batch_size, workers, pin
        self.errors: dict[int, str] = {}
        self.keep = len(samples) * 3 * pre.crop * pre.crop <= VAL_CACHE_BYTES
        self.cached = None

    def _read(self):
        with ImageBatches([s.path for s in self.samples], self.pre, batch_size=self.batch_size,
                          workers=self.workers, pin=self.pin, report=False, progress=False) as batches:
            for images, index in batches:
                yield images, torch.from_numpy(self.labels[index])
        self.errors.update(batches.errors)

    def __iter__(self):
        if self.keep and self.cached is None:
            self.cached = list(self._read())
        return iter(self.cached) if self.cached is not None else self._read()


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _evaluate(model: nn.Module, norm: nn.Module, images: _EvalImages, device: torch.device, precision: str,
              criterion) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on the val images."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.inference_mode():
        for x, y in images:
            x = norm(x.to(device, non_blocking=True))
            y = y.to(device)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(criterion(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    if total == 0:
        raise FeatxError("none of the val images could be read")
    return loss_sum / total, correct / total


# --------------------------------------------------------------------------
# the plan and the checkpoint


def default_work_dir(out) -> Path:
    """``runs/x.featx`` -> ``runs/x.finetune/`` (checkpoint, log, curves)."""
    out = Path(out)
    stem = out.name[:-len(".featx")] if out.name.endswith(".featx") else out.name
    return out.with_name(stem + ".finetune")


@dataclass
class _Plan:
    """What a run trains, on which images, how, and where it writes: all fixed before the network is built."""

    ds: Dataset
    info: BackboneInfo
    weights: str                 # the --weights spec
    rw: ResolvedWeights
    cfg: FinetuneConfig          # resolved
    seed: int
    device: torch.device
    pre: Preprocess
    bn_frozen: bool              # BatchNorm statistics in stage 2
    bn_rule: str
    train: list[Sample]
    val: list[Sample]
    val_source: str
    workers: int
    work: Path

    @property
    def header(self) -> str:
        return (f"{self.info.name} from {self.rw.identity}: train {len(self.train)}, val {len(self.val)} "
                f"({self.val_source}); {self.bn_rule}")

    @property
    def n_batches(self) -> int:
        return max(1, len(self.train) // self.cfg.batch_size)

    @cached_property
    def config(self) -> dict:
        """What a checkpoint must have been made with to be resumed (and the manifest's ``finetune.config``)."""
        c = self.cfg
        return {"format": CHECKPOINT_FORMAT, "backbone": self.info.name, "weights_identity": self.rw.identity,
                "dataset_id": self.ds.id, "train": samples_digest(self.train), "val": samples_digest(self.val),
                "classes": list(self.ds.classes), "epochs": c.epochs, "freeze_epochs": c.freeze_epochs, "lr": c.lr,
                "lr_mult": c.lr_mult, "lr_groups": c.lr_groups, "batch_size": c.batch_size,
                "optimizer": c.optimizer, "weight_decay": c.weight_decay, "augment": c.augment, "bn": c.bn,
                "probe": c.probe, "precision": c.precision, "image_size": c.image_size, "warmup": c.warmup,
                "seed": self.seed, "preprocess": self.pre.as_dict()}

    @property
    def checkpoint_path(self) -> Path:
        return self.work / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.work / "log.jsonl"

    @property
    def curves_path(self) -> Path:
        return self.work / "training_curves.png"


def _plan(ds: Dataset, backbone: str, weights: str, cfg: FinetuneConfig, *, device: str, seed: int, workers,
          out: Path, work_dir, resolved: ResolvedWeights | None = None) -> _Plan:
    info = get_backbone(backbone)
    rw = resolved if resolved is not None else resolve_weights(info, weights, seed=seed)
    pretrained = rw.kind != "none"
    dev = resolve_device(device)
    cfg = cfg.resolved(pretrained, dev)
    bn_frozen, bn_rule = cfg.bn_rule(pretrained)
    train, val, val_source = split_train_val(ds, cfg.max_train_images, seed)
    return _Plan(ds, info, weights, rw, cfg, seed, dev, scaled_to_crop(rw.preprocess, cfg.image_size), bn_frozen,
                 bn_rule, train, val, val_source, default_workers(len(train)) if workers is None else int(workers),
                 Path(work_dir) if work_dir else default_work_dir(out))


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged file
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it or pass --restart") from None


def _open_checkpoint(plan: _Plan, restart: bool, notify) -> dict | None:
    """The checkpoint to resume from (None: start afresh); one made with other settings is an error."""
    path = plan.checkpoint_path
    if not path.exists():
        return None
    if restart:
        path.unlink()
        notify(f"--restart: removed {path}")
        return None
    ckpt = _load_checkpoint(path)
    config = plan.config
    if ckpt.get("config") != config:
        old = ckpt.get("config") or {}
        diff = [k for k in config if old.get(k) != config[k]]
        raise ConfigError(f"{path}: a checkpoint made with other settings ({', '.join(diff) or 'format'} "
                          "differ); pass --restart to discard it, or another --work-dir/--out")
    return ckpt


def _build_model(plan: _Plan, ckpt: dict | None, *, cache, progress: bool,
                 notify) -> tuple[nn.Module, list[str], dict]:
    """The network with its new head, started from the probe, the checkpoint or at random,
    on the device; its head names; how it started (``ProbeStart.describe()``)."""
    info, dev = plan.info, plan.device
    lb = load_backbone(info.name, resolved=plan.rw, seed=plan.seed)
    model = lb.model
    start = None
    if ckpt is None:
        start = _probe_start(plan.cfg.probe, info, plan.rw, plan.weights, model, plan.train, plan.val, plan.ds,
                             image_size=plan.cfg.image_size, cache=cache, seed=plan.seed, device=dev,
                             progress=progress, notify=notify, lb=lb)
    torch.manual_seed(plan.seed)
    heads = replace_head(model, info, len(plan.ds.classes))
    if hasattr(model, "transform_input"):
        # bundles and load_backbone rebuild Inception with transform_input=True
        model.transform_input = True
    if start is not None and start.start == "linear-probe":
        _apply_probe(model, info, start)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, heads, start.describe() if start is not None else ckpt["start"]


# --------------------------------------------------------------------------
# the epochs


class _Run:
    """One run's training state: the network, its optimizer and schedule for
    the current stage, the history and the best epoch so far."""

    def __init__(self, plan: _Plan, model: nn.Module, heads: list[str], start_info: dict, ckpt: dict | None, *,
                 progress: bool, notify):
        self.plan, self.cfg, self.model, self.heads, self.start_info = plan, plan.cfg, model, heads, start_info
        self.progress, self.notify = progress, notify
        dev = plan.device
        self.norm = Normalize(plan.pre).to(dev)
        self.criterion = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler("cuda") if self.cfg.precision == "fp16" else None
        self.y_train = torch.from_numpy(plan.ds.labels(plan.train))
        self.val_images = _EvalImages(plan.val, plan.ds.labels(plan.val), plan.pre,
                                      batch_size=max(self.cfg.batch_size, 32),
                                      workers=min(plan.workers, 2) if len(plan.val) >= 64 else 0, pin=dev.type == "cuda")
        self.notes: list[str] = []
        self.history: list[dict] = list(ckpt["history"]) if ckpt else []
        self.best = dict(ckpt["best"]) if ckpt and ckpt.get("best") else None
        self.done_epoch = int(ckpt["epoch"]) if ckpt else 0
        self.resumed_from = self.done_epoch if ckpt else None
        self.stopped = bool(ckpt and ckpt.get("stopped_early"))
        self.interrupted = False
        self.ckpt = ckpt             # its optimizer state goes to the first stage entered, if it is that stage
        self.opt = self.sched = self.stage = None
        if ckpt:
            notify(f"resuming after epoch {self.done_epoch} of {self.cfg.epochs} from {plan.checkpoint_path}"
                   + (" (it had stopped early: nothing left to train)" if self.stopped else ""))

    def run(self, on_epoch_end) -> None:
        """Epoch 0 (the start, measured) unless resumed, then the epochs left.
        Ctrl-C after epoch 0 ends the run with the best epoch so far."""
        self.plan.work.mkdir(parents=True, exist_ok=True)
        try:
            if not self.history:
                self._measure_start()
            for epoch in range(self.done_epoch + 1, (self.done_epoch if self.stopped else self.cfg.epochs) + 1):
                self._enter_stage("head" if epoch <= self.cfg.freeze_epochs else "full")
                if self._end_epoch(self._train_epoch(epoch), on_epoch_end):
                    break
        except KeyboardInterrupt:
            if self.best is None:
                raise
            self.interrupted = True
            self.notify(f"interrupted: writing the bundle from the best epoch so far ({self.best['epoch']}); "
                        "run the same command again to resume after the last finished epoch")

    def _measure_start(self) -> None:
        t0 = time.perf_counter()
        vloss, vacc = self._validate()
        rec = {"epoch": 0, "stage": "start", "start": self.start_info["start"], "lrs": [], "train_loss": None,
               "train_acc": None, "val_loss": vloss, "val_acc": vacc, "seconds": time.perf_counter() - t0,
               "images": 0}
        self.history.append(rec)
        self.best = {"epoch": 0, "val_acc": vacc, "model": _cpu_state(self.model)}
        self.notify(_epoch_line(rec, self.cfg.epochs, True))
        self._save(0, "start")
        self._write_log()

    def _enter_stage(self, stage: str) -> None:
        """Stage 1 ("head"): the head alone, constant learning rate. Stage 2
        ("full"): everything, discriminative learning rates, one-cycle schedule.
        A resumed run restores the optimizer (schedule, loss scaler) of its stage."""
        if stage == self.stage:
            return
        self.stage, cfg, model = stage, self.cfg, self.model
        _set_trainable(model, self.heads, stage)
        if stage == "head":
            self.opt = make_optimizer(cfg.optimizer, _head_param_groups(model, self.heads, cfg.lr, cfg.weight_decay))
            self.sched = None
        else:
            self.opt = make_optimizer(cfg.optimizer, build_param_groups(
                model, self.heads, lr=cfg.lr, lr_mult=cfg.lr_mult, groups=cfg.lr_groups, weight_decay=cfg.weight_decay))
            self.sched = make_one_cycle(self.opt, self.plan.n_batches * (cfg.epochs - cfg.freeze_epochs), cfg.warmup)
        ckpt, self.ckpt = self.ckpt, None   # used once
        if ckpt is not None and ckpt["stage"] == stage and ckpt["optimizer"] is not None:
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.sched is not None and ckpt["scheduler"] is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])

    def _train_loader(self, epoch: int):
        plan, cfg = self.plan, self.cfg
        gen = torch.Generator().manual_seed(epoch_seed(plan.seed, epoch))
        files = ImageFiles([s.path for s in plan.train], plan.pre, transform=train_transform(plan.pre, cfg.augment))
        return torch.utils.data.DataLoader(
            files, batch_size=cfg.batch_size, shuffle=True, drop_last=len(plan.train) >= cfg.batch_size,
            num_workers=plan.workers, collate_fn=collate, generator=gen, worker_init_fn=_seed_worker,
            pin_memory=plan.device.type == "cuda", prefetch_factor=4 if plan.workers else None)

    def _train_epoch(self, epoch: int) -> dict:
        """One epoch of the current stage, then val: the epoch's record. Train
        images that cannot be read are left out (noted in the first epoch run)."""
        from tqdm.auto import tqdm
        plan, cfg = self.plan, self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(plan.seed, epoch))
        loader = self._train_loader(epoch)
        _train_mode(self.model, bn_frozen=self.stage == "head" or plan.bn_frozen)
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(total=plan.n_batches * min(cfg.batch_size, len(plan.train)), unit="img", disable=not self.progress,
                   desc=f"epoch {epoch}/{cfg.epochs} {self.stage}", dynamic_ncols=True, leave=False, smoothing=0.1)
        try:
            for images, idx, errors in loader:
                keep, bad = sort_out_bad(errors, lambda i: str(plan.train[int(idx[i])].path), False)
                if epoch == self.done_epoch + 1:
                    self.notes += [f"train image left out: {path}: {reason}" for path, reason in bad]
                if len(keep) >= 2 or (keep and self.stage == "head"):
                    loss, right = self._step(images[keep], self.y_train[idx[keep]])
                    loss_sum, correct, seen = loss_sum + loss * len(keep), correct + right, seen + len(keep)
                if self.sched is not None:
                    self.sched.step()
                bar.update(len(errors))
                if seen:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        finally:
            bar.close()
        vloss, vacc = self._validate()
        return {"epoch": epoch, "stage": self.stage, "lrs": _lrs_by_group(self.opt),
                "train_loss": loss_sum / seen if seen else None, "train_acc": correct / seen if seen else None,
                "val_loss": vloss, "val_acc": vacc, "seconds": time.perf_counter() - t0, "images": seen}

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """One optimizer step on a batch: (its mean loss, how many it got right)."""
        dev = self.plan.device
        x = self.norm(images.to(dev, non_blocking=True))
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(dev, non_blocking=True)
        with autocast(dev, self.cfg.precision):
            loss, logits = compute_loss(self.model(x), y, self.criterion)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return float(loss.detach()), int((logits.detach().argmax(1) == y).sum())

    def _validate(self) -> tuple[float, float]:
        return _evaluate(self.model, self.norm, self.val_images, self.plan.device, self.cfg.precision, self.criterion)

    def _end_epoch(self, rec: dict, on_epoch_end) -> bool:
        """Record the epoch, keep it if best, checkpoint; True when patience runs out."""
        epoch, stage, cfg = rec["epoch"], rec["stage"], self.cfg
        self.history.append(rec)
        improved = self.best is None or rec["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = {"epoch": epoch, "val_acc": rec["val_acc"], "model": _cpu_state(self.model)}
        self.notify(_epoch_line(rec, cfg.epochs, improved))
        self._save(epoch, stage)
        self._write_log()
        if on_epoch_end is not None:
            on_epoch_end(dict(rec), self.model)
        # patience counts stage-2 epochs only: the head-only ones are not the model's last word
        if (cfg.patience and stage == "full" and epoch < cfg.epochs
                and epoch - max(self.best["epoch"], cfg.freeze_epochs) >= cfg.patience):
            self.stopped = True
            self._save(epoch, stage)   # a rerun must not train on
            self.notify(f"early stop: no better val accuracy for {cfg.patience} epochs")
            return True
        return False

    def _save(self, epoch: int, stage: str) -> None:
        opt, sched, scaler = self.opt, self.sched, self.scaler
        _save_checkpoint(self.plan.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "config": self.plan.config, "epoch": epoch, "stage": stage,
            "model": _cpu_state(self.model), "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": self.history, "best": self.best, "start": self.start_info, "stopped_early": self.stopped})

    def _write_log(self) -> None:
        from ..report import plot_training_curves
        atomic_write_text(self.plan.log_path, "".join(json.dumps(r) + "\n" for r in self.history))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plot_training_curves(self.history, self.plan.curves_path)


def _lrs_by_group(opt) -> list[float]:
    seen: dict[int, float] = {}
    for g in opt.param_groups:
        seen.setdefault(g.get("layer_group", 0), float(g["lr"]))
    return [seen[k] for k in sorted(seen)]


def _epoch_line(rec: dict, epochs: int, best: bool) -> str:
    if rec["epoch"] == 0:
        return (f"epoch 0/{epochs} start ({rec['start']}): val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f}"
                f" ({rec['seconds']:.0f} s)")
    lrs = rec["lrs"]
    lr = f"lr {lrs[-1]:.2g}" if len(lrs) == 1 else f"lr {lrs[0]:.2g}..{lrs[-1]:.2g}"
    return (f"epoch {rec['epoch']}/{epochs} {rec['stage']}: {lr}, train loss {rec['train_loss']:.4f} "
            f"acc {rec['train_acc']:.4f}, val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f} "
            f"({rec['seconds']:.0f} s, {rec['images'] / max(rec['seconds'], 1e-9):.1f} img/s)" + (" *" if best else ""))


# --------------------------------------------------------------------------
# the run


def _write_bundle(run: _Run, out: Path, t_start: float) -> FinetuneResult:
    """The best epoch as a "finetune" bundle at ``out``, with the log and curves."""
    from ..bundle import save_bundle
    plan, best = run.plan, run.best
    run.notes += [f"val image {plan.val[i].path} could not be read: left out" for i in sorted(run.val_images.errors)]
    run.model.load_state_dict(best["model"])
    run.model.eval()
    state_bytes = _state_bytes(_cpu_state(run.model))
    manifest = finetune_manifest(classes=list(plan.ds.classes), info=plan.info, heads=run.heads,
                                 state_sha256=hashlib.sha256(state_bytes).hexdigest(), weights_spec=plan.weights,
                                 resolved=plan.rw, preprocess=plan.pre, seed=plan.seed, config=plan.config,
                                 start=run.start_info, history=run.history, best=best, dataset=plan.ds,
                                 n_train=len(plan.train), n_val=len(plan.val), val_source=plan.val_source,
                                 bn_rule=plan.bn_rule, interrupted=run.interrupted, stopped_early=run.stopped,
                                 device=str(plan.device))
    path = save_bundle(out, manifest, {"state_bytes": state_bytes, "extras": [plan.log_path, plan.curves_path]})
    return FinetuneResult(path, plan.work, run.history, best["epoch"], best["val_acc"], run.start_info,
                          len(plan.train), len(plan.val), plan.val_source, run.interrupted, run.stopped,
                          run.resumed_from, time.perf_counter() - t_start, plan.bn_rule, run.notes, manifest)


def finetune(ds: Dataset, backbone: str, out, *, weights: str = "auto", epochs: int = 5,
             freeze_epochs: int | None = None, lr: float | None = None, lr_mult: float = 10.0, lr_groups: int = 4,
             batch_size: int = 32, optimizer: str = "adamw", weight_decay: float | None = None,
             augment: str = "light", bn: str = "auto", probe: str = "auto", device: str = "auto",
             precision: str = "auto", patience: int = 3, max_train_images: int | None = None,
             image_size: int | None = None, warmup: float = 0.3, seed: int = 0, workers: int | None = None,
             cache="cache", work_dir=None, restart: bool = False, progress: bool = True, notify=None,
             on_epoch_end: Callable[[dict, nn.Module], None] | None = None,
             on_start: Callable[[str], None] | None = None,
             resolved: ResolvedWeights | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``ds`` and write the bundle ``out``.

    Parameters
    ----------
    ds : Dataset
        Trains on its train split; validates on its val split, else on a
        stratified 15 % of train held out
        (:data:`featx.data.HOLD_OUT_VAL_FRACTION`).
    backbone, weights : str
        A registry backbone and a ``--weights`` spec (``none``: random init).
    epochs : int
        All epochs, the ``freeze_epochs`` head-only ones included.
    freeze_epochs : int, optional
        Stage-1 epochs (head only). Default 1 with pretrained weights, 0 from
        random init (a frozen random backbone teaches nothing).
    lr, lr_mult, lr_groups : float, float, int
        Peak learning rate of the head (default 5e-4 AdamW, 1e-2 SGD); the
        stem's is ``lr / lr_mult``; the backbone is cut into ``lr_groups``.
    batch_size, optimizer, weight_decay : int, {"adamw", "sgd"}, float
        SGD has Nesterov momentum 0.9. Weight decay (default 0.05 AdamW,
        1e-4 SGD) spares biases and norm parameters.
    augment : {"light", "standard", "none"}
    bn : {"auto", "train", "frozen"}
        BatchNorm in stage 2; see :mod:`featx.finetune` for ``auto``.
    probe : {"auto", "on", "off"}
        Linear-probe start: ``auto`` with pretrained weights, ``on`` also
        from random init, ``off`` never.
    device, precision : str
        ``auto``: CUDA when present, with bf16 autocast (fp16 with a
        GradScaler where bf16 is missing); fp32 on CPU.
    patience : int
        Stop after this many stage-2 epochs without a better val accuracy
        (0: never).
    max_train_images : int, optional
        Train on a stratified, seeded subset of this size.
    image_size : int, optional
        Train and predict at this crop instead of the weights' (resize
        scaled alike); turns the probe start off.
    warmup : float
        Fraction of stage-2 steps rising to the peak learning rate.
    cache : str or FeatureCache
        Where the probe's features are found or put.
    work_dir : path, optional
        Checkpoint, log.jsonl and training_curves.png (default: beside
        ``out``, see :func:`default_work_dir`). A checkpoint there made with
        the same settings is resumed; ``restart=True`` discards it.
    on_epoch_end : callable, optional
        ``on_epoch_end(record, model)`` after each epoch's checkpoint.
    on_start : callable, optional
        ``on_start(header)`` once the train/val split is known, before any
        epoch: one line saying what is trained (backbone, weights, images,
        the BatchNorm rule).
    resolved : ResolvedWeights, optional
        ``resolve_weights(backbone, weights, seed=seed)`` when the caller has
        it already (a pipeline resolves once, at load); not resolved again.

    Returns
    -------
    FinetuneResult

    Long only by this docstring: the parameters of the public API.
    """
    from ..bundle import check_destination
    t_start = time.perf_counter()
    notify = notify or (lambda msg: None)
    cfg = FinetuneConfig(epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, lr_mult=lr_mult, lr_groups=lr_groups,
                         batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, augment=augment, bn=bn,
                         probe=probe, precision=precision, patience=patience, max_train_images=max_train_images,
                         image_size=image_size, warmup=warmup)
    out = check_destination(out)
    plan = _plan(ds, backbone, weights, cfg, device=device, seed=seed, workers=workers, out=out, work_dir=work_dir,
                 resolved=resolved)
    if on_start is not None:
        # what is trained, before any epoch line (so a piped log reads in order)
        on_start(plan.header)
    ckpt = _open_checkpoint(plan, restart, notify)
    model, heads, start_info = _build_model(plan, ckpt, cache=cache, progress=progress, notify=notify)
    run = _Run(plan, model, heads, start_info, ckpt, progress=progress, notify=notify)
    run.run(on_epoch_end)
    return _write_bundle(run, out, t_start)


def summary_lines(result: FinetuneResult) -> list[str]:
    """What ``featx finetune`` prints at the end."""
    lines = []
    start = result.start
    s0 = result.start_val_acc
    lines.append(f"start: {start['start']} ({start['reason']})" + (f", val acc {s0:.4f}" if s0 is not None else ""))
    if result.best_epoch is not None:
        where = "the start itself" if result.best_epoch == 0 else f"epoch {result.best_epoch}"
        gain = f" ({result.best_val_acc - s0:+.4f} over the start)" if s0 is not None else ""
        lines.append(f"best: {where}, val acc {result.best_val_acc:.4f}{gain}")
    ran = max((r["epoch"] for r in result.history), default=0)
    how = " (interrupted)" if result.interrupted else " (early stop)" if result.stopped_early else ""
    lines.append(f"trained {ran} epoch{'s' if ran != 1 else ''}{how} in {result.seconds:.0f} s; "
                 f"log and curves in {result.work_dir}")
    return lines
