"""Vision transformers built in featx: torchvision's ViT with a named class
token, and DINOv2 (ViT-S/14, ViT-B/14) in the official checkpoint layout.

Both trace with torch.fx, so every block is an extractable layer:

``cls``
    the class token after the final norm, a (B, D) vector: the default
    feature layer and the input of the head.
``encoder.layers.encoder_layer_N`` (torchvision) / ``blocks.N`` (DINOv2), ``encoder.ln`` / ``norm``
    token-shaped (B, 1 + patches, D) activations; ``--pool cls`` takes the
    class token, ``avg``/``max`` pool the patch tokens only.

DINOv2's state dict has the keys of ``dinov2_vits14_pretrain.pth`` exactly
(``cls_token``, ``pos_embed`` (1, 1 + 37*37, D) from 518 px pretraining,
``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``, ``norm.*``); the official checkpoints
carry no classifier, so a headless model (``num_classes=0``) loads them
strictly. Position embeddings are interpolated to the input's patch grid as
the official ``interpolate_pos_encoding`` does (bicubic, no antialias,
scale factor ``(grid + 0.1) / 37``): 16 x 16 patches at 224 px.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from .backbones import DINOV2_URL  # noqa: F401  (it lived here)

#: (embed dim, depth, heads) of the official DINOv2 backbones featx builds
DINOV2_ARCHS = {"dinov2_vits14": (384, 12, 6), "dinov2_vitb14": (768, 12, 12)}
DINOV2_PATCH = 14
DINOV2_PRETRAIN_GRID = 37     # 518 px / 14


class ClassToken(nn.Module):
    """``x[:, 0]``: the class token of (B, T, D) tokens."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


# ---------------------------------------------------------------------------
# torchvision ViT with a named class-token node

_TV_VIT = {"vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
           "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096)}


class FeatxViT(VisionTransformer):
    """torchvision's VisionTransformer (same state dict) whose class token
    after ``encoder.ln`` is the graph node ``cls``."""

    feature_blocks = ("encoder.layers",)   # containers whose blocks `featx layers` lists
    list_functional_nodes = False          # its top-level functional nodes are token plumbing

    def __init__(self, **kw):
        super().__init__(**kw)
        self.cls = ClassToken()

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(self.cls(x))


def build_torchvision_vit(arch: str, num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    """torchvision's ``arch`` as :class:`FeatxViT`; ``image_size`` sets the
    position embeddings (224, or 384/512 for the SWAG end-to-end weights)."""
    return FeatxViT(image_size=int(image_size), num_classes=int(num_classes), **_TV_VIT[arch])


# ---------------------------------------------------------------------------
# DINOv2


@torch.fx.wrap
def interpolate_pos_embed(pos_embed: Tensor, grid_h: int, grid_w: int, offset: float = 0.1) -> Tensor:
    """(1, 1 + M*M, D) position embeddings -> (1, 1 + grid_h*grid_w, D), as DINOv2 does it."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if grid_h == m and grid_w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    patch = F.interpolate(pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                          scale_factor=((grid_h + offset) / m, (grid_w + offset) / m))
    if tuple(patch.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"position embeddings interpolated to {tuple(patch.shape[-2:])}, not {(grid_h, grid_w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = DINOV2_PATCH):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)       # (B, patches, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT with the official parameter names; ``head`` is a Linear
    (``num_classes`` > 0) or, as in the official checkpoints, an Identity."""

    list_functional_nodes = False

    def __init__(self, dim: int, depth: int, heads: int, num_classes: int = 0,
                 pretrain_grid: int = DINOV2_PRETRAIN_GRID, patch: int = DINOV2_PATCH):
        super().__init__()
        self.patch_size = patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))   # unused at inference; in the checkpoint
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.cls = ClassToken()
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, grid_h, grid_w)
        for block in self.blocks:
            x = block(x)
        return self.head(self.cls(self.norm(x)))


def build_dinov2(arch: str, num_classes: int = 0) -> DinoV2:
    """A randomly initialised ``dinov2_vits14`` / ``dinov2_vitb14`` (eval mode is up to the caller)."""
    dim, depth, heads = DINOV2_ARCHS[arch]
    return DinoV2(dim, depth, heads, num_classes=int(num_classes))
