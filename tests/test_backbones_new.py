"""The 2020s backbones (ConvNeXt, EfficientNetV2, RegNetY, ViT, Swin, MaxViT,
DINOv2, EfficientNet-Lite1/2): they build with random weights, list their
layers, extract the documented dims, and token-shaped activations pool as a
hand computation says. No network: DINOv2 checkpoints are made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featx
from featx.backbones import get_backbone, load_backbone, resolve_weights, weights_status
from featx.data import open_dataset
from featx.errors import BackboneError, ConfigError, WeightsError
from featx.extract import extract, layer_table, load_features, pool_features

from .conftest import make_image

NEW = ["convnext_tiny", "convnext_small", "convnext_base", "efficientnet_v2_s", "efficientnet_v2_m",
       "regnet_y_1_6gf", "regnet_y_16gf", "vit_b_16", "vit_l_16", "swin_t", "swin_s", "maxvit_t",
       "dinov2_vits14", "dinov2_vitb14", "efficientnet_lite1", "efficientnet_lite2"]
BIGGEST = {"vit_l_16", "regnet_y_16gf"}            # built only: a forward on CPU is slow
# one per family (and the small DINOv2): extraction of two images through the default layer
EXTRACTED = ["convnext_tiny", "efficientnet_v2_s", "regnet_y_1_6gf", "vit_b_16", "swin_t", "maxvit_t",
             "dinov2_vits14"]


def _lite_code_missing(name):
    import importlib.util
    return name.startswith("efficientnet_lite") and importlib.util.find_spec("efficientnet_lite_pytorch") is None


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    make_image(root / "red" / "a.png", (220, 30, 30), size=(40, 30), seed=1)
    make_image(root / "blue" / "b.png", (30, 40, 220), size=(30, 40), seed=2)
    return open_dataset(root)


@pytest.mark.parametrize("name", NEW)
def test_every_new_architecture_builds_with_random_weights(name):
    if _lite_code_missing(name):
        pytest.skip("efficientnet-lite-pytorch not installed")
    info = get_backbone(name)
    lb = load_backbone(name, "none", seed=3)
    assert not lb.model.training and not any(p.requires_grad for p in lb.model.parameters())
    head = lb.model.get_submodule(info.head)
    assert isinstance(head, torch.nn.Linear) and head.in_features == info.dims and head.out_features == 1000
    if name not in BIGGEST:      # a second copy of the biggest costs seconds for nothing new
        assert info.build(num_classes=7).get_submodule(info.head).out_features == 7


@pytest.mark.parametrize("name", [n for n in NEW if n not in BIGGEST])
def test_featx_layers_lists_the_default_layer_with_its_dims(name):
    if _lite_code_missing(name):
        pytest.skip("efficientnet-lite-pytorch not installed")
    info = get_backbone(name)
    rows = {r["layer"]: r for r in layer_table(name)}
    assert rows[info.default_layer]["default"] and int(np.prod(rows[info.default_layer]["shape"])) == info.dims
    assert rows[info.default_layer]["avg_dim"] == info.dims
    assert len(rows) >= 6   # blocks are listed, not just the head
    assert all(len(r["shape"]) >= 1 for r in rows.values())


def test_featx_layers_command_prints_vit_blocks_and_swin_channels_last_dims():
    from click.testing import CliRunner

    from featx.cli import cli
    res = CliRunner().invoke(cli, ["layers", "vit_b_16"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("encoder.layers.encoder_layer_5 "))
    assert line.split()[1:] == ["197x768", "768"]
    assert any(ln.startswith("cls  (default)") for ln in res.output.splitlines())
    swin = {r["layer"]: r for r in layer_table("swin_t")}
    # Swin's stages are (H, W, C): avg pooling gives C, not W
    assert swin["features.5"]["shape"] == (14, 14, 384) and swin["features.5"]["avg_dim"] == 384


@pytest.mark.parametrize("name", EXTRACTED)
def test_two_images_through_the_default_layer_give_the_documented_dims(name, two_images, tmp_path):
    info = get_backbone(name)
    rep = extract(two_images, name, weights="none", cache=tmp_path, workers=0, progress=False)
    X, y, _ = load_features(tmp_path, rep.specs[0], two_images)
    assert X.shape == (2, info.dims) and np.isfinite(X).all()
    assert not np.allclose(X[0], X[1])


# --------------------------------------------------------------------------
# token pooling


def test_token_pooling_equals_a_hand_computation():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3) ** 1.5 % 7   # (B, 1 + 4 patches, D)
    patches = t[:, 1:]
    hand = {"cls": t[:, 0], "avg": patches.sum(1) / 4, "max": patches.max(1).values,
            "avgmax": torch.cat([patches.sum(1) / 4, patches.max(1).values], 1), "none": t.reshape(2, 15)}
    for pool, want in hand.items():
        got = pool_features(t, pool, "tokens", 1, "blocks.3")
        assert torch.allclose(got, want), pool
    # tokens with no class token (DINOv2's patch_embed): every token is a patch
    assert torch.allclose(pool_features(t, "avg", "tokens", 0), t.mean(1))
    with pytest.raises(BackboneError, match=r"--pool cls: layer patch_embed holds patch tokens only"):
        pool_features(t, "cls", "tokens", 0, "patch_embed")


def test_channels_last_and_feature_maps_pool_per_channel():
    nchw = torch.randn(2, 6, 4, 5)
    nhwc = nchw.permute(0, 2, 3, 1)
    for pool in ("avg", "max", "avgmax"):
        assert torch.allclose(pool_features(nhwc, pool, "nhwc"), pool_features(nchw, pool))
    assert torch.allclose(pool_features(nchw, "avg"), nchw.mean((2, 3)))
    with pytest.raises(BackboneError, match=r"--pool cls: layer conv_proj gives feature maps \(6x4x5\)"):
        pool_features(nchw, "cls", "nchw", 0, "conv_proj")
    vec = torch.randn(2, 9)
    assert all(torch.equal(pool_features(vec, p, "tokens", 1), vec) for p in ("cls", "avg", "none"))


def test_an_intermediate_block_extracts_as_cls_or_mean_of_patches(two_images, tmp_path):
    """featx's extraction of blocks.5 equals the block's output caught by a hook."""
    lb = load_backbone("dinov2_vits14", "none", seed=0)
    caught = {}
    lb.model.blocks[5].register_forward_hook(lambda m, i, o: caught.__setitem__("b5", o))
    lb.model.norm.register_forward_hook(lambda m, i, o: caught.__setitem__("norm", o))
    from featx.extract import preprocess_image
    from PIL import Image
    pre = lb.preprocess
    x = torch.stack([preprocess_image(Image.open(s.path).convert("RGB"), pre) for s in two_images.samples])
    x = (x.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        lb.model(x)
    for pool, hand in (("cls", caught["b5"][:, 0]), ("avg", caught["b5"][:, 1:].mean(1))):
        rep = extract(two_images, "dinov2_vits14", weights="none", layers=["blocks.5", "norm"], pool=pool,
                      cache=tmp_path, workers=0, progress=False)
        X, _, _ = load_features(tmp_path, rep.specs[0], two_images)
        assert np.allclose(X, hand.numpy(), atol=1e-4), pool
        assert X.shape == (2, 384)
    # the default layer is the class token after the final norm
    rep = extract(two_images, "dinov2_vits14", weights="none", cache=tmp_path, workers=0, progress=False)
    X, _, _ = load_features(tmp_path, rep.specs[0], two_images)
    assert rep.specs[0].layer == "cls" and np.allclose(X, caught["norm"][:, 0].numpy(), atol=1e-4)


def test_pool_cls_is_refused_for_a_network_without_class_token(two_images, tmp_path):
    with pytest.raises(ConfigError, match=r"--pool cls: resnet18 has no class token"):
        extract(two_images, "resnet18", weights="none", pool="cls", cache=tmp_path, workers=0, progress=False)
    with pytest.raises(BackboneError, match=r"--pool cls: layer conv_proj gives feature maps"):
        extract(two_images, "vit_b_16", weights="none", layers=["conv_proj"], pool="cls", cache=tmp_path,
                workers=0, progress=False)


# --------------------------------------------------------------------------
# weights metadata


def test_vit_and_swag_preprocessing_come_from_their_weights():
    e2e = resolve_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").preprocess
    assert (e2e.resize, e2e.crop, e2e.interpolation) == (384, 384, "bicubic")
    lin = resolve_weights("vit_l_16", "IMAGENET1K_SWAG_LINEAR_V1").preprocess
    assert (lin.resize, lin.crop, lin.interpolation) == (224, 224, "bicubic")
    v1 = resolve_weights("vit_b_16", "IMAGENET1K_V1").preprocess
    assert (v1.resize, v1.crop, v1.interpolation) == (256, 224, "bilinear")
    assert resolve_weights("regnet_y_16gf", "IMAGENET1K_SWAG_LINEAR_V1").preprocess.interpolation == "bicubic"
    assert resolve_weights("efficientnet_v2_m", "DEFAULT").preprocess.crop == 480
    # SWAG end-to-end ViT-B: built for 384 px position embeddings
    assert get_backbone("vit_b_16").build(image_size=384).encoder.pos_embedding.shape[1] == 1 + 24 * 24


def test_featx_backbones_notes_the_swag_licence():
    rows = dict(weights_status(get_backbone("vit_b_16")))
    assert "licence CC-BY-NC-4.0" in rows["IMAGENET1K_SWAG_E2E_V1"]
    assert "licence" not in rows["IMAGENET1K_V1"]
    assert "licence CC-BY-NC-4.0" in dict(weights_status(get_backbone("regnet_y_16gf")))["IMAGENET1K_SWAG_LINEAR_V1"]


# --------------------------------------------------------------------------
# DINOv2


def _official_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"):
            keys.add(f"blocks.{i}.{part}")
    return keys


@pytest.fixture(scope="module")
def dinov2_small_checkpoint(tmp_path_factory):
    """A random ViT-S/14 saved in the official (headless) layout."""
    from featx.vit import build_dinov2
    torch.manual_seed(11)
    model = build_dinov2("dinov2_vits14", num_classes=0).eval()
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_dinov2_has_the_official_checkpoint_layout(dinov2_small_checkpoint):
    _, model = dinov2_small_checkpoint
    sd = model.state_dict()
    assert set(sd) == _official_keys(12)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384) and sd["cls_token"].shape == (1, 1, 384)
    assert sd["mask_token"].shape == (1, 384) and sd["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384) and sd["blocks.0.ls1.gamma"].shape == (384,)
    from featx.vit import build_dinov2
    assert build_dinov2("dinov2_vitb14").state_dict()["blocks.11.mlp.fc1.weight"].shape == (3072, 768)


def test_dinov2_checkpoint_file_round_trips_strictly(dinov2_small_checkpoint, tmp_path):
    path, model = dinov2_small_checkpoint
    lb = load_backbone("dinov2_vits14", str(path))
    assert isinstance(lb.model.head, torch.nn.Identity)    # the official files carry no classifier
    pre = lb.preprocess
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(lb.model(x), model(x), atol=1e-5)
    # every key is checked: one missing or one foreign key is refused, naming the file
    sd = torch.load(path, weights_only=True)
    missing = dict(sd)
    del missing["blocks.3.ls2.gamma"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing.pth: does not fit dinov2_vits14: missing 1 keys \(blocks.3.ls2.gamma\)"):
        load_backbone("dinov2_vits14", str(tmp_path / "missing.pth"))
    extra = dict(sd, register_tokens=torch.zeros(1, 4, 384))
    torch.save(extra, tmp_path / "registers.pth")
    with pytest.raises(WeightsError, match=r"unexpected 1 keys \(register_tokens\)"):
        load_backbone("dinov2_vits14", str(tmp_path / "registers.pth"))
    torch.save(sd, tmp_path / "b14.pth")
    with pytest.raises(WeightsError, match=r"b14.pth: does not fit dinov2_vitb14"):
        load_backbone("dinov2_vitb14", str(tmp_path / "b14.pth"))


def test_dinov2_position_embeddings_are_interpolated_from_37_to_16_patches():
    from featx.vit import interpolate_pos_embed
    dim = 8
    row = torch.linspace(-1, 1, 37)
    grid = row.view(37, 1, 1).expand(37, 37, dim)          # varies down the rows only
    pe = torch.cat([torch.full((1, dim), 5.0), grid.reshape(37 * 37, dim)])[None]
    out = interpolate_pos_embed(pe, 16, 16)
    assert out.shape == (1, 1 + 16 * 16, dim)
    assert torch.equal(out[:, 0], pe[:, 0])                  # the class position is kept
    patch = out[0, 1:].reshape(16, 16, dim)
    assert torch.allclose(patch, patch[:, :1].expand(16, 16, dim), atol=1e-5)  # still constant along rows
    assert (patch[1:, 0, 0] > patch[:-1, 0, 0]).all()        # and increasing down them
    assert interpolate_pos_embed(pe, 37, 37) is pe
    # a 224 px image is 16 x 16 patches + the class token
    from featx.vit import build_dinov2
    m = build_dinov2("dinov2_vits14").eval()
    caught = {}
    m.blocks[0].register_forward_hook(lambda mod, i, o: caught.__setitem__("x", o))
    with torch.no_grad():
        m(torch.zeros(1, 3, 224, 224))
    assert caught["x"].shape == (1, 257, 384)


def test_dinov2_weights_come_from_the_hub_cache_or_its_url(monkeypatch, tmp_path, dinov2_small_checkpoint):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rw = resolve_weights("dinov2_vits14", "auto")
    assert rw.kind == "hub" and rw.name == "LVD142M" and not rw.available
    assert rw.source == "download from https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert "licence Apache-2.0" in dict(weights_status(get_backbone("dinov2_vits14")))["LVD142M"]
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    import shutil
    shutil.copyfile(dinov2_small_checkpoint[0], ckpt / "dinov2_vits14_pretrain.pth")
    rw = resolve_weights("dinov2_vits14", "LVD142M")
    assert rw.available and "torch hub cache" in rw.source and rw.preprocess.interpolation == "bicubic"
    lb = featx.load_backbone("dinov2_vits14", "auto")
    assert lb.weights.kind == "hub" and isinstance(lb.model.head, torch.nn.Identity)
