"""EVA-02 vision transformers (EVA02-CLIP image towers and MIM EVA-02), written from the papers.

transformers has no EVA-02, so the tower is written here (EVA-02: Fang et al. 2023; EVA-CLIP:
Sun et al. 2023). A block is pre-LN:

* attention with separate q/k/v projections, a bias on q and v only (k has none), 2-D rotary
  position embedding (RoPE) on the *patch* tokens' q and k (the class token is not rotated),
  optionally a LayerNorm over the merged heads before the output projection ("sub-LN",
  EVA02-CLIP; the MIM towers have none) and plain ``scaled_dot_product_attention`` in place of
  xformers;
* a SwiGLU FFN ``w3(LN(silu(w1 x) * w2 x))`` whose LayerNorm sits before the output projection;
* stochastic depth growing linearly from 0 to ``drop_path_rate`` (active in training only).

An absolute position embedding (class token + square grid) is added after patch embedding and
resized bicubically for other grids; RoPE tables are recomputed for every grid.

RoPE (EVA-02's ``VisionRotaryEmbeddingFast``, re-derived): half of each head's channels rotate
with the row index, the other half with the column index. Along one axis of ``n`` tokens the
positions are ``t = arange(n)`` or, with ``rope_interpolate``, ``arange(n) / n * pt`` where ``pt``
is the pretraining grid (``rope_pt_seq_len``), so that any grid spans the pretrained range. Per
axis there are ``head_dim / 4`` frequencies ``theta^(-2k / (head_dim / 2))``, each applied to
one adjacent channel pair ``(2k, 2k+1)`` as a 2-D rotation.

Checkpoints: module names follow the public EVA-CLIP layout, so :class:`Eva02Backbone`'s state
keys are the public ``visual.*`` keys (e.g. ``visual.blocks.0.attn.q_proj.weight``,
``visual.blocks.0.mlp.w3.weight``). A public ``.safetensors`` file (with or without the
``visual.`` prefix, text tower ignored) loads through :func:`build_eva02`; its RoPE buffers
(``rope.freqs_cos``/``freqs_sin``, also repeated under every block) are checked against the
formula above and dropped, since they are recomputed; a checkpoint at another patch size or
image size has its patch kernel and position grid resized bicubically (EVA's 14->16 recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pivotseg.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    Backbone,
    choose_preset,
    dataclass_config,
    is_saved_folder,
    load_saved_folder,
    load_state_strict,
    read_safetensors_file,
    tokens_to_map,
)
from pivotseg.errors import CheckpointError, ConfigError


@dataclass
class Eva02Config:
    """Architecture of one EVA-02 tower (defaults: EVA02-CLIP-L/14, the VLTSeg encoder).

    Attributes:
        width, depth, heads: transformer size.
        mlp_hidden: SwiGLU hidden width; ``None`` means ``width * 8 // 3`` (mlp ratio 4 * 2/3).
        patch_size, image_size: pretraining patch and image size; ``image_size // patch_size``
            is the grid the position embedding is stored at.
        qkv_bias: learnable biases on q and v (k never has one).
        attn_norm: sub-LN over the merged heads before the attention projection (EVA02-CLIP).
        ffn_norm: LayerNorm inside the SwiGLU FFN before ``w3``.
        clip_head: keep the final ``norm`` and the ``head`` projection to the CLIP embedding
            (``embed_dim``); not used by segmentation features.
        rope_pt_seq_len: grid side RoPE was pretrained at (16 for all EVA-02 towers).
        rope_interpolate: scale RoPE positions so any grid spans ``rope_pt_seq_len`` (EVA's
            ``intp_freq``); otherwise positions are integer token indices.
        drop_path_rate: stochastic depth at the last block (0.2 in VLTSeg).
        grad_checkpointing: recompute blocks in the backward pass to save memory.
    """

    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int | None = None
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = True
    attn_norm: bool = True
    ffn_norm: bool = True
    clip_head: bool = True
    embed_dim: int = 768
    rope_theta: float = 10000.0
    rope_pt_seq_len: int = 16
    rope_interpolate: bool = True
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    @property
    def hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden else self.width * 8 // 3

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# The published towers. MIM EVA02-L is the masked-image-modelling tower run at patch 16 (as
# EVA-02's detection/segmentation recipes do); its public weights are patch 14 and are resized
# on loading. Its attention has no sub-LN and it has no CLIP head.
PRESETS: dict[str, dict[str, Any]] = {
    "clip_l14": dict(width=1024, depth=24, heads=16, patch_size=14, image_size=224, embed_dim=768),
    "clip_b16": dict(width=768, depth=12, heads=12, patch_size=16, image_size=224, embed_dim=512),
    "mim_l16": dict(
        width=1024,
        depth=24,
        heads=16,
        patch_size=16,
        image_size=224,
        attn_norm=False,
        clip_head=False,
    ),
}
DEFAULT_VARIANT = "clip_l14"

# Keys of public checkpoints that carry nothing this tower uses (MIM pretraining heads).
_IGNORED_PUBLIC = ("mask_token", "lm_head.")


# ----- rotary position embedding -----------------------------------------------------------------
def rope_angles(
    grid: tuple[int, int],
    head_dim: int,
    pt_seq_len: int,
    theta: float = 10000.0,
    interpolate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotation angles ``(h * w, head_dim)`` of the patch tokens of a row-major ``grid``.

    Channels ``[0, head_dim/2)`` rotate with the row position, the rest with the column
    position; each frequency covers one adjacent channel pair.
    """
    if head_dim % 4:
        raise ConfigError(f"EVA-02 RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=device).float() / half)

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device).float()
        if interpolate:
            pos = pos / n * pt_seq_len
        return (pos[:, None] * inv_freq[None]).repeat_interleave(2, dim=-1)  # (n, half)

    h, w = grid
    rows = axis(h)[:, None, :].expand(h, w, half)
    cols = axis(w)[None, :, :].expand(h, w, half)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair ``(2k, 2k+1)`` of ``x (..., N, D)`` by the angles behind cos/sin."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


# ----- the tower ---------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, cfg: Eva02Config):
        super().__init__()
        self.heads = cfg.heads
        dim = cfg.width
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.inner_attn_ln = (
            nn.LayerNorm(dim, eps=cfg.layer_norm_eps) if cfg.attn_norm else nn.Identity()
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        b, n, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            # Under autocast q/k are half precision while the tables were built for the input.
            cos, sin = (t.to(q.dtype) for t in rope)
            prefix = n - cos.shape[0]  # the class token keeps its q and k
            q = torch.cat([q[:, :, :prefix], apply_rope(q[:, :, prefix:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :prefix], apply_rope(k[:, :, prefix:], cos, sin)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, cfg: Eva02Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.hidden)
        self.w2 = nn.Linear(cfg.width, cfg.hidden)
        self.ffn_ln = (
            nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps) if cfg.ffn_norm else nn.Identity()
        )
        self.w3 = nn.Linear(cfg.hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, cfg: Eva02Config, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Eva02VisionTower(nn.Module):
    """The EVA-02 image tower with public EVA-CLIP module names (no ``visual.`` prefix)."""

    def __init__(self, cfg: Eva02Config):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, cfg.width))
        # Python floats, not torch.linspace: the tower must also build on the meta device.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        if cfg.clip_head:
            self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
            self.head = nn.Linear(cfg.width, cfg.embed_dim)
        self._rope_cache: dict = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # Random weights only matter for tests and from-scratch runs; EVA uses trunc-normal 0.02.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding ``(1, 1 + h*w, C)``, resized bicubically for other grids."""
        g = self.cfg.grid
        if tuple(grid) == (g, g):
            return self.pos_embed
        return torch.cat([self.pos_embed[:, :1], resize_grid(self.pos_embed[:, 1:], grid)], dim=1)

    def rope(self, grid: tuple[int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), str(device), dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            angles = rope_angles(
                grid,
                cfg.head_dim,
                cfg.rope_pt_seq_len,
                cfg.rope_theta,
                cfg.rope_interpolate,
                device=device,
            )
            self._rope_cache[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._rope_cache[key]

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels -> tokens ``(B, 1 + h*w, C)`` with class token and position embedding."""
        x = self.patch_embed(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding(grid).to(x.dtype), grid

    def run_block(self, index: int, x: torch.Tensor, rope) -> torch.Tensor:
        block = self.blocks[index]
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)


def resize_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize square-grid tokens ``(1, s*s, C)`` to ``(1, h*w, C)``."""
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise CheckpointError(f"position grid of {tokens.shape[1]} tokens is not square")
    maps = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    maps = F.interpolate(maps.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(tokens.dtype)


# ----- the backbone ------------------------------------------------------------------------------
class Eva02Backbone(Backbone):
    """EVA-02 behind the :class:`Backbone` interface; features are blocks' patch tokens.

    Feature maps are the raw block outputs (no final norm), as Rein and VLTSeg read them.
    """

    name = "eva02"
    pixel_mean = CLIP_MEAN
    pixel_std = CLIP_STD

    def __init__(self, cfg: Eva02Config, out_indices=None):
        super().__init__(out_indices)
        self.cfg = cfg
        self.visual = Eva02VisionTower(cfg)
        self.patch_size = self.size_divisor = cfg.patch_size
        self._current_hw = (cfg.grid, cfg.grid)

    @property
    def blocks(self):
        return list(self.visual.blocks)

    @property
    def block_dims(self):
        return [self.cfg.width] * self.cfg.depth

    def block_strides(self):
        return [self.patch_size] * self.cfg.depth

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.cfg.grad_checkpointing = enable

    def _split_block_output(self, index, output):
        prefix, tokens = output[:, :1], output[:, 1:]
        return tokens, self._current_hw, lambda new: torch.cat([prefix, new], dim=1)

    def block_input(self, pixel_values):
        x, grid = self.visual.embed(pixel_values)
        self._current_hw = grid
        self._rope = self.visual.rope(grid, x.device, x.dtype)
        return x

    def run_block(self, index, x):
        return self.visual.run_block(index, x, self._rope)

    def block_map(self, index, x):
        return tokens_to_map(x[:, 1:], self._current_hw)

    def clip_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding ``(B, embed_dim)`` (final norm of the class token + head)."""
        if not self.cfg.clip_head:
            raise ConfigError("eva02: this tower was built with clip_head=False; set it to True")
        self.check_input(pixel_values)
        x = self.block_input(pixel_values)
        for i in range(self.cfg.depth):
            x = self.run_block(i, x)
        return self.visual.head(self.visual.norm(x[:, 0]))

    def config_dict(self):
        return {
            "name": self.name,
            "config": dataclasses.asdict(self.cfg),
            "out_indices": self._out_indices,
        }


# ----- public checkpoint layout ------------------------------------------------------------------
def public_state_dict(backbone: Eva02Backbone) -> dict[str, torch.Tensor]:
    """The weights in the public EVA-CLIP layout, RoPE buffers included (``visual.*`` keys)."""
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    cfg = backbone.cfg
    device = backbone.visual.pos_embed.device
    angles = rope_angles(
        (cfg.grid, cfg.grid),
        cfg.head_dim,
        cfg.rope_pt_seq_len,
        cfg.rope_theta,
        cfg.rope_interpolate,
        device=device,
    )
    prefixes = ["visual.rope."] + [f"visual.blocks.{i}.attn.rope." for i in range(cfg.depth)]
    for p in prefixes:
        state[p + "freqs_cos"] = angles.cos()
        state[p + "freqs_sin"] = angles.sin()
    return state


def _from_public(state: dict[str, torch.Tensor], backbone: Eva02Backbone, source) -> dict:
    """Map a public state dict onto ``backbone``'s keys (checks and drops RoPE buffers)."""
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {"visual." + k: v for k, v in state.items()}
    cfg = backbone.cfg
    own = backbone.state_dict()
    expected = rope_angles(
        (cfg.grid, cfg.grid),
        cfg.head_dim,
        cfg.rope_pt_seq_len,
        cfg.rope_theta,
        cfg.rope_interpolate,
    )
    out = {}
    for key, value in state.items():
        short = key[len("visual.") :]
        if short.startswith(_IGNORED_PUBLIC):
            continue
        if key.endswith(("rope.freqs_cos", "rope.freqs_sin")):
            fn = torch.cos if key.endswith("cos") else torch.sin
            if value.shape == expected.shape and not torch.allclose(
                value.float(), fn(expected), atol=2e-3
            ):
                raise CheckpointError(
                    f"{source}: {key} differs from the RoPE of this config (head dim "
                    f"{cfg.head_dim}, pretrain grid {cfg.rope_pt_seq_len}); check the variant"
                )
            continue
        if not cfg.clip_head and short.startswith(("norm.", "head.")):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    _adapt_patch_and_grid(out, own)
    return out


def _adapt_patch_and_grid(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Resize the patch kernel and position grid of another patch/image size (EVA's recipe)."""
    key = "visual.patch_embed.proj.weight"
    if key in state and state[key].shape[:2] == own[key].shape[:2]:
        if state[key].shape[2:] != own[key].shape[2:]:
            state[key] = F.interpolate(
                state[key], size=tuple(own[key].shape[2:]), mode="bicubic", align_corners=False
            )
    key = "visual.pos_embed"
    if key in state and state[key].shape[-1] == own[key].shape[-1]:
        if state[key].shape[1] != own[key].shape[1]:
            side = int(round((own[key].shape[1] - 1) ** 0.5))
            pos = state[key]
            state[key] = torch.cat([pos[:, :1], resize_grid(pos[:, 1:], (side, side))], dim=1)


def build_eva02(source=None, config=None, out_indices=None) -> Eva02Backbone:
    """EVA-02 from a public ``.safetensors`` file, a saved folder, or random from a preset.

    Args:
        source: a public EVA-CLIP / EVA-02 checkpoint converted to ``.safetensors`` (``visual.``
            prefix optional), a :meth:`Backbone.save_pretrained` folder, or ``None``.
        config: ``{"variant": "clip_l14" | "clip_b16" | "mim_l16", ...}`` plus any
            :class:`Eva02Config` field (e.g. ``drop_path_rate``, ``grad_checkpointing``).
        out_indices: blocks whose outputs become feature maps.
    """
    if is_saved_folder(source):
        overrides = {k: v for k, v in (config or {}).items() if k != "variant"}

        def make(saved, levels):
            return Eva02Backbone(_make_config({**saved["config"], **overrides}), levels)

        return load_saved_folder(source, out_indices, make)
    variant, overrides = choose_preset("eva02", PRESETS, config, DEFAULT_VARIANT)
    backbone = Eva02Backbone(_make_config({**PRESETS[variant], **overrides}), out_indices)
    if source is None:
        return backbone
    public = read_safetensors_file(source, "eva02", "a .pt checkpoint")
    state = _from_public(public, backbone, source)
    load_state_strict(backbone, state, source, f"EVA-CLIP visual ({variant})")
    return backbone


def _make_config(values: dict[str, Any]) -> Eva02Config:
    cfg = dataclass_config("eva02", Eva02Config, values)
    if cfg.width % cfg.heads:
        raise ConfigError(f"eva02: width {cfg.width} is not divisible by heads {cfg.heads}")
    return cfg


__all__ = [
    "Eva02Backbone",
    "Eva02Config",
    "PRESETS",
    "apply_rope",
    "build_eva02",
    "public_state_dict",
    "rope_angles",
]
