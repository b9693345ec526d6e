"""Fine-tuning: from a linear probe to the whole network, with the usual schedule.

The optional second regime, for data that frozen features do not fit well.
:func:`finetune` takes a registry backbone and a dataset and writes a model
bundle of kind ``"finetune"`` (``backbone.pt``: the state_dict of the whole
network with its new head) that ``featx evaluate`` and ``featx predict`` read
like any other bundle.

How a run goes
--------------
1. The final classifier layer (``BackboneInfo.head``) is replaced by one with
   a row per class; Inception v3's auxiliary head (``AuxLogits.fc``) too. Its
   loss is added with weight 0.4 in training and it is ignored in eval.
2. **Start.** With pretrained weights and a linear head, the new head starts
   from the linear probe: the logistic regression that ``featx train`` fits on
   the cached penultimate features (the head's input), its C chosen on val,
   its StandardScaler folded exactly into the Linear layer. Missing features
   of the train and val images are extracted first (one frozen inference
   pass, about a third of the cost of one training epoch, and they stay in
   the cache for ``featx train``/``compare``). Otherwise the head starts at
   random (N(0, 0.01), zero bias). Epoch 0 of the log is the start measured
   on val, so the gain of fine-tuning over the probe is read off directly.
3. **Stage 1** (``freeze_epochs``): only the head trains; the backbone's
   parameters and BatchNorm statistics do not change (BN in eval mode).
4. **Stage 2**: everything trains, with discriminative learning rates: the
   backbone's parameters, in definition order, form ``lr_groups`` groups of
   about equal depth (cut only between modules); group i gets
   ``lr / lr_mult ** ((G - i) / G)``, so the stem gets ``lr / lr_mult`` and
   the head ``lr``. One-cycle schedule per batch (OneCycleLR, per-group
   peaks, ``warmup`` of the steps rising from peak/25, then cosine down to
   peak/25e4). No weight decay on biases and norm parameters.
   BatchNorm rule (``bn="auto"``): pretrained statistics stay frozen (eval
   mode, affine parameters still train) when the batch is smaller than
   :data:`BN_MIN_BATCH`, because such batch statistics are noisier than the
   pretrained ones; from :data:`BN_MIN_BATCH` up, and always when training
   from random init, BN uses and updates batch statistics.
5. Train images: random resized crop to the weights' crop size, horizontal
   flip, colour jitter (``augment``); val images: the weights' own
   preprocessing (:func:`featx.preprocess.preprocess_image`), decoded once.
6. After every epoch: val loss and accuracy; the best epoch (by val accuracy,
   the earliest on ties, epoch 0 included) is kept; early stopping after
   ``patience`` stage-2 epochs without improvement; a checkpoint (model,
   optimizer, scheduler, epoch, history, best) is written atomically to the
   work dir, so running the same command again resumes after the last
   finished epoch. Ctrl-C writes the bundle from the best epoch so far.

Modules: :mod:`.config` (the settings, checked once against
:data:`featx.options.FINETUNE`), :mod:`.surgery` (head, layer groups,
parameter groups, optimizer and schedule), :mod:`.probe_start`,
:mod:`.trainer` (the run and its epochs), :mod:`.kind` (the bundle kind).

Reproducibility: each epoch's randomness (shuffling, augmentation, dropout)
comes from a seed made of ``seed`` and the epoch number, so a resumed run
retraces an uninterrupted one; on CPU the same seed gives the same model
(with the same number of data-loading workers).
"""

from .config import AUGMENTS, BN_MIN_BATCH, FinetuneConfig, resolve_train_precision
from .kind import FINETUNE, backbone_from_bundle, build_network, finetune_manifest
from .probe_start import ProbeStart, fold_probe
from .surgery import (build_param_groups, group_lrs, head_names, layer_groups, make_one_cycle, make_optimizer,
                      replace_head)
from .trainer import FinetuneResult, Interrupt, compute_loss, default_work_dir, epoch_seed, finetune, summary_lines

__all__ = [
    "AUGMENTS", "BN_MIN_BATCH", "FINETUNE", "FinetuneConfig", "FinetuneResult", "Interrupt", "ProbeStart",
    "backbone_from_bundle", "build_network", "build_param_groups", "compute_loss", "default_work_dir", "epoch_seed",
    "finetune", "finetune_manifest", "fold_probe", "group_lrs", "head_names", "layer_groups", "make_one_cycle",
    "make_optimizer", "replace_head", "resolve_train_precision", "summary_lines",
]
