"""CLIP's ModifiedResNet image tower (RN50, RN101), written from the CLIP paper's description.

Differences from a torchvision ResNet (Radford et al. 2021, section 2.4):

* a three-convolution stem (3x3 convs, the first with stride 2) followed by a 2x2 average pool
  instead of one 7x7 conv and a max pool;
* anti-aliased downsampling: a bottleneck with stride s keeps all convs at stride 1 and average
  pools by s after its 3x3 conv; its shortcut average pools by s before the 1x1 projection;
* an attention pool instead of global average pooling: the mean token plus the flattened grid,
  with a learned position embedding, attended to by the mean token only (multi-head QKV
  attention), then projected to the CLIP embedding.

For segmentation, :attr:`ClipResNetConfig.output_stride` 16 (FAMix) or 8 replaces the stride
of layer4 (and layer3) with dilation: the strided bottleneck's average pools become stride 1 and
later 3x3 convs are dilated. ``dilation_pattern="torchvision"`` dilates every block after the
first; ``"famix"`` reproduces FAMix's code, which leaves the first and middle blocks at their
previous dilation and dilates only the last block of the stage.

Features are the outputs of layer1..layer4 (strides 4, 8, 16, 32, or less where dilated).
:meth:`ClipResNetBackbone.forward_stages` runs any contiguous range of stages,
:meth:`ClipResNetBackbone.add_stage_hook` rewrites a stage's output inside an ordinary forward,
and :meth:`ClipResNetBackbone.attnpool_forward` turns layer4 features into the CLIP image
embedding. Through the generic split interface (``Backbone.run_to_block`` and the rest; index
``i`` is stage ``layer{i+1}``, as in ``out_indices``) FAMix stylises layer1 features and runs
layers 2-4 and the attention pool on them. There are no
transformer blocks: :attr:`blocks` is empty, so token-hook methods (Rein, DPFT) refuse this
backbone.

Checkpoints: module names follow OpenAI's CLIP layout (``visual.conv1.weight``,
``visual.layer1.0.downsample.0.weight``, ``visual.attnpool.c_proj.weight``...), so a public
checkpoint converted to ``.safetensors`` loads strictly; batch-norm ``num_batches_tracked``
counters absent from a file are set to 0, and fp16 tensors are cast to fp32.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pivotseg.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    Backbone,
    SplitPoint,
    dataclass_config,
    is_saved_folder,
    load_state_strict,
    read_safetensors_file,
    read_saved_folder,
)
from pivotseg.errors import ConfigError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
DILATION_PATTERNS = ("torchvision", "famix")


@dataclass
class ClipResNetConfig:
    """Architecture of a CLIP ModifiedResNet (defaults: RN50).

    Attributes:
        layers: bottlenecks per stage.
        width: stem width; stage ``i`` has ``width * 2**i`` planes and 4x that many outputs.
        heads: attention-pool heads (CLIP uses ``width * 32 // 64``).
        output_dim: CLIP embedding size the attention pool projects to.
        image_size: pretraining resolution; the attention pool's grid is ``image_size // 32``.
        attnpool: build the attention pool (kept loadable; segmentation features never use it).
        output_stride: 32 (as pretrained), 16 (dilated layer4) or 8 (dilated layer3 and 4).
        dilation_pattern: ``"torchvision"`` or ``"famix"`` (see the module docstring).
        norm_eval: keep every batch norm in eval mode while training (frozen statistics).
    """

    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    width: int = 64
    heads: int = 32
    output_dim: int = 1024
    image_size: int = 224
    attnpool: bool = True
    output_stride: int = 32
    dilation_pattern: str = "torchvision"
    norm_eval: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    "RN50": dict(layers=[3, 4, 6, 3], width=64, heads=32, output_dim=1024, image_size=224),
    "RN101": dict(layers=[3, 4, 23, 3], width=64, heads=32, output_dim=512, image_size=224),
}
DEFAULT_VARIANT = "RN50"


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> [avgpool s] -> 1x1, shortcut [avgpool s] -> 1x1 -> BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # The shortcut's pool has no weights; keeping it outside the Sequential leaves the
            # public key names ``downsample.0`` (conv) and ``downsample.1`` (BN).
            self.down_pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.downsample = nn.Sequential(
                OrderedDict(
                    [("0", nn.Conv2d(inplanes, out, 1, bias=False)), ("1", nn.BatchNorm2d(out))]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        shortcut = x if self.downsample is None else self.downsample(self.down_pool(x))
        return F.relu(y + shortcut)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean token attends to itself and the grid (with positions)."""

    def __init__(self, grid: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.grid = grid
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1 + h*w, C)`` position embedding, grid part resized bicubically if needed."""
        pos = self.positional_embedding
        if tuple(grid) == (self.grid, self.grid):
            return pos
        maps = pos[1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        maps = F.interpolate(maps.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        maps = maps.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([pos[:1], maps], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.position_embedding((h, w)).to(tokens.dtype)
        q = self.q_proj(tokens[:, :1])  # only the mean token's output is used
        k, v = self.k_proj(tokens), self.v_proj(tokens)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, C/heads)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """The tower with OpenAI's module names (no ``visual.`` prefix)."""

    def __init__(self, cfg: ClipResNetConfig):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)

        dilate = {32: (False, False), 16: (False, True), 8: (True, True)}[cfg.output_stride]
        inplanes, dilation = w, 1
        for i, n in enumerate(cfg.layers):
            stride, previous = (1 if i == 0 else 2), dilation
            if i >= 2 and dilate[i - 2]:
                dilation *= stride
                stride = 1
            blocks = []
            for j, d in enumerate(_dilations(n, previous, dilation, cfg.dilation_pattern)):
                blocks.append(Bottleneck(inplanes, w * 2**i, stride if j == 0 else 1, d))
                inplanes = w * 2**i * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        if cfg.attnpool:
            self.attnpool = AttentionPool2d(cfg.image_size // 32, w * 32, cfg.heads, cfg.output_dim)
        self._init_weights(cfg)

    def _init_weights(self, cfg: ClipResNetConfig) -> None:
        # CLIP's init: zero the last BN of each bottleneck so blocks start as identities.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
        if cfg.attnpool:
            std = self.attnpool.c_proj.in_features**-0.5
            for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(self.attnpool.c_proj.weight, std=std)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)


def _dilations(n: int, previous: int, new: int, pattern: str) -> list[int]:
    """3x3-conv dilation of each of a stage's ``n`` blocks."""
    if pattern == "torchvision" or n == 1:
        return [previous] + [new] * (n - 1)
    # FAMix's code builds its first block with dilation 1, the middle ones at the previous
    # dilation and only the last at the new one.
    return [1] + [previous] * (n - 2) + [new]


class ClipResNetBackbone(Backbone):
    """CLIP ModifiedResNet behind the :class:`Backbone` interface.

    ``out_indices`` index the four stages (0 = layer1 ... 3 = layer4), not blocks.
    """

    name = "clip_resnet"
    pixel_mean = CLIP_MEAN
    pixel_std = CLIP_STD

    def __init__(self, cfg: ClipResNetConfig, out_indices=None):
        super().__init__(out_indices)
        self.cfg = cfg
        self.visual = ModifiedResNet(cfg)
        self.patch_size = 4
        self.size_divisor = cfg.output_stride

    # ----- stages instead of blocks ---------------------------------------------------------
    @property
    def blocks(self):
        return []

    @property
    def block_dims(self):
        return []

    def block_strides(self):
        return []

    @property
    def stage_dims(self) -> list[int]:
        return [self.cfg.width * 2**i * Bottleneck.expansion for i in range(4)]

    @property
    def stage_strides(self) -> list[int]:
        return [4, 8, min(16, self.cfg.output_stride), self.cfg.output_stride]

    @property
    def out_indices(self) -> list[int]:
        if self._out_indices is not None:
            return [i % 4 for i in self._out_indices]
        return [0, 1, 2, 3]

    @out_indices.setter
    def out_indices(self, value) -> None:
        self._out_indices = list(value)

    @property
    def out_dims(self) -> list[int]:
        return [self.stage_dims[i] for i in self.out_indices]

    @property
    def out_strides(self) -> list[int]:
        return [self.stage_strides[i] for i in self.out_indices]

    def train(self, mode: bool = True) -> ClipResNetBackbone:
        super().train(mode)
        if self.cfg.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    # ----- running parts of the network -----------------------------------------------------
    def _stage(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.visual.stem if name == "stem" else getattr(self.visual, name)

    def stage_outputs(
        self, x: torch.Tensor, start: str = "stem", stop: str = "layer4"
    ) -> dict[str, torch.Tensor]:
        """Run stages ``start`` .. ``stop`` (inclusive) of :data:`STAGES`; every stage's output.

        Args:
            x: normalised pixels if ``start == "stem"``, else the output of the stage before
                ``start`` (e.g. layer1 features for ``start="layer2"``).
        """
        for s in (start, stop):
            if s not in STAGES:
                raise ValueError(f"clip_resnet: unknown stage {s!r}; stages: {', '.join(STAGES)}")
        first, last = STAGES.index(start), STAGES.index(stop)
        if first > last:
            raise ValueError(f"clip_resnet: stage {start!r} comes after {stop!r}")
        outputs = {}
        for name in STAGES[first : last + 1]:
            x = self._stage(name)(x)
            outputs[name] = x
        return outputs

    def forward_stages(
        self, x: torch.Tensor, start: str = "stem", stop: str = "layer4"
    ) -> torch.Tensor:
        """Output of stage ``stop`` after running ``start`` .. ``stop`` (see ``stage_outputs``)."""
        return self.stage_outputs(x, start, stop)[stop]

    def forward_from(self, layer_name: str, features: torch.Tensor) -> torch.Tensor:
        """layer4 features from the output of stage ``layer_name`` (runs the stages after it)."""
        index = STAGES.index(layer_name) if layer_name in STAGES else -1
        if index < 0 or layer_name == "layer4":
            raise ValueError(f"clip_resnet: forward_from needs one of {', '.join(STAGES[:-1])}")
        return self.forward_stages(features, start=STAGES[index + 1])

    def add_stage_hook(
        self, stage: str, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> RemovableHandle:
        """Let ``fn(features (B, C, h, w)) -> features`` rewrite a layer's output in every forward.

        This is how a feature-space augmentation (FAMix style mixing after layer1) plugs into an
        ordinary segmenter forward. ``stage`` is ``layer1`` .. ``layer4``.
        """
        if stage not in STAGES[1:]:
            raise ValueError(f"clip_resnet: hookable stages are {', '.join(STAGES[1:])}")
        return getattr(self.visual, stage).register_forward_hook(lambda m, a, out: fn(out))

    def forward_blocks(self, pixel_values, indices):
        last = STAGES[max(indices) + 1]
        outputs = self.stage_outputs(pixel_values, "stem", last)
        return [outputs[STAGES[i + 1]] for i in indices]

    # ----- running in two parts (stage i: layer{i+1}) ------------------------------------------
    def split_points(self) -> list[SplitPoint]:
        return [
            SplitPoint(
                STAGES[i + 1],
                stride,
                dim,
                nonnegative=True,
                pretraining_grid=self.cfg.image_size // stride,
            )
            for i, (stride, dim) in enumerate(zip(self.stage_strides, self.stage_dims))
        ]

    def run_to_block(self, pixel_values, index):
        return self.forward_stages(pixel_values, "stem", STAGES[1:][index]), None

    def continue_from_block(self, index, features, prefix=None):
        stage = STAGES[1:][index]
        if stage != STAGES[-1]:
            features = self.forward_from(stage, features)
        return self.attnpool_forward(features)

    def add_map_hook(self, index, fn):
        return self.add_stage_hook(STAGES[1:][index], fn)

    def last_block_prefix(self) -> str:
        return f"visual.layer4.{len(self.visual.layer4) - 1}."

    def attnpool_forward(self, layer4_features: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding ``(B, output_dim)`` from layer4 features of any grid size."""
        if not self.cfg.attnpool:
            raise ConfigError("clip_resnet: built with attnpool=False; set it to True")
        return self.visual.attnpool(layer4_features)

    def clip_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> CLIP image embedding (the whole tower, attention pool included)."""
        self.check_input(pixel_values)
        return self.attnpool_forward(self.forward_stages(pixel_values))

    def config_dict(self):
        return {
            "name": self.name,
            "config": dataclasses.asdict(self.cfg),
            "out_indices": self._out_indices,
        }


# ----- checkpoints -------------------------------------------------------------------------------
def _from_public(state: dict[str, torch.Tensor], backbone: ClipResNetBackbone) -> dict:
    """Map an OpenAI-layout state dict onto ``backbone``'s keys."""
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {"visual." + k: v for k, v in state.items()}
    if not backbone.cfg.attnpool:
        state = {k: v for k, v in state.items() if not k.startswith("visual.attnpool.")}
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    for key, value in backbone.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def public_state_dict(backbone: ClipResNetBackbone) -> dict[str, torch.Tensor]:
    """The weights in OpenAI's CLIP layout (``visual.*`` keys, batch-norm counters left out)."""
    return {
        k: v.detach()
        for k, v in backbone.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def build_clip_resnet(source=None, config=None, out_indices=None) -> ClipResNetBackbone:
    """CLIP RN50/RN101 from a public ``.safetensors`` file, a saved folder, or random.

    Args:
        source: OpenAI's CLIP checkpoint converted to ``.safetensors`` (``visual.`` prefix
            optional, text tower ignored), a :meth:`Backbone.save_pretrained` folder, or
            ``None`` for random weights.
        config: ``{"variant": "RN50" | "RN101", ...}`` plus any :class:`ClipResNetConfig` field
            (``output_stride=16`` for FAMix).
        out_indices: stages (0-3 = layer1-layer4) whose outputs become feature maps.
    """
    config = dict(config or {})
    if is_saved_folder(source):
        saved, state = read_saved_folder(source)
        config.pop("variant", None)
        cfg = _make_config({**saved["config"], **config})
        backbone = ClipResNetBackbone(cfg, out_indices or saved.get("out_indices"))
        load_state_strict(backbone, state, source, "pivotseg clip_resnet")
        return backbone
    variant = config.pop("variant", DEFAULT_VARIANT)
    if variant not in PRESETS:
        raise ConfigError(f"clip_resnet: unknown variant {variant!r}; known: {', '.join(PRESETS)}")
    backbone = ClipResNetBackbone(_make_config({**PRESETS[variant], **config}), out_indices)
    if source is None:
        return backbone
    state = _from_public(read_safetensors_file(source, "clip_resnet", "OpenAI's .pt"), backbone)
    load_state_strict(backbone, state, source, f"OpenAI CLIP visual ({variant})")
    return backbone


def _make_config(values: dict[str, Any]) -> ClipResNetConfig:
    cfg = dataclass_config("clip_resnet", ClipResNetConfig, values)
    cfg.layers = list(cfg.layers)
    if len(cfg.layers) != 4:
        raise ConfigError(f"clip_resnet: layers must list 4 stage depths, got {cfg.layers}")
    if cfg.output_stride not in (8, 16, 32):
        raise ConfigError(
            f"clip_resnet: output_stride must be 8, 16 or 32, not {cfg.output_stride}"
        )
    if cfg.dilation_pattern not in DILATION_PATTERNS:
        raise ConfigError(
            f"clip_resnet: dilation_pattern must be one of {DILATION_PATTERNS}, "
            f"not {cfg.dilation_pattern!r}"
        )
    return cfg


__all__ = [
    "STAGES",
    "ClipResNetBackbone",
    "ClipResNetConfig",
    "PRESETS",
    "build_clip_resnet",
    "public_state_dict",
]
