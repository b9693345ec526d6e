"""Network surgery for fine-tuning: the new head, layer groups, optimizer parameter groups.

The final classifier layer (``BackboneInfo.head``, and Inception v3's
``AuxLogits.fc``) is replaced by one with a row per class; in stage 2 the
backbone's parameters, in definition order, form groups of about equal
depth with geometric learning rates, weight decay sparing biases and norm
parameters.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..backbones import BackboneInfo
from ..errors import ConfigError
from .config import OPTIMIZERS

__all__ = ["build_param_groups", "group_lrs", "head_names", "layer_groups", "make_one_cycle", "make_optimizer",
           "replace_head"]


def head_names(info: BackboneInfo, model: nn.Module) -> list[str]:
    """Dotted names of the classifier layers to replace: ``info.head``, plus
    Inception v3's auxiliary classifier when the model has one."""
    names = [info.head]
    if getattr(model, "AuxLogits", None) is not None:
        names.append("AuxLogits.fc")
    return names


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):   # SqueezeNet: a 1x1 conv, then ReLU and pooling
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride,
                        padding=old.padding, bias=old.bias is not None)
    else:
        raise ConfigError(f"cannot replace a head of type {type(old).__name__}")
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    if new.weight.device.type != "meta":
        nn.init.normal_(new.weight, 0.0, 0.01)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def replace_head(model: nn.Module, info: BackboneInfo, num_classes: int) -> list[str]:
    """Give ``model`` a fresh ``num_classes``-way head (and aux head); returns their names.

    The new layers are initialised N(0, 0.01) with zero bias (seed torch
    first for a reproducible head). Same shapes as ``info.build(num_classes)``,
    so a bundle's ``backbone.pt`` loads strictly into a freshly built model.
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    names = head_names(info, model)
    for name in names:
        model.set_submodule(name, _new_head(model.get_submodule(name), num_classes))
    return names


def _head_parameter_names(model: nn.Module, heads: Sequence[str]) -> set[str]:
    return {f"{h}.{n}" for h in heads for n, _ in model.get_submodule(h).named_parameters()}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))


def layer_groups(model: nn.Module, heads: Sequence[str], groups: int) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters in definition order, cut into ``groups``
    groups of about equal depth (equal numbers of parameter tensors, cuts
    only between modules), then the head's parameters as the last group."""
    head_params = _head_parameter_names(model, heads)
    body = [(n, p) for n, p in model.named_parameters() if n not in head_params]
    head = [(n, p) for n, p in model.named_parameters() if n in head_params]
    owner = [n.rsplit(".", 1)[0] for n, _ in body]
    cuts = [0]
    for g in range(1, groups):
        i = max(math.ceil(g * len(body) / groups), cuts[-1] + 1)
        while 0 < i < len(body) and owner[i] == owner[i - 1]:
            i += 1
        if i < len(body):
            cuts.append(i)
    cuts.append(len(body))
    out = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    return out + [head]


def group_lrs(lr: float, lr_mult: float, groups: int) -> list[float]:
    """Peak learning rates of ``groups`` backbone groups then the head:
    geometric from ``lr / lr_mult`` (stem) to ``lr`` (head)."""
    return [lr / lr_mult ** ((groups - i) / groups) for i in range(groups)] + [lr]


def build_param_groups(model: nn.Module, heads: Sequence[str], *, lr: float, lr_mult: float, groups: int,
                       weight_decay: float) -> list[dict]:
    """Optimizer parameter groups for stage 2: per layer group (see
    :func:`layer_groups`) one group with weight decay and one without (biases
    and norm parameters). Each dict carries ``layer_group`` (0 = stem, last =
    head) and ``lr`` (the peak)."""
    parts = layer_groups(model, heads, groups)
    lrs = group_lrs(lr, lr_mult, len(parts) - 1)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    out = []
    for i, (part, group_lr) in enumerate(zip(parts, lrs)):
        decay = [p for _, p in part if p.ndim > 1 and id(p) not in norm_params]
        no_decay = [p for _, p in part if not (p.ndim > 1 and id(p) not in norm_params)]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": group_lr, "weight_decay": wd, "layer_group": i})
    return out


def _head_param_groups(model: nn.Module, heads: Sequence[str], lr: float, weight_decay: float) -> list[dict]:
    params = [p for h in heads for p in model.get_submodule(h).parameters()]
    return [{"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay, "layer_group": 0},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0, "layer_group": 0}]


def make_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    groups = [g for g in param_groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    raise ConfigError(f"--optimizer {name}: use one of {', '.join(OPTIMIZERS)}")


def make_one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.3):
    """OneCycleLR with each group's current ``lr`` as its peak: ``warmup`` of
    the steps rising (cosine) from peak/25, the rest annealing to peak/25e4.
    The peak is reached after step ``round(warmup * total_steps) - 1``."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(1, int(total_steps)), pct_start=warmup,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4)


def _set_trainable(model: nn.Module, heads: Sequence[str], stage: str) -> None:
    head_params = _head_parameter_names(model, heads)
    for n, p in model.named_parameters():
        p.requires_grad_(stage == "full" or n in head_params)


def _train_mode(model: nn.Module, bn_frozen: bool) -> None:
    model.train()
    if bn_frozen:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
