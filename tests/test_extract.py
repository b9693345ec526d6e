"""Extraction into the HDF5 cache: keys, incremental runs, resume, locking."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

import featx
from featx.cache import FeatureCache, FeatureSpec
from featx.data import open_dataset
from featx.errors import BackboneError, CacheError, ImageError, WeightsError
from featx.extract import extract, feature_specs, load_features

from .conftest import COLOURS, make_image

SMALL = dict(backbone="resnet18", weights="none", batch_size=4, workers=0, progress=False)


def test_cache_key_is_stable_and_changes_with_what_changes_the_numbers():
    _, _, (a,) = feature_specs("resnet18", "none")
    _, _, (b,) = feature_specs("resnet18", "none")
    assert a.key == b.key and a.key.startswith("resnet18-none-flatten-avg-fp32-")
    variants = [
        feature_specs("resnet18", "none", ["layer3"])[2][0],
        feature_specs("resnet18", "none", pool="max")[2][0],
        feature_specs("resnet18", "none", precision="bf16")[2][0],
        feature_specs("resnet18", "none", storage="float16")[2][0],
        feature_specs("resnet18", "none", seed=1)[2][0],
        feature_specs("resnet34", "none")[2][0],
    ]
    keys = {a.key} | {v.key for v in variants}
    assert len(keys) == 7
    assert FeatureSpec.from_json(a.canonical()) == a


def test_extract_writes_a_plain_hdf5_entry_and_second_run_extracts_nothing(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    cache = tmp_path / "cache"
    r1 = extract(ds, cache=cache, **SMALL)
    assert (r1.n_images, r1.n_extracted, r1.n_cached) == (24, 24, 0)
    log = json.loads((cache / r1.keys[0] / "log.json").read_text())    # plain json and h5py, no featx
    assert log["key"] == r1.keys[0] and "torch" in log["versions"] and log["dim"] == 512
    (segment,) = log["segments"]
    with h5py.File(cache / r1.keys[0] / segment["name"], "r") as f:
        assert f["features"].shape == (24, 512) and f["features"].dtype == np.float32
        assert f["ids"].shape == (24,) and segment["rows"] == 24
        assert f.attrs["key"] == r1.keys[0]
    (dataset,) = log["datasets"]
    manifest = json.loads((cache / "datasets" / f"{dataset['id']}.json").read_text())
    assert sorted({s["label"] for s in manifest["samples"]}) == ["blue", "green", "red"]
    r2 = extract(ds, cache=cache, **SMALL)
    assert (r2.n_extracted, r2.n_cached) == (0, 24)
    assert not any(p.name.endswith((".tmp", ".parts")) for p in cache.iterdir())


def test_features_match_a_direct_forward_pass(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    rep = extract(ds, cache=tmp_path / "c", **SMALL)
    X, y, ids = load_features(tmp_path / "c", rep.specs[0], ds, "train")
    assert X.shape == (len(ds.subset("train")), 512) and len(y) == len(ids)
    # the same image by hand: torchvision preprocessing, avgpool output
    from torchvision.models import ResNet18_Weights
    lb = featx.load_backbone("resnet18", "none")
    sample = ds.subset("train")[0]
    x = ResNet18_Weights.IMAGENET1K_V1.transforms()(featx.load_image(sample.path)).unsqueeze(0)
    trunk = torch.nn.Sequential(*list(lb.model.children())[:-1])
    with torch.inference_mode():
        expected = trunk(x).flatten(1).numpy()[0]
    np.testing.assert_allclose(X[0], expected, rtol=1e-3, atol=1e-4)


def test_new_images_extract_only_the_new_ones_and_duplicates_once(folder_dataset, tmp_path):
    cache = tmp_path / "cache"
    extract(open_dataset(folder_dataset), cache=cache, **SMALL)
    for i in range(3):
        make_image(folder_dataset / "red" / f"new_{i}.png", COLOURS["red"], seed=500 + i)
    dup = folder_dataset / "blue" / "copy_of_red_0.png"
    dup.write_bytes((folder_dataset / "red" / "red_0.png").read_bytes())
    r = extract(open_dataset(folder_dataset), cache=cache, **SMALL)
    assert r.n_extracted == 3 and r.n_cached == 24 and r.n_images == 27
    assert FeatureCache(cache).info(r.keys[0]).n == 27


def test_several_layers_in_one_pass_and_only_missing_layers(folder_dataset, tmp_path):
    ds = open_dataset(folder_dataset)
    cache = FeatureCache(tmp_path / "c")
    r = extract(ds, cache=cache, layers=["layer2", "flatten"], pool="avgmax", **SMALL)
    dims = [cache.info(k).dim for k in r.keys]
    assert dims == [128 * 2, 512]  # avgmax doubles conv maps; vectors stay as they are
    r2 = extract(ds, cache=cache, layers=["layer3", "flatten"], pool="avgmax", **SMALL)
    assert r2.n_extracted == 24
    flatten_key = r.keys[1]
    assert cache.info(flatten_key).n == 24


def test_bad_images_are_skipped_or_fail_with_strict(folder_dataset, tmp_path):
    (folder_dataset / "red" / "zero.png").write_bytes(b"")
    (folder_dataset / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = open_dataset(folder_dataset)
    r = extract(ds, cache=tmp_path / "c", **SMALL)
    reasons = dict(r.skipped)
    assert len(r.skipped) == 2 and r.n_extracted == 24
    assert any(p.endswith("zero.png") for p in reasons)
    with pytest.raises(ImageError, match=r"broken\.png: .*--strict"):
        extract(ds, cache=tmp_path / "c2", strict=True, **SMALL)
    X, _, ids = load_features(tmp_path / "c", r.specs[0], ds, skip_missing=True)
    assert len(ids) == 24
    with pytest.raises(CacheError, match="2 of 26 images are not in this entry"):
        load_features(tmp_path / "c", r.specs[0], ds)


def test_float16_storage(folder_dataset, tmp_path):
    r = extract(open_dataset(folder_dataset), cache=tmp_path / "c", storage="float16", **SMALL)
    (segment,) = (tmp_path / "c" / r.keys[0]).glob("seg-*.h5")
    with h5py.File(segment) as f:
        assert f["features"].dtype == np.float16


def test_weights_file_that_does_not_fit_fails_before_reading_images(folder_dataset, tmp_path):
    bad = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1), "something.else": torch.zeros(2)}, bad)
    with pytest.raises(WeightsError, match=r"wrong\.pth: does not fit resnet18: missing \d+ keys \(bn1\..*unexpected 1 keys \(something\.else\)"):
        extract(open_dataset(folder_dataset), "resnet18", weights=str(bad), cache=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5"))


def test_weights_file_round_trip_gives_the_same_features(folder_dataset, tmp_path):
    lb = featx.load_backbone("resnet18", "none", seed=3)
    path = tmp_path / "r18.pth"
    torch.save(lb.model.state_dict(), path)
    ds = open_dataset(folder_dataset)
    a = extract(ds, cache=tmp_path / "c", seed=3, **SMALL)
    b = extract(ds, "resnet18", weights=str(path), cache=tmp_path / "c", batch_size=4, workers=0, progress=False)
    assert a.keys != b.keys
    Xa, _, _ = load_features(tmp_path / "c", a.specs[0], ds)
    Xb, _, _ = load_features(tmp_path / "c", b.specs[0], ds)
    np.testing.assert_allclose(Xa, Xb, rtol=1e-5, atol=1e-6)


def test_unknown_layer_suggests_close_names(folder_dataset, tmp_path):
    with pytest.raises(BackboneError, match=r"--layer layer5: no such layer in resnet18; did you mean layer4, .*featx layers resnet18"):
        extract(open_dataset(folder_dataset), layers=["layer5"], cache=tmp_path / "c", **SMALL)


def test_layer_table_lists_blocks_with_shapes():
    rows = featx.layer_table("resnet18")
    by = {r["layer"]: r for r in rows}
    assert by["layer3"]["shape"] == (256, 14, 14)
    assert by["flatten"]["default"] and by["flatten"]["avg_dim"] == 512


# ---- crash safety and concurrency (real processes)

SCRIPT = textwrap.dedent("""
    import sys, featx
    ds = featx.open_dataset(sys.argv[1])
    r = featx.extract(ds, "resnet18", weights="none", batch_size=int(sys.argv[3]), workers=0,
                      cache=sys.argv[2], progress=False)
    print("extracted", r.n_extracted, "cached", r.n_cached, "resumed", r.n_resumed, flush=True)
""")


def _many_images(root, n):
    for i in range(n):
        name = list(COLOURS)[i % 3]
        make_image(root / name / f"{i}.png", COLOURS[name], seed=1000 + i)
    return root


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_without_losing_batches(tmp_path):
    data = _many_images(tmp_path / "data", 60)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(data), str(cache), "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = None
    deadline = time.time() + 120
    while time.time() < deadline:
        parts = list(cache.glob("*.parts/*.h5"))
        if len(parts) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert parts and len(parts) >= 4, "the run never wrote a part"
    assert not list(cache.glob("*/log.json"))  # nothing committed yet
    _, _, (spec,) = feature_specs("resnet18", "none")
    info = FeatureCache(cache).info(spec.key)      # what `featx cache info` shows meanwhile
    assert info.n == 0 and info.pending_rows == 2 * info.pending_parts >= 2 * len(parts)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(cache), "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    extracted, resumed = int(done.stdout.split()[1]), int(done.stdout.split()[5])
    assert resumed >= 2 * len(parts) - 2 and extracted + resumed >= 60 and extracted < 60
    ds = open_dataset(data)
    _, _, (spec,) = feature_specs("resnet18", "none")
    X, _, ids = load_features(cache, spec, ds)
    assert len(set(ids)) == 60
    fresh = tmp_path / "fresh"
    extract(ds, cache=fresh, **SMALL)
    Xf, _, _ = load_features(fresh, spec, ds)
    np.testing.assert_allclose(X, Xf, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_writing_one_cache_do_not_corrupt_it(tmp_path):
    data = _many_images(tmp_path / "data", 30)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(data), str(cache), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    counts = sorted(int(o[0].split()[1]) for o in outs)
    assert counts == [0, 30]  # the second waited, then found everything cached
    _, _, (spec,) = feature_specs("resnet18", "none")
    info = FeatureCache(cache).info(spec.key)
    assert info.n == 30 and info.pending_parts == 0


def _photo_like(path, size=(640, 480)):
    """Smooth colour gradients plus noise, saved as JPEG: resampling has work to do."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(3)
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 12, (h, w, 3))
    from PIL import Image
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize("interpolation, levels", [("bilinear", 1), ("bicubic", 2)])
def test_tensor_resize_stays_within_a_grey_level_or_two_of_pils(tmp_path, interpolation, levels):
    from featx.backbones import Preprocess
    from featx.extract import preprocess_image
    pre = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation)
    for size in [(640, 480), (300, 500), (200, 150)]:      # down, down (portrait), up
        im = featx.load_image(_photo_like(tmp_path / f"{size}.jpg", size))
        fast, pil = preprocess_image(im, pre), preprocess_image(im, pre, pil_resize=True)
        assert fast.shape == pil.shape == (3, 224, 224) and fast.dtype == pil.dtype == torch.uint8
        diff = (fast.int() - pil.int()).abs()
        assert int(diff.max()) <= levels and float(diff.float().mean()) < 0.1, (size, int(diff.max()))


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])   # torchvision resizes uint8 natively, or in float
def test_featx_resizes_exactly_as_torchvision_without_importing_it(capability, monkeypatch):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from featx.preprocess import resize_uint8
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    rng = np.random.default_rng(1)
    for mode in ("bilinear", "bicubic"):
        for _ in range(12):
            h, w = (int(v) for v in rng.integers(20, 600, 2))
            x = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)  # as decoded
            size = [int(v) for v in rng.integers(16, 400, 2)]
            want = F.resize(x, size, interpolation=InterpolationMode(mode), antialias=True)
            got = resize_uint8(x, size, mode)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (mode, h, w, size)


def test_format_2_features_are_still_made_the_pil_way_for_older_bundles(folder_dataset, tmp_path):
    from featx.extract import FeatureNet
    from featx.preprocess import _preprocess_pil
    from featx.train import train
    ds = open_dataset(folder_dataset)
    new = extract(ds, cache=tmp_path / "c", **SMALL)
    old = extract(ds, cache=tmp_path / "c", feature_format=2, **SMALL)
    assert old.specs[0].format == 2 and new.specs[0].format == featx.cache.FORMAT_VERSION == 3
    assert old.keys != new.keys and old.n_extracted == 24       # two entries, never mixed
    lb = featx.load_backbone("resnet18", "none")
    net = FeatureNet(lb.model, ["flatten"], "avg", lb.preprocess).eval()
    samples = ds.subset("train")[:4]
    x = torch.stack([torch.from_numpy(_preprocess_pil(featx.load_image(s.path, draft_size=256), lb.preprocess))
                     .permute(2, 0, 1) for s in samples])
    with torch.inference_mode():
        by_hand = net(x)[0].numpy()
    got = FeatureCache(tmp_path / "c").read(old.keys[0], [s.id for s in samples])
    np.testing.assert_allclose(got, by_hand, rtol=1e-4, atol=1e-5)
    # a bundle trained on format-2 features keeps predicting with them
    from featx.bundle import load_bundle, save_bundle
    from featx.evaluate import predict_images
    result = train(ds, "resnet18", "logreg", grid=[1.0], jobs=1, cache=tmp_path / "c", feature_format=2,
                   **{k: v for k, v in SMALL.items() if k != "backbone"})
    bundle = load_bundle(save_bundle(tmp_path / "old.featx", result.manifest(ds), result.fit.pipeline))
    assert bundle.feature_spec.format == 2
    rows, pred = predict_images(bundle, [str(s.path) for s in samples], cache=tmp_path / "c", progress=False)
    assert pred.cached == 4 and pred.extracted == 0 and all(r["label"] for r in rows)
    with pytest.raises(featx.errors.ConfigError, match="^features of cache format 1 can no longer be computed"):
        extract(ds, cache=tmp_path / "c", feature_format=1, **SMALL)


def test_decode_workers_keep_a_deep_queue_within_a_memory_bound(monkeypatch):
    """Deep enough to fill while the network is prepared (16 batches of 32 at
    224 px on 2 workers), never more decoded images ready than the bound,
    nor more than half the free shared memory they are handed over in."""
    import featx.inference as inf
    from featx.inference import PREFETCH_BYTES, prefetch_batches
    monkeypatch.setattr(inf, "_shared_memory_free", lambda: 8 << 30)
    assert prefetch_batches(32, 2, 224) == 16
    assert prefetch_batches(64, 2, 224) == 13     # 13 x 2 x 64 images of 147 KiB: 245 MiB
    for batch, workers, crop in [(64, 2, 224), (48, 3, 288), (256, 8, 224), (64, 4, 518), (1024, 8, 224)]:
        depth = prefetch_batches(batch, workers, crop)
        assert 2 <= depth < 16
        assert depth == 2 or depth * workers * batch * 3 * crop * crop <= PREFETCH_BYTES
    monkeypatch.setattr(inf, "_shared_memory_free", lambda: 64 << 20)   # a default Docker container
    assert prefetch_batches(32, 2, 224) == 3                              # 3 x 2 x 32 x 147 KiB: 28 MiB
    monkeypatch.setattr(inf, "_shared_memory_free", lambda: None)
    assert prefetch_batches(32, 2, 224) == 16
