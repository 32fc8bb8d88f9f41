"""The style site: the block output of a backbone whose features FAMix stylises.

A site reaches the backbone only through its split interface (:class:`SplitPoint`,
:meth:`~pivotseg.backbones.base.Backbone.run_to_block`,
:meth:`~pivotseg.backbones.base.Backbone.continue_from_block`,
:meth:`~pivotseg.backbones.base.Backbone.add_map_hook`), so FAMix knows no backbone's internals.

Which blocks: a CNN splits at its stages (``clip_resnet``: ``layer1``..``layer4``), named in
configs; FAMix stylises ``layer1``. A transformer splits after any block, given by index
(``2`` or ``"block2"``); methods.md proposes blocks 2-4 and the default is the earliest of them,
because style statistics live early [P]. Either way the last split point is refused: mining
needs blocks after the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError

DEFAULT_BLOCK = 2


class StyleSite:
    """Split point ``index`` of ``backbone`` (an index :meth:`Backbone.split_points` lists).

    Attributes:
        layer_id: the point's name (``layer1``, ``block2``), written into style banks.
        stride, channels: of the site's feature map.
        activation: applied after restyling: ReLU where the point ends in one (a restyled ResNet
            stage output stays non-negative), else none (tokens are a signed residual stream).
        embed_grid: the site's grid at the pretraining resolution, or None.
    """

    def __init__(self, backbone: Backbone, index: int):
        point = backbone.split_points()[index]
        self.backbone = backbone
        self.index = index
        self.layer_id = point.name
        self.stride = point.stride
        self.channels = point.channels
        self.activation: Callable[[torch.Tensor], torch.Tensor] | None = (
            F.relu if point.nonnegative else None
        )
        self.embed_grid = point.pretraining_grid

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, C, h, w)`` features of normalised pixels and the tokens beside them (or None)."""
        try:
            return self.backbone.run_to_block(pixels, self.index)
        except NotImplementedError:
            raise ConfigError(
                f"famix: mining on {self.backbone.name} needs a CLIP ViT with its projection "
                "head (build the clip backbone from a full CLIPModel source)"
            ) from None

    def embed(self, patches: list[torch.Tensor], context: list[torch.Tensor | None]):
        """CLIP image embeddings ``(N, D)`` of restyled patches ``(C, h_i, w_i)``.

        ``context[i]``: the class tokens of patch ``i``'s image (None where the backbone has
        none). Without them, patches are average-pooled to the pretraining grid (FAMix's
        ``--resize_feat``), which also lets patches of any size share one batch.
        """
        backbone = self.backbone
        if self.embed_grid is not None and all(c is None for c in context):
            batch = torch.stack([F.adaptive_avg_pool2d(p, self.embed_grid) for p in patches])
            return backbone.continue_from_block(self.index, batch)
        return torch.cat(
            [backbone.continue_from_block(self.index, p[None], c) for p, c in zip(patches, context)]
        )

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Register ``fn(features (B, C, h, w)) -> features`` in the backbone's forward."""
        return self.backbone.add_map_hook(self.index, fn)

    def run_to_site(self, pixels: torch.Tensor) -> None:
        """Run the backbone just far enough to compute the site's features."""
        self.backbone.forward_blocks(pixels, [self.index])


def style_site(backbone: Backbone, layer: str | int | None = None) -> StyleSite:
    """The style site of ``backbone``: a CNN stage by name (default its first, ``layer1``) or,
    for backbones with transformer blocks, the output of block ``layer`` (default 2)."""
    points = backbone.split_points()
    if not points:
        raise ConfigError(
            f"famix: {backbone.name} has neither CLIP ResNet stages nor transformer blocks"
        )
    if not backbone.blocks:
        names = [p.name for p in points]
        stage = names[0] if layer is None else str(layer)
        if stage not in names[:-1]:
            raise ConfigError(
                f"famix: layer {stage!r} is not a stage FAMix can stylise; use one of "
                f"{', '.join(names[:-1])} (FAMix: {names[0]})"
            )
        return StyleSite(backbone, names.index(stage))
    return StyleSite(backbone, _block_index(backbone, len(points), layer))


def _block_index(backbone: Backbone, n: int, layer: str | int | None) -> int:
    if layer is None:
        layer = DEFAULT_BLOCK
    if isinstance(layer, str):
        layer = int(layer[5:]) if layer.startswith("block") and layer[5:].isdigit() else layer
    if not isinstance(layer, int):
        raise ConfigError(f"famix: layer {layer!r} for {backbone.name}: give a block index")
    if not -n <= layer < n - 1:
        raise ConfigError(
            f"famix: layer {layer} is not a block of {backbone.name} before its last "
            f"(0..{n - 2}); methods.md proposes 2-4"
        )
    return layer % n


def site_fingerprint(site: StyleSite) -> dict[str, str]:
    """Hashes of the tensors the site's features depend on, in execution order.

    Every module that runs on the way to the site contributes its parameters and buffers (batch
    norm statistics included, counters excluded). Names are left out, so a CLIP loaded with or
    without its text tower gives the same hashes.
    """
    backbone = site.backbone
    ran: list[nn.Module] = []
    seen: set[int] = set()

    def record(module, args):
        if id(module) not in seen:
            seen.add(id(module))
            ran.append(module)

    handles = [m.register_forward_pre_hook(record) for m in backbone.modules()]
    first = next(backbone.parameters())
    side = max(2 * backbone.size_divisor, 32)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            site.run_to_site(torch.zeros(1, 3, side, side, device=first.device, dtype=first.dtype))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    shapes, values = hashlib.sha256(), hashlib.sha256()
    for module in ran:
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        for name, tensor in own:
            if name == "num_batches_tracked" or name.endswith("position_ids"):
                continue
            shapes.update(f"{type(module).__name__}.{name}{tuple(tensor.shape)};".encode())
            values.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {"config_hash": shapes.hexdigest()[:16], "weights_hash": values.hexdigest()[:16]}
