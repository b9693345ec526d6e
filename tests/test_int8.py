"""--precision int8: ONNX Runtime static quantization, calibrated on the dataset's images."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx import quantize
from featx.cache import FeatureCache
from featx.cli import cli as main
from featx.data import open_dataset
from featx.extract import extract, feature_specs

from .conftest import make_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SMALL = dict(backbone="resnet18", weights="none", batch_size=4, workers=0, progress=False)


def test_calibration_sample_depends_on_content_and_seed_only(folder_dataset):
    ds = open_dataset(folder_dataset)
    a = quantize.calibration_sample(ds.samples, seed=0, n=5)
    assert len(a) == 5 and all(s.split == "train" for s in a)
    assert [s.id for s in quantize.calibration_sample(list(reversed(ds.samples)), seed=0, n=5)] == [s.id for s in a]
    assert {s.id for s in quantize.calibration_sample(ds.samples, seed=1, n=5)} != {s.id for s in a}
    assert quantize.calibration_for(ds.samples).id == quantize.calibration_id(
        s.id for s in quantize.calibration_sample(ds.samples))


def test_int8_entries_have_their_own_keys_and_stay_close_to_fp32(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "c"
    r8 = extract(ds, precision="int8", cache=cache, **SMALL)
    r32 = extract(ds, precision="fp32", cache=cache, **SMALL)
    (s8,), (s32,) = r8.specs, r32.specs
    assert r8.runtime == "onnx" and r8.n_extracted == len(ds.samples)
    assert s8.precision == "int8" and s8.calibration == quantize.calibration_for(ds.samples).id
    assert s8.key != s32.key and "-int8-" in s8.key and s32.calibration == ""
    assert set(FeatureCache(cache).keys()) == {s8.key, s32.key}
    # another calibration (another seed: other images) is another entry
    assert feature_specs("resnet18", "none", precision="int8", calibration="other")[2][0].key != s8.key
    ids = [s.id for s in ds.samples]
    X8, X32 = FeatureCache(cache).read(s8.key, ids), FeatureCache(cache).read(s32.key, ids)
    err = np.linalg.norm(X8 - X32) / np.linalg.norm(X32)
    assert 0 < err < quantize.MAX_RELATIVE_ERROR      # quantized, yet the same features
    shown = CliRunner().invoke(main, ["cache", "info", s8.key, "--cache", str(cache)])
    assert shown.exit_code == 0 and f"calibration  {s8.calibration} (int8 ranges" in shown.output
    assert "calibration" not in CliRunner().invoke(main, ["cache", "info", s32.key, "--cache", str(cache)]).output


def test_quantized_model_is_reused_from_disk(folder_dataset, tmp_path, monkeypatch):
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "c"
    extract(ds, precision="int8", cache=cache, **SMALL)
    stored = sorted(p.name for p in (cache / "onnx").iterdir())
    assert any(n.endswith(".int8.onnx") for n in stored) and any(n.endswith(".ranges.json") for n in stored)
    (key,) = FeatureCache(cache).keys()
    FeatureCache(cache).remove(key)

    def must_not_run(*a, **k):
        raise AssertionError("exported or quantized again")
    monkeypatch.setattr(quantize, "quantize", must_not_run)
    monkeypatch.setattr(quantize, "export_onnx", must_not_run)
    again = extract(ds, precision="int8", cache=cache, **SMALL)
    assert again.n_extracted == len(ds.samples) and again.keys == [key]


def test_damaged_stored_model_is_made_again(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "c"
    first = extract(ds, precision="int8", cache=cache, **SMALL)
    (model,) = (cache / "onnx").glob("*.int8.onnx")
    model.write_bytes(b"\0" * model.stat().st_size)
    FeatureCache(cache).remove(FeatureCache(cache).keys()[0])
    again = extract(ds, precision="int8", cache=cache, **SMALL)
    assert again.n_extracted == len(ds.samples)
    assert model.read_bytes()[:4] != b"\0\0\0\0"
    # a stored model whose ranges are gone is made again too (bundles trained on its features carry them)
    (ranges,) = (cache / "onnx").glob("*.ranges.json")
    ranges.unlink()
    FeatureCache(cache).remove(first.keys[0])
    notes = []
    third = extract(ds, precision="int8", cache=cache, notify=notes.append, **SMALL)
    assert third.keys == first.keys and ranges.exists()
    assert any("measuring activation ranges on" in n for n in notes)


def test_failed_quantization_falls_back_to_fp32_with_one_notice(folder_dataset, tmp_path, monkeypatch):
    import functools

    import onnxruntime.quantization as ortq

    @functools.wraps(ortq.quantize_static)   # the real signature: only running it fails
    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no kernel for you")
    calls = []
    monkeypatch.setattr(ortq, "quantize_static", broken)
    ds = open_dataset(folder_dataset)
    notes = []
    rep = extract(ds, precision="int8", cache=tmp_path / "c", notify=notes.append, **SMALL)
    (spec,) = rep.specs
    assert spec.precision == "fp32" and spec.calibration == "" and rep.n_extracted == len(ds.samples)
    (line,) = [n for n in notes if "int8" in n and "measuring activation ranges" not in n]
    assert "\n" not in line and "no kernel for you" in line and "extracting in fp32 instead" in line
    keys = FeatureCache(tmp_path / "c").keys()
    assert keys == [spec.key] and not any("int8" in k for k in keys)
    assert not list((tmp_path / "c" / "onnx").glob("*int8*"))
    assert not (tmp_path / "c" / "onnx" / "calibrations").exists()   # no int8 ran: no calibration to keep
    fp32 = extract(ds, precision="fp32", cache=tmp_path / "c", **SMALL)
    assert fp32.keys == rep.keys and fp32.n_extracted == 0
    # the failure is recorded (network, calibration, ONNX Runtime version): the next run does not quantize again
    import onnxruntime
    (failed,) = (tmp_path / "c" / "onnx").glob("*.failed")
    record = json.loads(failed.read_text())
    versions = f"{onnxruntime.__version__}+featx{featx.__version__}"   # a new featx or ONNX Runtime tries again
    assert calls == [1] and record["onnxruntime"] == versions
    assert record["calibration"] == quantize.calibration_for(ds.samples).id and "no kernel for you" in record["reason"]
    assert failed.name == f"{record['network']}.{record['calibration']}.ort-{versions.replace('+', '_')}.failed"
    notes.clear()
    again = extract(ds, precision="int8", cache=tmp_path / "c", notify=notes.append, **SMALL)
    assert calls == [1] and again.keys == rep.keys and again.n_extracted == 0
    (line,) = [n for n in notes if "int8" in n and "measuring activation ranges" not in n]
    assert "\n" not in line and "no kernel for you" in line and "extracting in fp32 instead" in line
    assert f"in an earlier run (delete {failed} to try int8 again)" in line
    # deleting the record tries again
    failed.unlink()
    extract(ds, precision="int8", cache=tmp_path / "c", notify=notes.append, **SMALL)
    assert calls == [1, 1] and failed.exists()


def test_int8_option_clashes_are_one_line_errors(folder_dataset, tmp_path):
    r = CliRunner().invoke(main, ["extract", str(folder_dataset), "-b", "resnet18", "--weights", "none",
                                  "--precision", "int8", "--runtime", "torch", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 1, r.output                  # before the dataset is read: one line
    assert r.output.strip().splitlines() == ["Error: --precision int8 runs on ONNX Runtime, not with --runtime "
                                             "torch; use --runtime auto, or --precision fp32"]
    r = CliRunner().invoke(main, ["finetune", str(folder_dataset), "-b", "resnet18", "--precision", "int8",
                                  "--out", str(tmp_path / "m.featx")])
    assert r.exit_code == 2 and "'int8' is not one of" in r.output     # fine-tuning trains in float


@pytest.mark.slow
def test_int8_bundle_predicts_where_the_store_never_saw_the_calibration(split_dataset, tmp_path, monkeypatch):
    ds = open_dataset(split_dataset)
    cache = tmp_path / "c"
    result = featx.train(ds, "resnet18", "logreg", weights="none", precision="int8", grid=[1.0], cache=cache,
                         progress=False, workers=0, batch_size=4)
    out = featx.bundle.save_bundle(tmp_path / "m.featx", result.manifest(ds), result.fit.pipeline)
    manifest = json.loads((out / "manifest.json").read_text())
    (cal,) = manifest["int8"]
    assert cal == result.spec.parts[0].calibration and manifest["int8"][cal]["featx_apply"] == quantize.APPLY
    paths = [str(s.path) for s in ds.subset("test")]
    want = featx.predict(out, paths, cache=cache, progress=False)
    # a new machine: an empty cache and no stored model; the bundle's ranges rebuild the same int8 network
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "new-machine"))
    got = featx.predict(out, paths, cache=tmp_path / "fresh", progress=False)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    np.testing.assert_allclose([r["probability"] for r in got], [r["probability"] for r in want], atol=1e-5)
    assert list((tmp_path / "fresh" / "onnx").glob("*.int8.onnx"))
    # an edited bundle: a calibration id that walks out of the store, ranges that are not finite numbers,
    # a spec this featx does not compute: one line each, nothing written anywhere
    import shutil
    for name, edit, says in (
            ("walk", lambda m: m["features"].update(spec=m["features"]["spec"].replace(cal, "../../../../x")),
             "is not one featx makes"),
            ("nan", lambda m: m["int8"][cal]["data"].update({t: {"lowest": float("nan"), "highest": 1.0}
                                                             for t in m["int8"][cal]["data"]}),
             "not plain, finite tensor ranges"),
            ("crop", lambda m: m["features"].update(spec=m["features"]["spec"].replace('"crop":224', '"crop":999')),
             "are not what this featx computes"),
            ("noranges", lambda m: m.pop("int8"), r"a bundle without ranges predicts with the cache it was "
                                                  r"trained with: --cache\)$"),
            ("apply", lambda m: m["int8"][cal]["featx_apply"].update(activations="int16"),
             "made for another int8 quantization")):
        bad = tmp_path / f"{name}.featx"
        shutil.copytree(out, bad)
        m = json.loads((bad / "manifest.json").read_text())
        edit(m)
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(featx.errors.FeatxError, match=says):
            featx.predict(bad, paths, cache=tmp_path / name, progress=False)
        assert not (tmp_path / name / "onnx").exists() or not list((tmp_path / name / "onnx").glob("*int8*"))
    assert not list(tmp_path.parent.glob("*.int8.onnx")) and not (tmp_path.parent.parent / "x.int8.onnx").exists()
    with pytest.raises(featx.errors.ConfigError, match=r"^--runtime torch cannot compute int8, and m.featx was "
                                                       r"trained on int8 features: use --runtime onnx \(or auto\)$"):
        featx.predict(out, paths, cache=cache, progress=False, runtime="torch")


def test_a_growing_dataset_keeps_its_calibration(folder_dataset, tmp_path):
    cache = tmp_path / "c"
    first = extract(open_dataset(folder_dataset), precision="int8", cache=cache, **SMALL)
    records = (cache / "onnx" / "calibrations").iterdir()
    assert [p.name.split(".")[0] for p in records] == [first.specs[0].calibration]
    for i in range(6):   # new photos; some would enter a fresh seeded sample
        make_image(folder_dataset / "red" / f"new_{i}.png", (200, 40, 40), seed=900 + i)
    ds = open_dataset(folder_dataset)
    assert quantize.calibration_for(ds.samples).id != first.specs[0].calibration   # a fresh sample would differ
    again = extract(ds, precision="int8", cache=cache, **SMALL)
    assert again.keys == first.keys and again.n_extracted == 6     # only the new images
    # another cache knows no calibration: the dataset's own seeded sample
    other = extract(ds, precision="int8", cache=tmp_path / "other", **SMALL)
    assert other.specs[0].calibration == quantize.calibration_for(ds.samples).id


def test_planning_int8_keys_writes_nothing(folder_dataset, tmp_path):
    from featx.extract import calibrated
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "c"
    planned = calibrated(feature_specs("resnet18", "none", precision="int8"), ds.samples, cache)
    assert planned.specs[0].calibration == quantize.calibration_for(ds.samples).id
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    # the extraction the plan foresaw: those keys, and only now the calibration is recorded
    rep = extract(ds, planned, cache=cache, batch_size=4, workers=0, progress=False)
    assert rep.keys == [s.key for s in planned.specs]
    assert list((cache / "onnx" / "calibrations").glob(f"{planned.specs[0].calibration}.*.json"))


def test_int8_with_device_auto_runs_on_the_cpu_even_with_a_gpu(folder_dataset, tmp_path, monkeypatch):
    import torch

    from featx.cli import check_runtime
    from featx.extract import RunOptions, resolve_device
    from featx.pipeline import load_pipeline
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a GPU machine, for the resolvers only
    assert resolve_device("auto").type == "cuda" and resolve_device("auto", "fp32").type == "cuda"
    assert resolve_device("auto", "int8") == torch.device("cpu")
    assert RunOptions(device="auto").check("int8") == torch.device("cpu")
    check_runtime({"precision": "int8", "device": "auto"})             # no "use --device cpu"
    toml = (f'[dataset]\npath = "{folder_dataset}"\n\n[[backbones]]\nname = "resnet18"\nweights = "none"\n'
            f'layers = ["flatten"]\nprecision = "int8"\n\n[output]\ndir = "{tmp_path / "out"}"\n\n'
            '[engine]\ndevice = "auto"\n')
    (tmp_path / "p.toml").write_text(toml)
    assert load_pipeline(tmp_path / "p.toml").backbones[0]["precision"] == "int8"
    # an explicit GPU with int8 stays a one-line error, before the dataset is read
    with pytest.raises(featx.errors.ConfigError, match=r"^--precision int8 runs on the CPU \(ONNX Runtime\); "
                                                       r"use --device cpu$"):
        RunOptions(device="cuda").check("int8")
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "nowhere"), "-b", "resnet18", "--weights", "none",
                                  "--precision", "int8", "--device", "cuda", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --precision int8 runs on the CPU (ONNX Runtime); use --device cpu"]


def test_top_k_keeps_exactly_the_largest_values_batch_by_batch():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(n).astype(np.float32) for n in (5, 300, 1, 0, 1000, 40)]
    for k in (1, 7, 64, 2000):
        top = quantize._TopK(k)
        for b in batches:
            top.add(b)
        want = np.sort(np.concatenate(batches))[-k:]
        np.testing.assert_array_equal(np.sort(top.kept), want)


def _tiny_onnx(path):
    """A real exported network with a signed tensor (Conv) and a non-negative one (Relu)."""
    import torch
    import inspect
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["images"],
                          dynamic_axes={"images": {0: "n"}}, opset_version=quantize.OPSET, **legacy)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    quant_pre_process(str(path), str(path), skip_symbolic_shape=True)
    return net


def test_measured_ranges_are_the_percentile_of_every_images_values(tmp_path, monkeypatch):
    """The ranges are the exact PERCENTILE of |x| over all images (clipped to
    the observed min and max), whatever the batch size; and they agree with
    ONNX Runtime's own (histogram) percentile calibrator."""
    import onnx
    import onnxruntime as ort
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    images = np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32) * 3
    got = quantize.measure_ranges(str(path), images)   # 1 image, then 8 at a time
    monkeypatch.setattr(quantize, "MEASURE_BYTES", 1)   # one image at a time
    assert got == quantize.measure_ranges(str(path), images)
    # every intermediate tensor, computed by brute force
    model = onnx.load(str(path))
    model.graph.output.extend(model.graph.value_info)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {"images": images})))
    assert set(got["data"]) == set(values) | {"images"}
    signed = nonneg = 0
    for t, r in got["data"].items():
        v = (images if t == "images" else values[t]).reshape(-1).astype(np.float64)
        a = np.sort(np.abs(v))
        cut = a[int(np.ceil(quantize.PERCENTILE / 100 * a.size)) - 1]
        if v.min() < 0:
            signed += 1
            assert r["lowest"] == pytest.approx(max(-cut, v.min()), rel=1e-6)
        else:
            nonneg += 1
            assert r["lowest"] == pytest.approx(v.min(), abs=1e-7)
        assert r["highest"] == pytest.approx(min(cut, v.max()), rel=1e-6)
    assert signed and nonneg
    # ONNX Runtime's histogram calibrator estimates the same numbers
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self):
            self.done = False

        def get_next(self):
            if self.done:
                return None
            self.done = True
            return {"images": images}

    cal = create_calibrator(str(path), list(quantize.OP_TYPES), augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"percentile": quantize.PERCENTILE})
    cal.collect_data(Reader())
    theirs = cal.compute_data()
    for t, r in got["data"].items():
        lo, hi = (float(x) for x in theirs[t].range_value)
        assert hi == pytest.approx(r["highest"], rel=0.02, abs=1e-3)
        assert lo == pytest.approx(r["lowest"], rel=0.02, abs=1e-3)


def test_measured_ranges_leave_out_values_that_are_not_finite(tmp_path):
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    images = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    clean = quantize.measure_ranges(str(path), images)
    dirty = images.copy()
    dirty[0, 0, 0, 0], dirty[3, 1, 2, 2] = np.nan, np.inf   # in the first image and a later one
    got = quantize.measure_ranges(str(path), dirty)["data"]["images"]
    assert np.isfinite([got["lowest"], got["highest"]]).all()
    assert got["highest"] == pytest.approx(clean["data"]["images"]["highest"], rel=0.05)
    with pytest.raises(quantize.QuantizationError, match="no calibration image"):
        quantize.measure_ranges(str(path), images[:0])


def test_two_networks_calibrated_on_the_same_images_keep_a_record_each(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    store = quantize.ModelStore(tmp_path)
    a, b = (quantize.calibration_for(ds.samples, network=n) for n in ("resnet18:none", "mobilenet_v2:none"))
    assert a.id == b.id   # the same images and settings: the same id
    store.add_calibration("resnet18:none", a)
    store.add_calibration("mobilenet_v2:none", b)
    assert [c for c, _ in store.calibrations("resnet18:none")] == [a.id]
    assert [c for c, _ in store.calibrations("mobilenet_v2:none")] == [b.id]
    assert len(list((tmp_path / "onnx" / "calibrations").glob("*.json"))) == 2


def test_transient_failures_are_told_apart():
    def chained(outer, inner):
        try:
            raise inner
        except BaseException as e:
            try:
                raise outer from e
            except BaseException as out:
                return out
    assert quantize.is_transient(chained(quantize.QuantizationError("x"), MemoryError()))
    assert quantize.is_transient(chained(quantize.QuantizationError("x"), OSError(28, "No space left on device")))
    assert quantize.is_transient(RuntimeError("onnxruntime: Failed to allocate memory for requested buffer"))
    assert not quantize.is_transient(chained(quantize.QuantizationError("x"), RuntimeError("no kernel for you")))


def test_an_int8_model_onnx_runtime_cannot_run_falls_back_and_a_stored_one_is_made_again(
        folder_dataset, tmp_path, monkeypatch):
    import functools
    from pathlib import Path

    import onnxruntime.quantization as ortq
    real = ortq.quantize_static

    @functools.wraps(real)   # the real quantizer, whose model this ONNX Runtime then cannot load
    def unloadable(model_input, model_output, *a, **k):
        real(model_input, model_output, *a, **k)
        Path(model_output).write_bytes(b"not an onnx model")
    monkeypatch.setattr(ortq, "quantize_static", unloadable)
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "c"
    notes = []
    rep = extract(ds, precision="int8", cache=cache, notify=notes.append, **SMALL)
    assert rep.specs[0].precision == "fp32" and rep.n_extracted == len(ds.samples)
    (line,) = [n for n in notes if "int8" in n and "measuring activation ranges" not in n]
    assert "\n" not in line and "cannot run the int8 network" in line and "use --runtime torch" not in line
    assert len(list((cache / "onnx").glob("*.failed"))) == 1
    monkeypatch.setattr(ortq, "quantize_static", real)
    for f in (cache / "onnx").glob("*.failed"):
        f.unlink()
    good = extract(ds, precision="int8", cache=cache, **SMALL)
    assert good.specs[0].precision == "int8"
    # a stored model that does not load (another ONNX Runtime's, say; its checksum fits) is made again
    (model,) = (cache / "onnx").glob("*.int8.onnx")
    store = quantize.ModelStore(cache)
    net_id, suffix = model.name.split(".", 1)
    store.put(net_id, "." + suffix, b"not an onnx model")
    FeatureCache(cache).remove(good.keys[0])
    again = extract(ds, precision="int8", cache=cache, **SMALL)
    assert again.specs[0].precision == "int8" and again.keys == good.keys
    assert again.n_extracted == len(ds.samples) and model.read_bytes() != b"not an onnx model"


def test_a_bundle_carries_its_ranges_even_when_the_store_cannot_keep_them(split_dataset, tmp_path):
    ds = open_dataset(split_dataset)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "onnx").write_text("not a folder")   # the model store cannot be written
    notes = []
    result = featx.train(ds, "resnet18", "logreg", weights="none", precision="int8", grid=[1.0], cache=cache,
                         progress=False, workers=0, batch_size=4, notify=notes.append)
    assert result.spec.parts[0].precision == "int8"
    said = [n for n in notes if "int8" in n]
    assert any("measuring activation ranges on" in n for n in said)
    assert any("could not be stored" in n and "the next run measures and quantizes again" in n for n in said)
    out = featx.bundle.save_bundle(tmp_path / "m.featx", result.manifest(ds), result.fit.pipeline)
    assert json.loads((out / "manifest.json").read_text())["int8"]
    paths = [str(s.path) for s in ds.subset("test")]
    assert len(featx.predict(out, paths, cache=tmp_path / "fresh", progress=False)) == len(paths)


def test_train_says_its_features_are_int8(split_dataset, tmp_path):
    r = CliRunner().invoke(main, ["train", str(split_dataset), "-b", "resnet18", "--weights", "none", "-c", "logreg",
                                  "--precision", "int8", "--workers", "0", "--cache", str(tmp_path / "c"),
                                  "-o", str(tmp_path / "m.featx")])
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("features: ")]
    assert line.startswith("features: resnet18 flatten (int8), 512 dims; ")


def test_error_text_names_the_error_in_one_line_even_without_a_message():
    from featx.text import error_text
    assert error_text(RuntimeError("no kernel\nfor you")) == "RuntimeError: no kernel"
    assert error_text(ValueError()) == "ValueError: "   # an empty message used to be an IndexError
    assert error_text(OSError("x" * 300), 5) == "OSError: xxxxx"
