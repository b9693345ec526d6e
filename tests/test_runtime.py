"""ONNX Runtime as the CPU forward pass: the same features as torch, chosen
only where it pays, refused with one clear line where it cannot run."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import featx
from featx.cli import cli
from featx.data import open_dataset
from featx.errors import BackboneError, ConfigError
from featx.extract import (ONNX_MIN_IMAGES, Forward, OnnxForward, cpu_has_native_bf16, extract, load_features,
                           make_forward, resolve_runtime)

SMALL = dict(backbone="resnet18", weights="none", batch_size=5, workers=0, progress=False)  # 24 images: last batch 4
CPU = torch.device("cpu")


def test_onnx_runtime_fills_the_same_cache_entries_with_the_same_features(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    layers = ["layer3", "flatten"]
    by_torch = extract(ds, cache=tmp_path / "t", runtime="torch", layers=layers, **SMALL)
    by_onnx = extract(ds, cache=tmp_path / "o", runtime="onnx", layers=layers, **SMALL)
    assert (by_torch.runtime, by_onnx.runtime) == ("torch", "onnx")
    assert by_onnx.keys == by_torch.keys           # fp32 is fp32: one cache entry, whoever computed it
    assert by_onnx.where == "cpu, onnxruntime"
    for spec in by_torch.specs:
        want, _, ids_t = load_features(tmp_path / "t", spec, ds)
        got, _, ids_o = load_features(tmp_path / "o", spec, ds)
        assert ids_t == ids_o and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_auto_picks_onnx_runtime_for_long_fp32_cpu_runs_only():
    assert resolve_runtime("auto", CPU, "fp32", ONNX_MIN_IMAGES) == "onnx"
    assert resolve_runtime("auto", CPU, "fp32", ONNX_MIN_IMAGES - 1) == "torch"   # export would cost more
    assert resolve_runtime("auto", CPU, "bf16", 10**6) == "torch"
    assert resolve_runtime("auto", torch.device("cuda"), "fp32", 10**6) == "torch"
    assert resolve_runtime("auto", CPU, "fp32", 10**6, compile="on") == "torch"   # torch.compile is torch
    assert resolve_runtime("torch", CPU, "fp32", 10**6) == "torch"
    assert resolve_runtime("onnx", CPU, "fp32", 1) == "onnx"


def test_what_onnx_runtime_cannot_do_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"^--runtime onnx computes in fp32; use --precision fp32"):
        resolve_runtime("onnx", CPU, "bf16", 1000)
    with pytest.raises(ConfigError, match=r"^--runtime onnx runs on the CPU; use --device cpu"):
        resolve_runtime("onnx", torch.device("cuda"), "fp32", 1000)
    with pytest.raises(ConfigError, match=r"^--runtime tensorrt: use one of auto, torch, onnx$"):
        resolve_runtime("tensorrt", CPU, "fp32", 1000)
    lb = featx.load_backbone("resnet18", "none")
    with pytest.raises(ConfigError, match="--compile on is torch.compile"):
        make_forward(lb, ["flatten"], "avg", CPU, "fp32", n_images=1000, compile="on", runtime="onnx")
    # asking for torch.compile means torch, even where auto would pick ONNX Runtime
    assert make_forward(lb, ["flatten"], "avg", CPU, "fp32", n_images=10**4, compile="on").runtime == "torch"
    assert make_forward(lb, ["flatten"], "avg", CPU, "fp32", n_images=10**4).runtime == "onnx"


class FlipsBrightImages(nn.Module):
    """Python control flow on the data: a trace records one branch only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        if x.mean() > 0:    # the export's all-black example takes the other branch
            x = -x
        return self.fc(self.conv(x).mean((2, 3)))


def test_an_export_that_does_not_reproduce_the_network_never_reaches_the_cache():
    lb = featx.load_backbone("resnet18", "none")
    lb = dataclasses.replace(lb, model=FlipsBrightImages().eval())
    with pytest.raises(BackboneError, match=r"ONNX Runtime's output of layer conv differs from torch's .*--runtime torch"):
        OnnxForward(lb, ["conv"], "avg")
    said = []
    fwd = make_forward(lb, ["conv"], "avg", CPU, "fp32", n_images=10**4, notify=said.append)
    assert isinstance(fwd, Forward) and len(said) == 1
    assert re.fullmatch(r"resnet18: ONNX Runtime's output of layer conv differs from torch's "
                        r"\(relative error \S+\); running with torch instead", said[0])
    with pytest.raises(BackboneError):       # asked for explicitly: no silent substitute
        make_forward(lb, ["conv"], "avg", CPU, "fp32", n_images=10**4, runtime="onnx")


def test_cli_extract_with_onnx_runtime(folder_dataset, tmp_path):
    runner = CliRunner()
    base = ["extract", str(folder_dataset), "-b", "resnet18", "-w", "none", "--cache", str(tmp_path / "c"), "-q"]
    r = runner.invoke(cli, base + ["--runtime", "onnx"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "img/s on cpu, onnxruntime)" in r.output
    for extra, message in [(["--precision", "bf16"], "--runtime onnx computes in fp32; use --precision fp32, "
                                                       "or --runtime torch for bf16"),
                           (["--compile", "on"], "--compile on is torch.compile: use it with --runtime torch (or auto)")]:
        r = runner.invoke(cli, base + ["--runtime", "onnx", *extra], catch_exceptions=False)
        assert r.exit_code == 1
        assert r.output == f"Error: {message}\n"     # before the dataset is read (no "dataset ..." line)


def test_a_stored_export_starts_without_torchvision(folder_dataset, tmp_path):
    """The second run reads the stored ONNX export: it builds no network and
    never imports torchvision, whose import of torch._dynamo costs seconds."""
    import subprocess
    import sys
    if not featx.backbones.torchvision_table_is_current():
        pytest.skip("another torchvision is installed: its table is read from torchvision itself")
    args = ["extract", str(folder_dataset), "-b", "mobilenet_v2", "-w", "none", "--runtime", "onnx",
            "--cache", str(tmp_path / "c"), "-q"]
    code = ("import sys; from featx.cli import cli\n"
            "try:\n    cli(sys.argv[1:], standalone_mode=False)\nfinally:\n"
            "    print('imported:', sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "imported: ['torch._dynamo', 'torchvision']" in first.stdout   # export: the network is built
    for entry in (tmp_path / "c").glob("mobilenet_v2-*"):
        import shutil
        shutil.rmtree(entry)                                               # a cold feature cache, the export kept
    second = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "extracted 24 images" in second.stdout and "onnxruntime" in second.stdout
    assert "imported: []" in second.stdout


def test_weights_that_do_not_load_stop_the_run_instead_of_falling_back_to_torch(monkeypatch, tmp_path):
    """The network is built when the ONNX export first needs it; weights that
    fail then fail torch just as well: one error, no 'running with torch'."""
    import featx.backbones as b
    from featx.errors import WeightsError
    from featx.quantize import ModelStore

    def broken(info, rw):
        raise WeightsError(f"{info.name}: the weights file is damaged")
    monkeypatch.setattr(b, "load_state_dict", broken)
    info = b.get_backbone("resnet18")
    lb = b.DeferredBackbone(info, b.resolve_weights(info, "none"))
    said = []
    with pytest.raises(WeightsError, match="damaged"):
        make_forward(lb, ["flatten"], "avg", CPU, "fp32", n_images=10**4, runtime="auto", notify=said.append,
                     store=ModelStore(tmp_path))
    assert said == []


def test_weights_load_before_any_image_unless_the_export_is_stored(folder_dataset, tmp_path, monkeypatch):
    import importlib

    import featx.backbones as b
    from featx.errors import WeightsError
    fx = importlib.import_module("featx.extract")
    ds = open_dataset(folder_dataset)
    opts = dict(runtime="onnx", **SMALL)
    extract(ds, cache=tmp_path / "c", **opts)                 # stores the export
    for entry in (tmp_path / "c").glob("resnet18-*"):
        import shutil
        shutil.rmtree(entry)

    def broken(info, rw):
        raise WeightsError(f"{info.name}: the weights file is damaged")
    monkeypatch.setattr(b, "load_state_dict", broken)
    decoded = []
    real = fx.ImageBatches
    monkeypatch.setattr(fx, "ImageBatches", lambda *a, **k: decoded.append(1) or real(*a, **k))
    again = extract(ds, cache=tmp_path / "c", **opts)          # the stored export needs no weights
    assert again.n_extracted == 24 and decoded == [1]
    again = extract(ds, cache=tmp_path / "new", **opts)        # a new cache folder: the shared export
    assert again.n_extracted == 24 and decoded == [1, 1]
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "other-user"))
    with pytest.raises(WeightsError, match="damaged"):
        extract(ds, cache=tmp_path / "fresh", **opts)         # no export: the weights load first
    assert decoded == [1, 1]                                  # before any image was decoded


def test_the_export_is_made_once_for_every_cache_folder(folder_dataset, tmp_path, featx_home, monkeypatch):
    """The fp32 export comes from the weights alone: kept in the per-user
    folder, a new cache folder starts without exporting, and features from
    either are the same; the cache folders hold features, not networks."""
    import featx.quantize as q
    ds = open_dataset(folder_dataset)
    opts = dict(runtime="onnx", **SMALL)
    first = extract(ds, cache=tmp_path / "a", **opts)
    assert len(list((featx_home / "onnx").glob("resnet18-*.onnx"))) == 1
    exports = []
    real = q.export_onnx
    monkeypatch.setattr(q, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    second = extract(ds, cache=tmp_path / "b", **opts)
    assert exports == [] and second.n_extracted == 24
    assert not (tmp_path / "a" / "onnx").exists() and not (tmp_path / "b" / "onnx").exists()
    np.testing.assert_array_equal(load_features(tmp_path / "a", first.specs[0], ds)[0],
                                  load_features(tmp_path / "b", second.specs[0], ds)[0])


def test_a_damaged_shared_export_is_made_again(folder_dataset, tmp_path, featx_home, monkeypatch):
    import featx.quantize as q
    ds = open_dataset(folder_dataset)
    first = extract(ds, cache=tmp_path / "a", runtime="onnx", **SMALL)
    (shared,) = (featx_home / "onnx").glob("resnet18-*.onnx")
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))
    exports = []
    real = q.export_onnx
    monkeypatch.setattr(q, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    again = extract(ds, cache=tmp_path / "b", runtime="onnx", **SMALL)
    assert exports == [1] and q.ModelStore(tmp_path / "b").get_export(shared.name[:-len(".onnx")]) is not None
    np.testing.assert_allclose(load_features(tmp_path / "b", again.specs[0], ds)[0],
                               load_features(tmp_path / "a", first.specs[0], ds)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("home", ["", "a-file/below"], ids=["turned off", "cannot be written"])
def test_without_a_shared_folder_each_cache_keeps_its_export(folder_dataset, tmp_path, monkeypatch, home):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("FEATX_HOME", home and str(tmp_path / home))
    ds = open_dataset(folder_dataset)
    extract(ds, cache=tmp_path / "c", runtime="onnx", **SMALL)
    (own,) = (tmp_path / "c" / "onnx").glob("resnet18-*.onnx")
    assert (tmp_path / "c" / "onnx" / (own.name + ".sha256")).is_file()
    import featx.quantize as q
    import shutil
    for entry in (tmp_path / "c").glob("resnet18-*"):
        shutil.rmtree(entry)
    monkeypatch.setattr(q, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    assert extract(ds, cache=tmp_path / "c", runtime="onnx", **SMALL).n_extracted == 24


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU has native bf16")
def test_software_bf16_on_the_cpu_is_announced(folder_dataset, tmp_path):
    one = open_dataset(folder_dataset).samples[:1]
    said = []
    extract(one, cache=tmp_path / "c", precision="bf16", device="cpu", notify=said.append, **SMALL)
    assert any(m.startswith("--precision bf16: this CPU computes bf16 in software") for m in said)


def test_more_workers_than_cores_is_not_second_guessed(folder_dataset, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # any warning fails the test
        extract(open_dataset(folder_dataset), cache=tmp_path / "c", **{**SMALL, "workers": 4})
