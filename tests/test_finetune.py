"""Fine-tuning: heads, frozen stage, learning-rate groups and schedule, best epoch,
resume, the linear-probe start, and bundles that evaluate/predict read.

Tiny synthetic colour images; random-init networks (weights none): mobilenet_v2
at 64 px for the training loop, and at its own 224 px where cached features
must match (probe start, CLI).
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featx.finetune as ft
from featx.backbones import get_backbone, list_backbones, load_backbone, resolve_weights
from featx.cli import cli
from featx.data import open_dataset
from featx.errors import ConfigError

from .conftest import make_split_dataset

NET = "mobilenet_v2"    # small checkpoints (14 MB of weights) and BatchNorm throughout
FAST = dict(weights="none", image_size=64, batch_size=6, probe="off", patience=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_split_dataset(root / "colours", counts=(4, 2, 2), file_name="{name}{i}.jpg")
    return {"root": root, "data": root / "colours", "cache": root / "cache", "ds": open_dataset(root / "colours")}


def _state(model_or_path):
    if isinstance(model_or_path, nn.Module):
        return {k: v.detach().clone() for k, v in model_or_path.state_dict().items()}
    return torch.load(model_or_path / "backbone.pt", weights_only=True)


# --------------------------------------------------------------------------
# heads


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_gets_an_n_class_head_shaped_as_a_fresh_build(name):
    info = get_backbone(name)
    # shapes only: on the meta device, except for builders that compute with tensors (RegNet's widths)
    device = "cpu" if name.startswith("regnet") else "meta"
    with torch.device(device):
        model = info.build(num_classes=1000, pretrained=True)
        names = ft.replace_head(model, info, 7)
        fresh = info.build(num_classes=7, pretrained=True)
    assert names == (["fc", "AuxLogits.fc"] if name == "inception_v3" else [info.head])
    for n in names:
        head = model.get_submodule(n)
        assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 7
    # so a bundle's backbone.pt loads strictly into info.build(num_classes)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_inception_aux_loss_counts_0_4_in_training_and_is_ignored_in_eval():
    from torchvision.models import InceptionOutputs
    ce = nn.CrossEntropyLoss()
    logits, aux, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss, main = ft.compute_loss(InceptionOutputs(logits, aux), y, ce)
    assert torch.allclose(loss, ce(logits, y) + 0.4 * ce(aux, y)) and main is logits
    loss, main = ft.compute_loss(logits, y, ce)
    assert torch.allclose(loss, ce(logits, y))

    info = get_backbone("inception_v3")
    with torch.device("meta"):       # shapes only: a real 299 px pass costs seconds
        model = info.build(num_classes=1000)
        ft.replace_head(model, info, 5)
        x = torch.empty(2, 3, 299, 299)
        out = model.train()(x)
        assert out.logits.shape == out.aux_logits.shape == (2, 5)
        assert model.eval()(x).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                                  pytest.param("densenet121", marks=pytest.mark.slow),
                                  pytest.param("inception_v3", marks=pytest.mark.slow)])
def test_the_probe_layer_is_the_heads_input(name):
    """The cached default layer (avg-pooled) is what the head sees in eval mode,
    so a probe fitted on it is a head."""
    from featx.extract import FeatureNet
    from featx.preprocess import Normalize
    info = get_backbone(name)
    torch.manual_seed(0)
    model = info.build(num_classes=10).eval()
    seen = {}
    model.get_submodule(info.head).register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    pre = resolve_weights(name, "none").preprocess
    net = FeatureNet(model, [info.default_layer], "avg", pre)
    size = 80 if name == "inception_v3" else 64
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        feats = net(x)[0]
        model(Normalize(pre)(x))
    assert torch.allclose(feats, seen["x"].flatten(1), atol=1e-5)


# --------------------------------------------------------------------------
# learning rates


def test_layer_groups_discriminative_lrs_and_the_one_cycle_schedule():
    info = get_backbone("resnet18")
    model = info.build(num_classes=3)
    groups = ft.layer_groups(model, ["fc"], 4)
    assert len(groups) == 5
    assert groups[0][0][0] == "conv1.weight" and [n for n, _ in groups[-1]] == ["fc.weight", "fc.bias"]
    names = [n for g in groups for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())   # every parameter, once
    for a, b in zip(groups, groups[1:-1]):                                 # cuts between modules only
        assert a[-1][0].rsplit(".", 1)[0] != b[0][0].rsplit(".", 1)[0]

    pg = ft.build_param_groups(model, ["fc"], lr=1e-3, lr_mult=10, groups=4, weight_decay=0.05)
    peaks = {g["layer_group"]: g["lr"] for g in pg}
    assert peaks == pytest.approx({i: 1e-3 / 10 ** ((4 - i) / 4) for i in range(5)})
    assert peaks[0] == pytest.approx(1e-4) and peaks[4] == 1e-3
    bn_and_bias = {id(model.bn1.weight), id(model.bn1.bias), id(model.fc.bias)}
    assert all(g["weight_decay"] == 0 for g in pg for p in g["params"] if id(p) in bn_and_bias)
    assert any(g["weight_decay"] == 0.05 for g in pg for p in g["params"] if p is model.fc.weight)

    maxima = np.array([g["lr"] for g in pg])     # the optimizer takes these dicts over
    opt = ft.make_optimizer("adamw", pg)
    sched = ft.make_one_cycle(opt, total_steps=20, warmup=0.3)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step() if len(lrs) < 20 else None
    lrs = np.array(lrs)
    assert np.allclose(lrs[0], maxima / 25)                          # warm-up starts at peak/25
    assert (lrs.argmax(0) == 5).all()                                # peak after round(0.3 * 20) - 1 steps
    assert np.allclose(lrs[5], maxima)
    assert np.allclose(lrs[-1], maxima / 25 / 1e4)                   # annealed to peak/25e4
    assert (np.diff(lrs[:6], axis=0) > 0).all() and (np.diff(lrs[5:], axis=0) < 0).all()


# --------------------------------------------------------------------------
# the training loop


def test_stage_one_changes_the_head_and_nothing_else(data, tmp_path):
    before = _state(load_backbone(NET, "none").model)
    after = {}
    ft.finetune(data["ds"], NET, tmp_path / "m.featx", epochs=1, freeze_epochs=1, **FAST,
                on_epoch_end=lambda rec, model: after.update(_state(model)))
    head = "classifier.1."
    body = [k for k in before if not k.startswith(head)]
    assert any("running_mean" in k for k in body)
    assert all(torch.equal(before[k], after[k]) for k in body)   # weights and BatchNorm statistics
    torch.manual_seed(0)
    start = load_backbone(NET, "none").model
    ft.replace_head(start, get_backbone(NET), 3)
    assert not torch.equal(after[head + "weight"], start.classifier[1].weight)


def test_the_best_epoch_is_kept_and_training_stops_early(data, tmp_path, monkeypatch):
    accs = iter([0.2, 0.5, 0.9, 0.7, 0.6, 0.99, 0.99])
    monkeypatch.setattr(ft.trainer, "_evaluate", lambda *a, **k: (1.0, next(accs)))
    states = {}
    res = ft.finetune(data["ds"], NET, tmp_path / "m.featx", epochs=6, freeze_epochs=1,
                      **{**FAST, "patience": 2}, on_epoch_end=lambda rec, model: states.update({rec["epoch"]: _state(model)}))
    assert (res.best_epoch, res.best_val_acc, res.stopped_early) == (2, 0.9, True)
    assert [r["epoch"] for r in res.history] == [0, 1, 2, 3, 4]          # 2 epochs past the best: stop
    saved = _state(res.bundle)
    assert all(torch.equal(saved[k], states[2][k]) for k in saved)
    manifest = json.loads((res.bundle / "manifest.json").read_text())
    assert manifest["finetune"]["best_epoch"] == 2 and manifest["kind"] == "finetune"
    log = [json.loads(line) for line in (res.work_dir / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["start", "head", "full", "full", "full"]
    assert len(log[2]["lrs"]) == 5 and (res.work_dir / "training_curves.png").stat().st_size > 0


def test_an_interrupted_run_resumes_to_the_same_model(data, tmp_path):
    """Stopped inside the one-cycle stage, so optimizer and scheduler state must come back too."""
    kw = dict(epochs=2, freeze_epochs=0, seed=3, **FAST)
    whole = ft.finetune(data["ds"], NET, tmp_path / "a.featx", **kw)

    def stop_after_1(rec, model):
        if rec["epoch"] == 1:
            raise ft.Interrupt()
    with pytest.raises(ft.Interrupt):
        ft.finetune(data["ds"], NET, tmp_path / "b.featx", on_epoch_end=stop_after_1, **kw)
    assert not (tmp_path / "b.featx").exists() and (tmp_path / "b.finetune" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match=r"other settings \(lr differ\); pass --restart"):
        ft.finetune(data["ds"], NET, tmp_path / "b.featx", **{**kw, "lr": 1e-2})
    resumed = ft.finetune(data["ds"], NET, tmp_path / "b.featx", **kw)
    assert resumed.resumed_from == 1
    a, b = _state(whole.bundle), _state(resumed.bundle)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_keyboard_interrupt_writes_the_best_model_so_far(data, tmp_path):
    def ctrl_c(rec, model):
        raise KeyboardInterrupt
    res = ft.finetune(data["ds"], NET, tmp_path / "m.featx", epochs=3, freeze_epochs=1, **FAST,
                      on_epoch_end=ctrl_c)
    assert res.interrupted and res.bundle.is_dir() and [r["epoch"] for r in res.history] == [0, 1]
    assert json.loads((res.bundle / "manifest.json").read_text())["finetune"]["interrupted"] is True


# --------------------------------------------------------------------------
# linear-probe start


def test_folding_the_scaler_reproduces_the_logistic_regression():
    from featx.classify import fit_classifier
    rng = np.random.default_rng(0)
    for n_classes, absent in ((2, None), (4, None), (4, 2)):
        X = rng.normal(size=(60, 8)) * rng.uniform(0.1, 20, 8) + rng.normal(size=8) * 5
        y = rng.integers(0, n_classes, 60)
        if absent is not None:
            y[y == absent] = 0
        pipe = fit_classifier("logreg", X, y, grid=[1.0], seed=0).pipeline
        W, b = ft.fold_probe(pipe, n_classes)
        proba = torch.softmax(torch.from_numpy(X @ W.T + b), 1).numpy()
        present = pipe.named_steps["clf"].classes_
        assert np.allclose(proba[:, present], pipe.predict_proba(X), atol=1e-10)
        assert (proba.argmax(1) == pipe.predict(X)).all()


@pytest.fixture(scope="module")
def finetuned(data):
    """mobilenet_v2 (random init, 224 px) fine-tuned through the CLI with a probe start."""
    model = data["root"] / "m.featx"
    r = CliRunner().invoke(cli, [str(a) for a in [
        "finetune", data["data"], "-b", "mobilenet_v2", "-w", "none", "--probe", "on", "--epochs", "1",
        "--freeze-epochs", "1", "--batch-size", "6", "--cache", data["cache"], "-q", "-o", model]])
    assert r.exit_code == 0, r.output
    return {"model": model, "result": r}


def test_the_probe_start_predicts_exactly_as_the_logistic_regression(data, finetuned):
    """Epoch 0 of the run is the probe: the network with the folded head gives
    the regression's probabilities on the cached features."""
    from featx.cache import FeatureCache
    from featx.classify import fit_classifier
    from featx.extract import ImageFiles, feature_specs
    from featx.finetune.probe_start import _apply_probe
    from featx.preprocess import Normalize
    ds = data["ds"]
    key = feature_specs("mobilenet_v2", "none", precision="fp32")[2][0].key
    cache = FeatureCache(data["cache"])
    train, test = ds.subset("train"), ds.subset("val")
    pipe = fit_classifier("logreg", cache.read(key, [s.id for s in train]), ds.labels(train), grid=[1.0]).pipeline
    lb = load_backbone("mobilenet_v2", "none")
    info = get_backbone("mobilenet_v2")
    ft.replace_head(lb.model, info, 3)
    W, b = ft.fold_probe(pipe, 3)
    _apply_probe(lb.model, info, ft.ProbeStart("linear-probe", "", weight=W, bias=b))
    x = torch.stack([ImageFiles([s.path for s in test], lb.preprocess)[i][0] for i in range(len(test))])
    with torch.no_grad():
        proba = torch.softmax(lb.model.eval()(Normalize(lb.preprocess)(x)), 1).numpy()
    expected = pipe.predict_proba(cache.read(key, [s.id for s in test]))
    assert np.allclose(proba, expected, atol=1e-4) and (proba.argmax(1) == expected.argmax(1)).all()

    manifest = json.loads((finetuned["model"] / "manifest.json").read_text())
    start = manifest["finetune"]["start"]
    assert start["start"] == "linear-probe" and start["features_key"] == key
    assert manifest["finetune"]["start_val_acc"] == pytest.approx(start["probe_val_acc"])


# --------------------------------------------------------------------------
# CLI and bundles


def test_cli_finetune_output_and_bundle(finetuned):
    out = finetuned["result"].stdout.splitlines()
    assert out[0].startswith("mobilenet_v2 from none:seed=0: train 12, val 6 (val split); BatchNorm: frozen statistics")
    assert out[1].startswith("start: linear-probe (logistic regression on flatten features extracted now (C=")
    assert out[2].startswith("best: ") and out[3].startswith("trained 1 epoch in ")
    assert out[-1] == f"wrote {finetuned['model']}"
    # stdout and stderr in the order they were written: the header comes before the epochs
    both = finetuned["result"].output.splitlines()
    header = next(i for i, line in enumerate(both) if line.startswith("mobilenet_v2 from none:seed=0: train 12"))
    first_epoch = next(i for i, line in enumerate(both) if line.lstrip().startswith("epoch"))
    assert header < first_epoch
    files = sorted(p.name for p in finetuned["model"].iterdir())
    assert files == ["backbone.pt", "log.jsonl", "manifest.json", "training_curves.png"]
    m = json.loads((finetuned["model"] / "manifest.json").read_text())
    assert m["kind"] == "finetune" and m["classes"] == ["blue", "green", "red"]
    assert m["backbone"]["started_from"]["identity"] == "none:seed=0" and m["backbone"]["preprocess"]["crop"] == 224
    assert m["backbone"]["weights_identity"] == "file:" + m["files"]["backbone.pt"]["sha256"]


def test_evaluate_and_predict_read_a_finetune_bundle(data, finetuned, tmp_path):
    run = CliRunner()
    r = run.invoke(cli, ["evaluate", str(finetuned["model"]), str(data["data"]), "--cache", str(data["cache"]),
                         "-q", "-o", str(tmp_path / "ev")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.stdout and (tmp_path / "ev" / "metrics.json").is_file()
    r = run.invoke(cli, ["predict", str(finetuned["model"]), str(data["data"] / "test" / "red"), "--format", "json",
                         "-q", "--cache", str(data["cache"])], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and all(row["error"] is None and 0 < row["probability"] <= 1 for row in rows)


def test_backbone_from_bundle_gives_the_finetuned_weights_their_own_identity(finetuned):
    from featx.backbones import sha256_of
    name, rw, state = ft.backbone_from_bundle(finetuned["model"])
    assert name == "mobilenet_v2" and rw.kind == "file"
    assert rw.identity == "file:" + sha256_of(finetuned["model"] / "backbone.pt") != "none:seed=0"
    lb = load_backbone(name, resolved=rw)                  # loads strictly, 3-class head
    assert lb.model.classifier[1].out_features == 3
    assert all(torch.equal(v, lb.model.state_dict()[k]) for k, v in state.items())
    # --weights BUNDLE/backbone.pt names the same weights (same cache entries at the bundle's preprocessing)
    from featx.extract import feature_specs
    _, rw2, specs = feature_specs(name, str(finetuned["model"] / "backbone.pt"))
    assert rw2.identity == rw.identity == specs[0].weights and specs[0].preprocess == rw.preprocess.as_dict()


def test_extract_backbone_from_a_bundle_fills_its_own_cache_entry(data, finetuned, tmp_path):
    run = CliRunner()
    r = run.invoke(cli, ["extract", str(data["data"]), "--backbone-from", str(finetuned["model"]), "-q",
                         "--cache", str(tmp_path / "c")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    from featx.cache import FeatureCache
    (key,) = FeatureCache(tmp_path / "c").keys()
    assert key.startswith("mobilenet_v2-file") and "-flatten-avg-" in key
    info = FeatureCache(tmp_path / "c").info(key)
    assert info.spec.weights.startswith("file:") and info.dim == 1280
    r = run.invoke(cli, ["extract", str(data["data"]), "--backbone-from", str(finetuned["model"]), "-b", "resnet18",
                         "--cache", str(tmp_path / "c")])
    assert r.exit_code == 2 and f"--backbone-from takes the network from {finetuned['model']}; drop --backbone" in r.output


def test_cli_errors_are_one_line(data, tmp_path):
    run = CliRunner()
    r = run.invoke(cli, ["finetune", str(data["data"]), "-b", "resnet9000", "-o", str(tmp_path / "x.featx")])
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith("Error: unknown backbone 'resnet9000'; known:")
    r = run.invoke(cli, ["finetune", str(data["data"]), "-w", "none", "--epochs", "2", "--freeze-epochs", "3",
                         "-o", str(tmp_path / "x.featx")])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == "Error: --freeze-epochs 3: must be between 0 and --epochs (2)"
    (tmp_path / "file.featx").write_text("")
    r = run.invoke(cli, ["finetune", str(data["data"]), "-o", str(tmp_path / "file.featx")])
    assert r.exit_code == 1 and "exists and is not a featx bundle" in r.output


def test_stratified_subset_keeps_every_class_and_is_deterministic(data):
    from featx.data import Sample, stratified_take
    from pathlib import Path
    samples = [Sample(Path(f"{c}{i}.jpg"), c, "train", f"{c}{i}") for c, n in (("a", 50), ("b", 10), ("c", 2))
               for i in range(n)]
    sub = stratified_take(samples, 20, seed=0)
    counts = {c: sum(s.label == c for s in sub) for c in "abc"}
    assert len(sub) == 20 and counts["c"] >= 1 and counts["a"] > counts["b"] > 0
    assert sub == stratified_take(samples, 20, seed=0) != stratified_take(samples, 20, seed=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains(data, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    res = ft.finetune(data["ds"], NET, tmp_path / "m.featx", epochs=2, freeze_epochs=1, device="cuda",
                      precision=precision, **FAST)
    assert all(np.isfinite(r["val_loss"]) for r in res.history)
