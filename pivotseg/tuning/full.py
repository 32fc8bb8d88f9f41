"""``full``: fine-tune the whole backbone, VLTSeg's recipe (methods.md section 3).

VLTSeg's (unofficial, MIT) reimplementation trains every encoder parameter with AdamW at the
head's learning rate times 0.1, no weight decay on the encoder's norms and position embedding,
and clips the gradient norm at 0.01. This module carries the parameter side of that recipe:

* :meth:`Full.param_group_rules`: backbone ``lr_mult`` 0.1 (``backbone_lr_mult``);
  ``decay_mult`` 0 for parameters of normalisation layers (any module whose class name contains
  ``Norm``), position embeddings / relative position biases, and class, register and mask
  tokens (VLTSeg names norms and ``pos_embed``; the class/register tokens are our addition, as
  in BEiT-style recipes);
* optional layer-wise learning-rate decay (``layer_decay`` < 1; not in VLTSeg, whose paper is
  silent, offered for ViT fine-tuning ablations): block ``i`` of ``L`` gets
  ``lr_mult * layer_decay ** (L - i)``; parameters outside blocks get the factor of the last block
  that ran before their module (the stem: ``layer_decay ** (L + 1)``).

VLTSeg's gradient clipping is a run setting, ``train.grad_clip`` (0.01 in
``configs/vltseg_eva02clipl_gta2cbm_512.yaml``), not part of the method.

Parameters that a forward at the backbone's ``out_indices`` never touches (DINOv2's final
LayerNorm and mask token, blocks after the deepest output) are left frozen: they would get no
gradient, and DDP without ``find_unused_parameters`` fails on them. They are found by one probe
forward on a ``2 x size_divisor`` square input when the method attaches.
"""

from __future__ import annotations

from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError
from pivotseg.tuning.base import BACKBONE_PREFIX, Rule, TuningMethod, param_owners, probe_forward

# Leaf-name fragments of parameters that take no weight decay (embeddings of positions/tokens).
NO_DECAY_NAME_PARTS = (
    "position",
    "pos_embed",
    "rel_pos",
    "attention_biases",
    "cls_token",
    "class_embedding",
    "register_tokens",
    "mask_token",
)


class Full(TuningMethod):
    """Train the whole backbone (VLTSeg).

    Args:
        backbone: the backbone to fine-tune; must not be frozen.
        num_classes: unused (kept for the common builder signature).
        backbone_lr_mult: learning-rate factor of backbone parameters (VLTSeg: 0.1).
        layer_decay: layer-wise learning-rate decay; 1.0 disables it.
    """

    name = "full"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        backbone_lr_mult: float = 0.1,
        layer_decay: float = 1.0,
    ):
        super().__init__(
            backbone, num_classes, backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay
        )
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"full: layer_decay must be in (0, 1], got {layer_decay}")
        self.backbone_lr_mult = backbone_lr_mult
        self.layer_decay = layer_decay
        self._layer_ids: dict[str, int] = {}

    def attach(self, backbone: Backbone) -> None:
        if backbone.frozen:
            raise ConfigError(
                "full fine-tuning got a frozen backbone; build it unfrozen or use frozen/lora/rein"
            )
        for param in backbone.parameters():
            param.requires_grad_(True)
        used, layer_ids = probe_forward(backbone)
        for name, param in backbone.named_parameters():
            param.requires_grad_(name in used)
        self._layer_ids = {name: layer_ids.get(name, 0) for name in used}

    def param_group_rules(self) -> list[Rule]:
        owners = param_owners(self.backbone)
        last = self.backbone.num_blocks + 1
        rules: list[Rule] = []
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = _no_decay(name, owners[name])
            scale = self.layer_decay ** (last - self._layer_ids[name])
            if no_decay or self.layer_decay != 1.0:
                lr_mult = self.backbone_lr_mult * scale
                rules.append(
                    (
                        BACKBONE_PREFIX + name,
                        {"lr_mult": lr_mult, "decay_mult": 0.0 if no_decay else 1.0},
                    )
                )
        rules.append((BACKBONE_PREFIX, {"lr_mult": self.backbone_lr_mult, "decay_mult": 1.0}))
        return rules


def _no_decay(name: str, owner: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "Norm" in type(owner).__name__ or any(part in leaf for part in NO_DECAY_NAME_PARTS)
