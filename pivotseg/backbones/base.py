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

# OpenAI CLIP's pixel statistics on the 0-255 scale (CLIP, EVA02-CLIP, CLIP-ResNet).
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement the abstract methods.

    Attributes:
        name: short name used in configs (``"dinov2"``, ``"tinyvit"``, ...).
        patch_size: side of one token in pixels at the first transformer block.
        size_divisor: H and W must be multiples of this (patch size, or the largest stride).
        pixel_mean, pixel_std: the normalisation used in pretraining, on the 0-255 scale.
        out_indices: blocks whose outputs :meth:`forward` returns as feature maps.
    """

    name: str = ""
    patch_size: int = 16
    size_divisor: int = 16
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

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

    def forward_blocks(
        self, pixel_values: torch.Tensor, indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """Feature maps ``(B, C, h, w)`` after each block in ``indices``."""
        raise NotImplementedError

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
