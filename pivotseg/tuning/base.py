"""What every tuning method offers the segmenter (the methods themselves: ``docs/methods.md``).

A tuning method decides which backbone parameters train and may add its own modules, attached
only through the :class:`~pivotseg.backbones.base.Backbone` interface: block hooks
(:meth:`Backbone.add_block_hook`) or adapters injected into the backbone's modules (peft). It
never edits model code.

Parameter names: :meth:`TuningMethod.trainable_parameters` and :meth:`param_group_rules` use the
full names the parameters have inside the segmenter, which holds the backbone as ``backbone``
and the method as ``tuning``: ``"backbone.model.encoder.layer.0.norm1.weight"``,
``"tuning.tokens_a.0"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError

BACKBONE_PREFIX = "backbone."
TUNING_PREFIX = "tuning."

Rule = tuple[str, dict[str, float]]


class TuningMethod(nn.Module):
    """Base class; subclasses build their modules in ``__init__`` and hook in :meth:`attach`.

    The backbone is referenced, not owned: it is kept out of this module's children so that the
    segmenter's state dict holds its tensors once, under ``backbone.``.

    Attributes:
        name: the key of :data:`pivotseg.tuning.METHODS`.
        provides_queries: the class can supply Mask2Former queries; its constructor then takes
            ``query_dim`` (their width) and ``link_queries`` (build the query link at all),
            which :func:`~pivotseg.segmenter.build_segmenter` sets from the head.
        num_queries: rows of :meth:`queries` (0 when this instance gives none).
        warmup_images: source images the engine runs through the model (no gradients) before
            training starts, calling :meth:`warm_up` after each batch; 0 = no warm-up.
        path_args: constructor arguments that name files; a run config resolves them as it
            resolves its other paths (FAMix: ``style_bank``).
    """

    name: str = ""
    provides_queries: bool = False
    num_queries: int = 0
    warmup_images: int = 0
    path_args: tuple[str, ...] = ()

    def __init__(self, backbone: Backbone, num_classes: int, **args: Any):
        super().__init__()
        self.__dict__["_backbone"] = backbone  # bypasses nn.Module registration on purpose
        self.num_classes = num_classes
        self._args = dict(args)
        self._handles: list[RemovableHandle] = []

    @property
    def backbone(self) -> Backbone:
        return self.__dict__["_backbone"]

    # ----- interface ------------------------------------------------------------------------
    def attach(self, backbone: Backbone) -> None:
        """Freeze what the method freezes and register its hooks or adapters (called once)."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(full name in the segmenter, parameter)`` for every parameter the method trains."""
        for name, param in self.backbone.named_parameters():
            if param.requires_grad:
                yield BACKBONE_PREFIX + name, param
        for name, param in self.named_parameters():
            if param.requires_grad:
                yield TUNING_PREFIX + name, param

    def param_group_rules(self) -> list[Rule]:
        """``(substring of a full name, {"lr_mult", "decay_mult"})``; first match wins."""
        return []

    def adaptable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` that test-time self-training may update on unlabelled
        target images (:mod:`pivotseg.tasks.adapt`): a small declared set, never the backbone.
        Empty by default: a method without such a set cannot be self-trained."""
        return iter(())

    def queries(self) -> torch.Tensor | None:
        """``(num_queries, query_dim)`` for Mask2Former query linkage, or ``None``."""
        return None

    def extra_loss(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses beyond the head's after a training forward (labels ``(B, H, W)``, 255 ignored)."""
        return {}

    def warm_up(self, labels: torch.Tensor) -> None:
        """After a no-grad forward of a warm-up batch (labels ``(B, H, W)`` as the input)."""

    def prepare_batch(self, labels: torch.Tensor) -> None:
        """Before each training forward, with its labels ``(B, H, W)`` at the input's size
        (FAMix picks each patch's style from its dominant class); nothing by default."""

    def config(self) -> dict[str, Any]:
        """The method's own constructor arguments; ``build_method(name, bb, K, **config())``."""
        return dict(self._args)

    # ----- shared helpers -------------------------------------------------------------------
    def add_hook(self, index: int, fn) -> None:
        self._handles.append(self.backbone.add_block_hook(index, fn))

    def remove_hooks(self) -> None:
        """Take the method's hooks off the backbone (adapters injected by peft stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def require_blocks(self) -> None:
        if not self.backbone.blocks:
            raise ConfigError(
                f"{self.name} needs transformer blocks; {self.backbone.name} has none; "
                "use frozen/full/lora"
            )

    def last_run_block(self) -> int:
        """Index of the last block a forward at the backbone's ``out_indices`` executes.

        Backbones stop after the deepest requested block; an index past the blocks (TinyViT's
        neck level) means every block runs.
        """
        return min(max(self.backbone.out_indices), self.backbone.num_blocks - 1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._args.items())


def param_owners(module: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that holds it directly."""
    owners = {}
    for mod_name, mod in module.named_modules():
        for leaf, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{leaf}" if mod_name else leaf] = mod
    return owners


def probe_forward(backbone: Backbone) -> tuple[set[str], dict[str, int]]:
    """Run one small forward; return the parameters it uses and each one's layer id.

    A parameter (among those that require grad) is used when the autograd graph of the outputs
    reaches it. The probe input is a ``2 x size_divisor`` square of zeros. Layer ids: block
    ``i``'s parameters get ``i + 1``; any other parameter gets the number of blocks that had
    finished when its module first ran (0 for the stem).
    """
    names = {id(p): n for n, p in backbone.named_parameters()}
    block_ids = {id(p): i + 1 for i, blk in enumerate(backbone.blocks) for p in blk.parameters()}
    owners = param_owners(backbone)
    finished = [0]
    entered: dict[int, int] = {}

    def on_enter(module, args):
        entered.setdefault(id(module), finished[0])

    handles = [m.register_forward_pre_hook(on_enter) for m in backbone.modules()]
    for i, blk in enumerate(backbone.blocks):

        def on_exit(module, args, output, i=i):
            finished[0] = max(finished[0], i + 1)

        handles.append(blk.register_forward_hook(on_exit))
    first = next(backbone.parameters())
    side = 2 * backbone.size_divisor
    pixels = torch.zeros(1, 3, side, side, device=first.device, dtype=first.dtype)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            outputs = backbone(pixels)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    used = {names[i] for i in _graph_leaves(outputs) if i in names}
    params = dict(backbone.named_parameters())
    layer_ids = {}
    for name in used:
        default = entered.get(id(owners[name]), 0)
        layer_ids[name] = block_ids.get(id(params[name]), default)
    return used, layer_ids


def _graph_leaves(outputs: list[torch.Tensor]) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of ``outputs`` reaches."""
    leaves: set[int] = set()
    seen = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves
