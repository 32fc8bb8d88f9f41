"""Training-free dense CLIP: the last transformer block rewritten per method (methods.md sec. 6).

Every method keeps CLIP ViT frozen and unchanged up to the input ``x`` of its **last** block; only
that block's computation differs. With ``q, k, v`` the block's own projections of
``LN1(x)`` (split into heads, ``s = head_dim ** -0.5``):

========== ================================================ ==================================
variant    attention of the last block                      residual / FFN
========== ================================================ ==================================
clip       ``softmax(q kᵀ s)`` (plain CLIP, the reference)  both kept
maskclip   identity: every token keeps its own ``v``         both kept
sclip      ``softmax(q qᵀ s) + softmax(k kᵀ s)``             both kept
clearclip  ``softmax(q qᵀ s)``                               both removed
naclip     ``softmax(k kᵀ s + Ω)``, Ω a 2-D Gaussian over    both removed
           patch distance (σ = 5 patches), 0 on the class
           token's row and column
proxyclip  ``softmax(S')`` from a second vision model:       both removed
           ``S = cos(F_vfm)``, ``S' = (S − β·mean S)·γ``,
           ``S' < 0 → −∞`` (β 1.2, γ 3); CLIP's patch ``v``
           resized bilinearly to the VFM grid
========== ================================================ ==================================

The attention output goes through the block's ``out_proj``; "residual kept" adds ``x``, "FFN
kept" then adds ``MLP(LN2(y))``. Patch tokens (class token dropped) then go through
``post_layernorm`` and ``visual_projection`` (:meth:`ClipBackbone.project_patch_tokens`), where
they are compared with text embeddings.

The transformers layers are used as they are: the blocks before the last run through their own
``forward``; the last block's sub-modules (``layer_norm1``, ``self_attn.{q,k,v,out}_proj``,
``layer_norm2``, ``mlp``) are called from :func:`dense_last_block`.

ProxyCLIP's degenerate case: if ``mean S > 1/β`` every entry of ``S'`` is negative and the paper's
softmax is undefined (a row of −∞); such rows attend to their own token only. Real VFM features
do not get there (their mean cosine similarity is far below 0.83).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    """What one method does to the last block, and its published inference defaults.

    Attributes:
        residual: add the block input ``x`` to the attention output.
        ffn: add ``MLP(LN2(y))`` afterwards.
        logit_scale: temperature of the softmax over classes (ClearCLIP 50, NACLIP/ProxyCLIP 40;
            SCLIP 40 from its code [mem]; 40 for clip/maskclip is our choice [P]).
        crop, stride: sliding-window size in pixels (NACLIP 224/112, ProxyCLIP 336/112; the
            others 224/112 as NACLIP's and SCLIP's configs).
        pamr: apply PAMR refinement by default (NACLIP's reported numbers use it).
    """

    residual: bool
    ffn: bool
    logit_scale: float = 40.0
    crop: int = 224
    stride: int = 112
    pamr: bool = False


VARIANTS: dict[str, Variant] = {
    "clip": Variant(residual=True, ffn=True),
    "maskclip": Variant(residual=True, ffn=True),
    "sclip": Variant(residual=True, ffn=True),
    "clearclip": Variant(residual=False, ffn=False, logit_scale=50.0),
    "naclip": Variant(residual=False, ffn=False, pamr=True),
    "proxyclip": Variant(residual=False, ffn=False, crop=336, stride=112),
}


def check_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"variant {name!r}: unknown; use one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def gaussian_bias(hw: tuple[int, int], sigma: float, with_cls: bool = True) -> torch.Tensor:
    """NACLIP's Ω: ``exp(-|p - p'|² / (2 σ²))`` over patch positions (in patches).

    Returns ``(1 + h*w, 1 + h*w)`` with a zero class-token row and column (``with_cls``), else
    ``(h*w, h*w)``.
    """
    h, w = hw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    dist2 = torch.cdist(pos, pos).pow(2)
    omega = torch.exp(-dist2 / (2.0 * sigma**2))
    if with_cls:
        omega = F.pad(omega, (1, 0, 1, 0))
    return omega


def proxy_attention(
    vfm_features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0
) -> torch.Tensor:
    """ProxyCLIP's attention ``(B, N, N)`` from VFM features ``(B, C, h, w)`` (N = h*w)."""
    f = F.normalize(vfm_features.flatten(2).float(), dim=1)  # (B, C, N)
    sim = f.transpose(1, 2) @ f
    sim = (sim - beta * sim.mean(dim=(1, 2), keepdim=True)) * gamma
    masked = sim < 0
    # A row with nothing left would be NaN; let it keep its own token (see module docstring).
    empty = masked.all(dim=-1)
    if empty.any():
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        masked = masked & ~(empty.unsqueeze(-1) & eye)
        sim = torch.where(empty.unsqueeze(-1) & eye, torch.zeros_like(sim), sim)
    return sim.masked_fill(masked, float("-inf")).softmax(dim=-1)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def last_block_attention(
    variant: str,
    q: torch.Tensor,
    k: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
    sigma: float = 5.0,
) -> torch.Tensor | None:
    """Attention weights ``(B, heads, L, L)`` of the token-attention variants.

    ``q``, ``k``: ``(B, heads, L, d)`` with the class token first. Returns ``None`` for
    ``maskclip`` (identity attention).
    """
    if variant == "maskclip":
        return None
    if variant == "clip":
        return (q @ k.transpose(-1, -2) * scale).softmax(-1)
    if variant == "sclip":
        return (q @ q.transpose(-1, -2) * scale).softmax(-1) + (
            k @ k.transpose(-1, -2) * scale
        ).softmax(-1)
    if variant == "clearclip":
        return (q @ q.transpose(-1, -2) * scale).softmax(-1)
    if variant == "naclip":
        omega = gaussian_bias(hw, sigma).to(q)
        return (k @ k.transpose(-1, -2) * scale + omega).softmax(-1)
    raise ConfigError(f"variant {variant!r} has no token attention (proxyclip needs a VFM)")


def dense_last_block(
    layer: nn.Module,
    x: torch.Tensor,
    hw: tuple[int, int],
    variant: str,
    sigma: float = 5.0,
    proxy: torch.Tensor | None = None,
    proxy_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Run a transformers ``CLIPEncoderLayer`` the way ``variant`` defines its last block.

    Args:
        layer: the CLIP ViT's last encoder layer (its own sub-modules are used).
        x: its input ``(B, 1 + h*w, C)``, class token first.
        hw: the patch grid.
        variant: a key of :data:`VARIANTS`.
        sigma: NACLIP's Gaussian width in patches.
        proxy: ProxyCLIP's attention ``(B, N', N')`` from :func:`proxy_attention`.
        proxy_hw: the VFM grid ``(h', w')`` with ``h' * w' = N'``.

    Returns:
        Patch tokens ``(B, N, C)`` (class token dropped) and their grid.
    """
    spec = check_variant(variant)
    attn = layer.self_attn
    heads = attn.num_heads
    y = layer.layer_norm1(x)
    v = _heads(attn.v_proj(y), heads)  # (B, H, L, d)
    if variant == "proxyclip":
        if proxy is None or proxy_hw is None:
            raise ConfigError("proxyclip: needs the VFM's attention (give a vfm backbone)")
        b, _, _, d = v.shape
        grid = v[:, :, 1:].transpose(-1, -2).reshape(b * heads, d, *hw)
        grid = F.interpolate(grid, size=proxy_hw, mode="bilinear", align_corners=False)
        v = grid.reshape(b, heads, d, -1).transpose(-1, -2)
        out = proxy.to(v).unsqueeze(1) @ v
        hw = tuple(proxy_hw)
    else:
        q = _heads(attn.q_proj(y), heads)
        k = _heads(attn.k_proj(y), heads)
        weights = last_block_attention(variant, q, k, hw, attn.scale, sigma)
        out = v if weights is None else weights @ v
    out = attn.out_proj(out.transpose(1, 2).flatten(2))
    if spec.residual:
        out = out + x
    if spec.ffn:
        out = out + layer.mlp(layer.layer_norm2(out))
    if variant != "proxyclip":
        out = out[:, 1:]
    return out, hw


class DenseClip(nn.Module):
    """CLIP ViT (a :class:`~pivotseg.backbones.clip.ClipBackbone` with its text tower) as a dense
    patch-embedding extractor with one of :data:`VARIANTS` in its last block.

    Args:
        clip: the backbone (frozen here).
        variant: the method.
        sigma: NACLIP's Gaussian width in patches.
        vfm: ProxyCLIP's vision foundation model, any pivotseg backbone (e.g. ``dinov2``); its
            last block's patch features (after the model's final ``layernorm`` when it has one,
            as DINOv2's ``get_intermediate_layers(norm=True)``) give the attention.
        beta, gamma: ProxyCLIP's constants.
    """

    def __init__(
        self,
        clip: nn.Module,
        variant: str,
        sigma: float = 5.0,
        vfm: nn.Module | None = None,
        beta: float = 1.2,
        gamma: float = 3.0,
    ):
        super().__init__()
        check_variant(variant)
        if variant == "proxyclip" and vfm is None:
            raise ConfigError(
                "proxyclip: needs a second vision model (vfm), e.g. a dinov2 backbone"
            )
        self.clip = clip
        self.variant = variant
        self.sigma = sigma
        self.vfm = vfm if variant == "proxyclip" else None
        self.beta, self.gamma = beta, gamma
        mean, std = clip.pixel_stats()
        self.register_buffer("clip_mean", mean, persistent=False)
        self.register_buffer("clip_std", std, persistent=False)
        if self.vfm is not None:
            vmean, vstd = self.vfm.pixel_stats()
            self.register_buffer("vfm_mean", vmean, persistent=False)
            self.register_buffer("vfm_std", vstd, persistent=False)

    @property
    def patch_size(self) -> int:
        return self.clip.patch_size

    def last_block_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens entering the last block ``(B, 1 + h*w, C)`` for normalised ``pixels``."""
        vision = self.clip.vision
        x = vision.embeddings(pixels, interpolate_pos_encoding=True)
        x = vision.pre_layrnorm(x)
        for layer in vision.encoder.layers[:-1]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return x

    def vfm_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ProxyCLIP's attention from the VFM for 0-255 ``images`` of any size."""
        vfm = self.vfm
        d = vfm.size_divisor
        h, w = images.shape[-2:]
        size = (max(d, round(h / d) * d), max(d, round(w / d) * d))
        x = (images - self.vfm_mean) / self.vfm_std
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        feats = vfm.forward_blocks(x, [vfm.num_blocks - 1])[0]
        norm = getattr(getattr(vfm, "model", None), "layernorm", None)
        if isinstance(norm, nn.LayerNorm):
            feats = norm(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return proxy_attention(feats, self.beta, self.gamma), tuple(feats.shape[-2:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised patch embeddings ``(B, D, h, w)`` for 0-255 ``images`` (B, 3, H, W).

        ``H`` and ``W`` must be multiples of the patch size.
        """
        p = self.patch_size
        hw = (images.shape[-2] // p, images.shape[-1] // p)
        x = self.last_block_input((images - self.clip_mean) / self.clip_std)
        proxy, proxy_hw = (None, None)
        if self.variant == "proxyclip":
            proxy, proxy_hw = self.vfm_attention(images)
        layer = self.clip.vision.encoder.layers[-1]
        tokens, grid = dense_last_block(layer, x, hw, self.variant, self.sigma, proxy, proxy_hw)
        embeddings = F.normalize(self.clip.project_patch_tokens(tokens), dim=-1)
        b, n, c = embeddings.shape
        return embeddings.transpose(1, 2).reshape(b, c, *grid)


def gaussian_sigma_ok(sigma: float) -> float:
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"naclip sigma={sigma!r}: give a positive number of patches")
    return float(sigma)
