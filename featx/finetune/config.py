"""The settings of a fine-tuning run, checked once against :data:`featx.options.FINETUNE`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from ..options import FINETUNE as OPTIONS
from ..options import problem

__all__ = ["AUGMENTS", "BN_MIN_BATCH", "FinetuneConfig", "resolve_train_precision"]

_BY_NAME = {o.name: o for o in OPTIONS}
AUGMENTS = _BY_NAME["augment"].choices
OPTIMIZERS = _BY_NAME["optimizer"].choices
BN_MIN_BATCH = 16
DEFAULT_LR = {"adamw": 5e-4, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}


@dataclass(frozen=True)
class FinetuneConfig:
    """One value per option of :data:`featx.options.FINETUNE` (the same
    names and meanings), plus ``warmup``: the share of stage-2 steps rising
    to the peak learning rate. Checked when made; :meth:`resolved` fills in
    what depends on the weights and the device."""

    epochs: int
    freeze_epochs: int | None
    lr: float | None
    lr_mult: float
    lr_groups: int
    batch_size: int
    optimizer: str
    weight_decay: float | None
    augment: str
    bn: str
    probe: str
    precision: str
    patience: int
    max_train_images: int | None
    image_size: int | None
    warmup: float

    def __post_init__(self):
        for o in OPTIONS:
            value = getattr(self, o.name)
            msg = problem(o, value)
            if msg:
                raise ConfigError(f"{o.cli_flag} {value}: {msg}")
        if not 0 < self.warmup < 1:
            raise ConfigError(f"warmup {self.warmup}: must be between 0 and 1")
        if self.freeze_epochs is not None and self.freeze_epochs > self.epochs:
            raise ConfigError(f"--freeze-epochs {self.freeze_epochs}: must be between 0 and --epochs ({self.epochs})")

    def resolved(self, pretrained: bool, device: torch.device) -> FinetuneConfig:
        """Defaults that depend on the run filled in: ``freeze_epochs`` (1 with
        pretrained weights, 0 from random init: a frozen random backbone
        teaches nothing), ``lr`` and ``weight_decay`` (by optimizer), and the
        training ``precision`` on ``device``."""
        freeze = self.freeze_epochs
        if freeze is None:
            freeze = min(1, self.epochs - 1) if pretrained else 0
        return replace(self, freeze_epochs=freeze,
                       lr=DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr),
                       weight_decay=(DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None
                                     else float(self.weight_decay)),
                       precision=resolve_train_precision(self.precision, device))

    def bn_rule(self, pretrained: bool) -> tuple[bool, str]:
        """Whether BatchNorm keeps its statistics frozen in stage 2, and the rule in words."""
        frozen = self.bn == "frozen" or (self.bn == "auto" and pretrained and self.batch_size < BN_MIN_BATCH)
        text = ("BatchNorm: frozen statistics in stage 1; in stage 2 "
                + ("frozen statistics (eval mode, affine parameters train)" if frozen else "batch statistics")
                + (f" (--bn {self.bn})" if self.bn != "auto" else
                   f" (batch {self.batch_size} {'<' if frozen else '>='} {BN_MIN_BATCH})" if pretrained
                   else " (random init: no pretrained statistics to keep)"))
        return frozen, text


def resolve_train_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on CPU."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16: needs a CUDA GPU; use fp32 or bf16 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
