"""Every user-facing option, declared once: name, type, default, allowed values, help.

The click options of the commands and the keys of pipeline files are
generated from these tables, and so are their error messages, the way
scikit-learn's ``_parameter_constraints`` drive ``validate_params``. The
library functions take the same names with the same defaults
(``tests/test_options.py`` holds them to it).

To add an option to extraction, say, add one :class:`Option` to
:data:`EXTRACT`; it then appears in ``featx extract -h`` (and every command
that takes extraction options), in the pipeline schema under its table, and
reaches :func:`featx.extract.extract` as a keyword of that name.

Nothing here imports anything heavy: ``featx --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["CLASSIFY", "DATASET", "EXTRACT", "FINETUNE", "LAYOUTS", "Option", "POOLS", "PRECISIONS", "STORAGES",
           "TABLES", "TRAIN_PRECISIONS", "click_options", "defaults", "problem"]

LAYOUTS = ("auto", "csv", "split-folders", "folders", "filenames", "none")
POOLS = ("avg", "max", "avgmax", "none", "cls")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")    # of extraction; int8: ONNX Runtime on the CPU
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")      # of fine-tuning
STORAGES = ("float32", "float16")


@dataclass(frozen=True)
class Option:
    """One option.

    Attributes
    ----------
    name : str
        The keyword of the library function, and the pipeline key.
    kind : {"str", "int", "float", "bool"}
    default : Any
        None: "not set" (the library picks, and the help says how).
    help : str
        One line for ``-h``.
    choices : tuple, optional
        Allowed values.
    low, high : float, optional
        Bounds; ``low_open``/``high_open`` exclude them.
    flag : str, optional
        CLI flag (default ``--name-with-dashes``); ``dest`` the click
        parameter name when it differs from ``name``.
    table : str, optional
        The pipeline table the key lives in (None: command line only).
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    flag: str | None = None
    short: str | None = None
    dest: str | None = None
    table: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def click_type(self):
        import click
        if self.choices is not None:
            return click.Choice(list(self.choices))
        if self.kind == "int":
            if self.low is None and self.high is None:
                return int
            return click.IntRange(None if self.low is None else int(self.low),
                                  None if self.high is None else int(self.high),
                                  min_open=self.low_open, max_open=self.high_open)
        if self.kind == "float":
            if self.low is None and self.high is None:
                return float
            return click.FloatRange(self.low, self.high, min_open=self.low_open, max_open=self.high_open)
        return str

    def click_option(self):
        import click
        decls = [self.cli_flag] + ([self.short] if self.short else []) + ([self.dest] if self.dest else [])
        return click.option(*decls, default=self.default, show_default=self.default is not None,
                            type=self.click_type(), help=self.help)


def problem(option: Option, value) -> str | None:
    """What is wrong with ``value`` for ``option`` (None: nothing), in the words
    both the CLI and pipeline files use."""
    if value is None:
        return None
    if option.choices is not None:
        return None if value in option.choices else f"must be one of {', '.join(map(str, option.choices))}"
    if option.kind in ("int", "float"):
        lo, hi = option.low, option.high
        below = lo is not None and (value <= lo if option.low_open else value < lo)
        above = hi is not None and (value >= hi if option.high_open else value > hi)
        if below or above:
            if lo is not None and hi is not None:
                left, right = "(" if option.low_open else "[", ")" if option.high_open else "]"
                return f"must be in {left}{lo:g}, {hi:g}{right}"
            if lo is not None:
                return f"must be {'above' if option.low_open else 'at least'} {lo:g}"
            return f"must be {'below' if option.high_open else 'at most'} {hi:g}"
    return None


DATASET = (
    Option("layout", "str", "auto", "How labels are given; auto detects; none: images without labels (extract only).",
           choices=LAYOUTS, table="dataset"),
    Option("label_regex", "str", None, "For file-name labels: regex with a 'label' group.", table="dataset"),
    Option("val_fraction", "float", 0.15, "Share of each class for val when the dataset has no split (0: none).",
           low=0, high=1, high_open=True, table="dataset"),
    Option("test_fraction", "float", 0.15, "Share of each class for test when the dataset has no test split "
           "(0: none; then val is the held-out split).", low=0, high=1, high_open=True, table="dataset"),
    Option("seed", "int", 0, "Seed for splits and random init.", table="dataset"),
)

# extraction: what determines the numbers (in the cache key, per backbone) and how they are computed
EXTRACT = (
    Option("pool", "str", "avg", "How feature maps or transformer tokens become vectors; cls: the class token "
           "(ViT, DINOv2), avg/max: over the patch tokens.", choices=POOLS, table="backbones"),
    Option("precision", "str", "auto", "Compute precision, part of the cache key; auto: bf16/fp16 on GPU, fp32 on "
           "CPU (bf16 is faster only on CPUs with AMX/AVX512-BF16; ask for it); int8: ONNX Runtime, calibrated on "
           "up to 128 train images (CPU).", choices=PRECISIONS,
           table="backbones"),
    Option("storage", "str", "float32", "dtype of stored features.", choices=STORAGES, table="backbones"),
    Option("batch_size", "int", None, "Images per forward pass [default: 32 on CPU, the largest that fits (<=256) "
           "on GPU].", low=1, table="engine"),
    Option("device", "str", "auto", "auto, cpu or cuda[:N].", table="engine"),
    Option("workers", "int", None, "Decoding processes [default: from the machine].", low=0, table="engine"),
    Option("compile", "str", "auto", "torch.compile the network (--runtime torch); auto: for runs of 5000+ images "
           "on CPU, 20000+ on GPU.", choices=("auto", "on", "off"), dest="compile_mode", table="engine"),
    Option("runtime", "str", "auto", "What runs the network; auto: ONNX Runtime for fp32 on CPU (runs of 200+ "
           "images), else torch.", choices=("auto", "torch", "onnx"), table="engine"),
)

CLASSIFY = (
    Option("cv", "int", 5, "Folds of stratified CV on train, used when there is no val split.", low=2,
           table="classifiers"),
    Option("final_fit", "str", "train+val", "Rows the final model is fitted on once C is chosen on val (with no "
           "val split: train).", choices=("train", "train+val"), table="classifiers"),
    Option("jobs", "int", -1, "Parallel fits during the search (-1: all cores).", short="-j", table="engine"),
    Option("threads", "int", 1, "BLAS/OpenMP threads per fit; more may speed up one big fit on an idle machine.",
           low=1),
)

FINETUNE = (
    Option("epochs", "int", 5, "All epochs, head-only ones included.", low=1, table="finetune"),
    Option("freeze_epochs", "int", None, "Stage 1: epochs training the head only [default: 1; 0 with --weights none].",
           low=0, table="finetune"),
    Option("lr", "float", None, "Peak learning rate of the head [default: 5e-4 adamw, 0.01 sgd].", low=0,
           low_open=True, table="finetune"),
    Option("lr_mult", "float", 10.0, "The stem learns at LR/M; groups in between geometrically.", low=1,
           table="finetune"),
    Option("lr_groups", "int", 4, "Layer groups the backbone is cut into for discriminative learning rates.", low=1,
           table="finetune"),
    Option("batch_size", "int", 32, "Images per training step.", low=2, table="finetune"),
    Option("optimizer", "str", "adamw", "AdamW, or SGD with Nesterov momentum 0.9.", choices=("adamw", "sgd"),
           table="finetune"),
    Option("weight_decay", "float", None, "Not on biases and norm layers [default: 0.05 adamw, 1e-4 sgd].", low=0,
           table="finetune"),
    Option("augment", "str", "light", "Train-time augmentation: random resized crop, flip, colour jitter (none: the "
           "eval crop).", choices=("light", "standard", "none"), table="finetune"),
    Option("bn", "str", "auto", "BatchNorm in stage 2; auto: frozen statistics for pretrained weights when the batch "
           "is under 16.", choices=("auto", "train", "frozen"), dest="bn_mode", table="finetune"),
    Option("probe", "str", "auto", "Start the head from the logistic regression on cached features; auto: with "
           "pretrained weights.", choices=("auto", "on", "off"), dest="probe_mode", table="finetune"),
    Option("precision", "str", "auto", "Training precision; auto: bf16 (or fp16 with loss scaling) on GPU, fp32 on "
           "CPU.", choices=TRAIN_PRECISIONS, table="finetune"),
    Option("patience", "int", 3, "Stop after this many epochs without a better val accuracy (0: never).", low=0,
           table="finetune"),
    Option("max_train_images", "int", None, "Train on a stratified subset of this many images (for CPU runs).", low=2,
           table="finetune"),
    Option("image_size", "int", None, "Train and predict at this crop instead of the weights' (faster on CPU; no "
           "probe start).", low=32, table="finetune"),
)

TABLES = {"dataset": DATASET, "extract": EXTRACT, "classify": CLASSIFY, "finetune": FINETUNE}


def click_options(options, *, without: tuple = (), help: dict | None = None) -> Callable:
    """A decorator adding the click options of ``options`` (minus ``without``),
    in order; ``help`` overrides the help text of some."""
    chosen = [o for o in options if o.name not in without]

    def decorate(f):
        for o in reversed(chosen):
            if help and o.name in help:
                from dataclasses import replace
                o = replace(o, help=help[o.name])
            f = o.click_option()(f)
        return f
    return decorate


def defaults(options) -> dict:
    """``{name: default}`` of a table."""
    return {o.name: o.default for o in options}
