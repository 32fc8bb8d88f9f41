"""The one interface every backbone offers to tuning methods, heads and tasks.

A backbone maps normalised pixels ``(B, 3, H, W)`` to feature maps ``(B, C, h, w)`` taken after
chosen blocks (``out_indices``). Tuning methods never see a model's own tensor layout: they call
:meth:`Backbone.add_block_hook` with a function of ``(tokens (B, N, C), (h, w)) -> tokens`` over
the *patch* tokens of block ``i``; the backbone unpacks and repacks its block output (class or
register tokens, ``(B, H, W, C)`` layouts, tuple outputs) around that call.

Input sizes: :meth:`forward` requires H and W to be multiples of :attr:`size_divisor` and raises
a ``ValueError`` naming the nearest valid size otherwise. Padding is the caller's choice (the
segmenter pads bottom/right and crops its logits back), so that no backbone silently changes what
it was given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

TokenFn = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]

CONFIG_NAME = "pivotseg_backbone.json"

# ImageNet's pixel statistics on the 0-255 scale (DINOv2, SAM, SAM2, TinyViT: the default).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# OpenAI CLIP's pixel statistics on the 0-255 scale (CLIP, EVA02-CLIP, CLIP-ResNet).
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


@dataclasses.dataclass(frozen=True)
class SplitPoint:
    """A block output where :meth:`Backbone.run_to_block` can stop (see there).

    Attributes:
        name: how configs and saved files name it (``block2``; a CNN names its stages,
            ``layer1``).
        stride: pixels per cell of its feature map.
        channels: its channel width.
        nonnegative: it ends in a ReLU, so a rewritten map should pass through one again.
        pretraining_grid: side of its feature map at the pretraining resolution, if fixed.
    """

    name: str
    stride: int
    channels: int
    nonnegative: bool = False
    pretraining_grid: int | None = None


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement the abstract methods.

    A backbone whose blocks run one after the other provides :meth:`block_input`,
    :meth:`block_map` (and :meth:`run_block` when a block takes more than its input) and inherits
    :meth:`forward_blocks`; one with another structure (stages, a neck fed by stage maps)
    overrides :meth:`forward_blocks` instead.

    Attributes:
        name: short name used in configs (``"dinov2"``, ``"tinyvit"``, ...).
        patch_size: side of one token in pixels at the first transformer block.
        size_divisor: H and W must be multiples of this (patch size, or the largest stride).
        pixel_mean, pixel_std: the normalisation used in pretraining, on the 0-255 scale
            (default ImageNet's).
        out_indices: blocks whose outputs :meth:`forward` returns as feature maps.
    """

    name: str = ""
    patch_size: int = 16
    size_divisor: int = 16
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, out_indices: Sequence[int] | None = None):
        super().__init__()
        self._out_indices = list(out_indices) if out_indices is not None else None
        self._frozen = False

    # ----- what subclasses provide ------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer (or residual) blocks in execution order; empty if there are none."""
        raise NotImplementedError

    @property
    def block_dims(self) -> list[int]:
        """Channel width of each block's output, same order as :attr:`blocks`."""
        raise NotImplementedError

    def block_strides(self) -> list[int]:
        """Output stride (pixels per token) of each block."""
        raise NotImplementedError

    def _split_block_output(self, index: int, output):
        """Return ``(patch_tokens (B, N, C), (h, w), rebuild)`` for block ``index``'s output.

        ``rebuild(new_patch_tokens)`` must return an object of the same structure as ``output``.
        """
        raise NotImplementedError

    def block_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What enters block 0 (e.g. embedded tokens); records the token grid hooks need."""
        raise NotImplementedError

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``index`` applied to the output of the block before it (or of ``block_input``)."""
        out = self.blocks[index](x)
        return out[0] if isinstance(out, tuple) else out

    def block_map(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The feature map ``(B, C, h, w)`` of block ``index``'s output ``x``."""
        raise NotImplementedError

    def neck_map(self, x: torch.Tensor) -> torch.Tensor:
        """The neck's feature map from the last block's output (level ``num_blocks``)."""
        raise NotImplementedError(f"backbone {self.name!r} has no neck")

    def forward_blocks(
        self, pixel_values: torch.Tensor, indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """Feature maps ``(B, C, h, w)`` after each block in ``indices`` (``num_blocks``: the neck).

        Blocks after the last one asked for are not run.
        """
        n = self.num_blocks
        wanted = set(indices)
        x = self.block_input(pixel_values)
        maps = {}
        for i in range(min(max(wanted), n - 1) + 1):
            x = self.run_block(i, x)
            if i in wanted:
                maps[i] = self.block_map(i, x)
        if n in wanted:
            maps[n] = self.neck_map(x)
        return [maps[i] for i in indices]

    def config_dict(self) -> dict:
        """Everything needed to rebuild this backbone (without weights) via :func:`build_backbone`."""
        raise NotImplementedError

    # ----- shared behaviour -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def out_indices(self) -> list[int]:
        if self._out_indices is not None:
            return [i % self.num_blocks for i in self._out_indices]
        return default_out_indices(self.num_blocks)

    @out_indices.setter
    def out_indices(self, value: Sequence[int]) -> None:
        self._out_indices = list(value)

    @property
    def out_dims(self) -> list[int]:
        dims = self.block_dims
        return [dims[i] for i in self.out_indices]

    @property
    def out_strides(self) -> list[int]:
        strides = self.block_strides()
        return [strides[i] for i in self.out_indices]

    def check_input(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{self.name}: expected images (B, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        h, w = pixel_values.shape[-2:]
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"{self.name}: input {h}x{w} is not a multiple of {d}; pad to "
                f"{-(-h // d) * d}x{-(-w // d) * d} (the segmenter pads bottom/right for you)"
            )

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(pixel_values)
        return self.forward_blocks(pixel_values, self.out_indices)

    def add_block_hook(self, index: int, fn: TokenFn) -> RemovableHandle:
        """Let ``fn`` rewrite the patch tokens that block ``index`` outputs.

        ``fn`` receives ``(B, N, C)`` patch tokens (no class/register tokens) and the token grid
        ``(h, w)``; it returns tokens of the same shape.
        """
        if not self.blocks:
            raise ValueError(f"backbone {self.name!r} has no transformer blocks to hook")

        def hook(module, args, output):
            tokens, hw, rebuild = self._split_block_output(index, output)
            return rebuild(fn(tokens, hw))

        return self.blocks[index].register_forward_hook(hook)

    # ----- running in two parts: a feature-space augmentation (FAMix) works in between --------
    def split_points(self) -> list[SplitPoint]:
        """Where :meth:`run_to_block` can stop, by the index :meth:`forward_blocks` takes: after
        each block (a CNN: after each stage)."""
        pairs = zip(self.block_strides(), self.block_dims)
        return [SplitPoint(f"block{i}", stride, dim) for i, (stride, dim) in enumerate(pairs)]

    def run_to_block(
        self, pixel_values: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run up to block ``index``: its output as a map ``(B, C, h, w)`` and the tokens beside
        the patch tokens (class tokens ``(B, n, C)``; ``None`` where there are none), which
        :meth:`continue_from_block` takes back."""
        raise NotImplementedError(f"{self.name} cannot hand over its state after a block")

    def continue_from_block(
        self, index: int, features: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The pretraining's image embedding ``(B, D)`` (CLIP: the joint image-text space) from
        :meth:`run_to_block`'s output at ``index``, its map possibly rewritten: runs the blocks
        after ``index`` and the embedding head."""
        raise NotImplementedError(f"{self.name} has no image embedding to continue to")

    def add_map_hook(
        self, index: int, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> RemovableHandle:
        """Let ``fn(map (B, C, h, w)) -> map`` rewrite block ``index``'s output in every forward
        (:meth:`add_block_hook` on the token grid)."""

        def on_tokens(tokens, hw):
            return fn(tokens_to_map(tokens, hw)).flatten(2).transpose(1, 2)

        return self.add_block_hook(index, on_tokens)

    def last_block_prefix(self) -> str | None:
        """Name prefix of the last block's parameters (``"model.encoder.layer.11."``; a CNN:
        of its last residual block), or ``None`` when the block has no name here."""
        last = self.blocks[-1] if self.blocks else None
        for name, module in self.named_modules():
            if module is last:
                return name + "."
        return None

    def freeze(self) -> Backbone:
        """Stop gradients to every backbone parameter; frozen backbones stay in eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.train(self.training)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> Backbone:
        # A frozen backbone must not update norm statistics nor apply dropout/drop-path.
        super().train(mode and not self._frozen)
        self.training = mode
        return self

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std).view(1, 3, 1, 1)
        return mean, std

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``pivotseg_backbone.json`` + ``model.safetensors``; load with ``build_backbone``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        return folder


def default_out_indices(num_blocks: int) -> list[int]:
    """Four evenly spread blocks ending with the last, as ViT segmenters usually take."""
    if num_blocks <= 4:
        return list(range(num_blocks))
    step = num_blocks / 4
    return [round(step * (k + 1)) - 1 for k in range(4)]


def tokens_to_map(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) -> (B, C, h, w)."""
    b, n, c = tokens.shape
    h, w = hw
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe_key_mismatch(
    missing: Sequence[str],
    unexpected: Sequence[str],
    reshaped: Sequence[tuple[str, Sequence[int], Sequence[int]]],
) -> str:
    """One-line summary of keys that do not fit, or ``""`` when all fit.

    Args:
        missing: keys the model has and the checkpoint lacks.
        unexpected: keys the checkpoint has and the model lacks.
        reshaped: ``(key, checkpoint shape, model shape)`` for keys whose shapes differ.
    """
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if reshaped:
        key, got, want = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape (e.g. {key}: {tuple(got)} vs {tuple(want)})"
        )
    return "; ".join(parts)


def state_mismatch(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    optional: Collection[str] = (),
) -> str:
    """:func:`describe_key_mismatch` of ``state`` against ``own``; ``optional`` keys may be extra."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in optional]
    reshaped = [
        (k, state[k].shape, own[k].shape)
        for k in own
        if k in state and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    return describe_key_mismatch(missing, unexpected, reshaped)


def load_state_strict(
    module: nn.Module, state: dict[str, torch.Tensor], source, layout: str
) -> None:
    """Load ``state`` exactly, or raise a one-line CheckpointError naming the mismatching keys."""
    from pivotseg.errors import CheckpointError

    mismatch = state_mismatch(module.state_dict(), state)
    if mismatch:
        raise CheckpointError(
            f"{source}: does not fit the {layout} layout: {mismatch}; "
            "check the backbone name and config"
        )
    module.load_state_dict(state, strict=True)


def read_saved_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config dict and tensors a :meth:`Backbone.save_pretrained` folder holds."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    return cfg, load_file(str(folder / "model.safetensors"))


def is_saved_folder(source) -> bool:
    return source is not None and Path(source).is_dir() and (Path(source) / CONFIG_NAME).exists()


def load_saved_folder(
    source, out_indices, make: Callable[[dict, list | None], Backbone]
) -> Backbone:
    """The backbone a :meth:`Backbone.save_pretrained` folder holds, its weights loaded strictly.

    Args:
        source: the folder.
        out_indices: feature levels asked for; when empty, the folder's own.
        make: ``(saved config dict, out_indices) -> backbone`` with random weights.
    """
    saved, state = read_saved_folder(source)
    backbone = make(saved, out_indices or saved.get("out_indices"))
    held = f" ({saved['model_class']})" if "model_class" in saved else ""
    load_state_strict(backbone, state, source, f"pivotseg {backbone.name}{held}")
    return backbone


# ----- helpers shared by several backbones ----------------------------------------------------
NECK = "neck"


def levels_with_neck(name: str, value: Sequence[int | str], num_blocks: int) -> list[int]:
    """Resolve ``out_indices`` of a backbone whose neck output follows its last block.

    Block indices may be negative; ``num_blocks`` or ``"neck"`` stands for the neck, which gets
    level ``num_blocks``.

    Raises:
        ConfigError: an entry is neither a block index nor the neck.
    """
    from pivotseg.errors import ConfigError

    n = num_blocks
    levels = []
    for i in value:
        if i == NECK or i == n:
            levels.append(n)
        elif isinstance(i, int) and -n <= i < n:
            levels.append(i % n)
        else:
            raise ConfigError(
                f"{name}: out_indices entry {i!r} is not a block index in [-{n}, {n - 1}] nor "
                f"{n} / 'neck' (the neck output)"
            )
    return levels


def split_grid_output(output):
    """:meth:`Backbone._split_block_output` for blocks that output ``(B, H, W, C)`` grids."""
    tensor = output[0] if isinstance(output, tuple) else output
    b, h, w, c = tensor.shape

    def rebuild(new_tokens):
        out = new_tokens.reshape(b, h, w, c)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return tensor.reshape(b, h * w, c), (h, w), rebuild


def read_safetensors_file(source, name: str, convert_what: str) -> dict[str, torch.Tensor]:
    """Tensors of a public checkpoint already converted to ``.safetensors``.

    Args:
        source: path to the ``.safetensors`` file.
        name: backbone name, for the message.
        convert_what: what the user should convert, for the message (e.g. ``"a .pt checkpoint"``).

    Raises:
        CheckpointError: ``source`` is not an existing ``.safetensors`` file.
    """
    from safetensors.torch import load_file

    from pivotseg.errors import CheckpointError

    path = Path(source)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"{source}: {name} loads a .safetensors file or a save_pretrained folder; convert "
            f"{convert_what} once with safetensors.torch.save_file in a trusted environment"
        )
    return load_file(str(path))


def choose_preset(
    name: str, presets: dict[str, dict], config: dict | None, default: str
) -> tuple[str, dict]:
    """The preset ``config["variant"]`` names (``default`` if none) and the other settings.

    Raises:
        ConfigError: the variant is not a key of ``presets``.
    """
    from pivotseg.errors import ConfigError

    overrides = dict(config or {})
    variant = overrides.pop("variant", default)
    if variant not in presets:
        raise ConfigError(f"{name}: unknown variant {variant!r}; known: {', '.join(presets)}")
    return variant, overrides


def dataclass_config(name: str, config_class: type, values: dict):
    """``config_class(**values)``, or a ConfigError naming keys the dataclass does not have."""
    from pivotseg.errors import ConfigError

    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{name}: unknown config keys {unknown}; known: {', '.join(sorted(known))}"
        )
    return config_class(**values)
