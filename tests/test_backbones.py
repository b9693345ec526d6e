"""The registry's metadata is true of the real torchvision models."""

import pytest
import torch

import featx
from featx.backbones import get_backbone, list_backbones, resolve_weights
from featx.errors import WeightsError

from .test_backbones_new import NEW


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in NEW])   # NEW: test_backbones_new
def test_default_layer_dims_and_head_match_the_model(name):
    info = get_backbone(name)
    rows = {r["layer"]: r for r in featx.layer_table(name)}
    assert rows[info.default_layer]["default"]
    assert rows[info.default_layer]["avg_dim"] == info.dims
    model = info.build(num_classes=7)
    head = model.get_submodule(info.head)
    out = head.out_features if isinstance(head, torch.nn.Linear) else head.out_channels
    assert out == 7


def test_inception_takes_299px_and_preprocessing_comes_from_the_weights():
    rw = resolve_weights("inception_v3", "IMAGENET1K_V1")
    assert (rw.preprocess.resize, rw.preprocess.crop) == (342, 299)
    assert resolve_weights("efficientnet_b0", "DEFAULT").preprocess.interpolation == "bicubic"
    assert resolve_weights("resnet50", "IMAGENET1K_V2").preprocess.resize == 232


def test_missing_download_fails_with_a_hint_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache
    rw = resolve_weights("resnet18", "IMAGENET1K_V1")
    assert not rw.available and rw.source.startswith("download from https://download.pytorch.org/")
    if _network_reachable():
        pytest.skip("a network is reachable here; the download would succeed")
    with pytest.raises(WeightsError, match=r"resnet18 IMAGENET1K_V1 weights are not on this machine and could not be downloaded"):
        featx.load_backbone("resnet18", "IMAGENET1K_V1")


def _network_reachable():
    import socket
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_a_torch_hub_cached_file_is_used_offline(monkeypatch, tmp_path):
    """Where a user once downloaded the weights, featx loads them with no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lb = featx.load_backbone("resnet18", "none", seed=5)
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    from torchvision.models import ResNet18_Weights
    fname = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(lb.model.state_dict(), ckpt / fname)
    rw = resolve_weights("resnet18", "auto")
    assert rw.available and rw.name == "IMAGENET1K_V1" and "torch hub cache" in rw.source


def test_the_torchvision_weights_table_is_what_torchvision_says():
    """featx reads weights names, URLs and preprocessing from its table, not
    from an import of torchvision (seconds of start-up): the table must be
    torchvision's own, in its order (rebuild it with `python -m featx.backbones`)."""
    import json

    from featx.backbones import TORCHVISION_TABLE, build_torchvision_table, torchvision_table_is_current
    if not torchvision_table_is_current():
        pytest.skip("another torchvision is installed: featx reads it instead of the table")
    assert json.dumps(json.loads(TORCHVISION_TABLE.read_text())) == json.dumps(build_torchvision_table()), \
        "featx/torchvision_weights.json is stale: run `python -m featx.backbones`"
    from torchvision.models import get_model_weights
    for name in ("regnet_y_16gf", "vit_b_16", "vgg16"):   # auto tries them in this order
        assert list(featx.backbones.get_backbone(name).tv_weights()) == [w.name for w in get_model_weights(name)]


def test_a_table_made_from_another_torchvision_is_not_used(tmp_path, monkeypatch):
    import json

    import featx.backbones as b
    from featx.preprocess import resize_uint8
    table = json.loads(b.TORCHVISION_TABLE.read_text())
    monkeypatch.setattr(b, "TORCHVISION_TABLE", tmp_path / "t.json")
    try:
        (tmp_path / "t.json").write_text(json.dumps({**table, "torchvision": table["torchvision"] + "+cu999"}))
        b.torchvision_table.cache_clear()
        assert b.torchvision_table_is_current()           # a local build tag is the same release
        stale = dict(table, torchvision="0.1.0")
        stale["models"]["mobilenet_v2"]["IMAGENET1K_V1"]["url"] = "https://example.invalid/other.pth"
        (tmp_path / "t.json").write_text(json.dumps(stale))
        b.torchvision_table.cache_clear()
        assert not b.torchvision_table_is_current()
        w = b.get_backbone("mobilenet_v2").tv_weights()["IMAGENET1K_V1"]
        assert w.url.endswith("/mobilenet_v2-b0353104.pth")    # read from torchvision instead
        x = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
        assert resize_uint8(x, [20, 28], "bilinear").shape == (3, 20, 28)   # torchvision's resize runs
        (tmp_path / "t.json").write_text('{"torchvision": "x"}')           # damaged: read torchvision
        b.torchvision_table.cache_clear()
        assert not b.torchvision_table_is_current() and b.get_backbone("resnet18").tv_default().name == "IMAGENET1K_V1"
    finally:
        b.torchvision_table.cache_clear()
