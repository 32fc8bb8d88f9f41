"""Mask2Former decode head from transformers' own modules, fed by a simple feature pyramid.

What comes from ``transformers.models.mask2former`` (used as is, never copied):
``Mask2FormerPixelDecoder`` (multi-scale deformable attention, pure-PyTorch path),
``Mask2FormerTransformerModule`` (masked-attention decoder), ``Mask2FormerLoss`` (Hungarian
matching via scipy, point-sampled mask BCE + dice, class CE) and ``Mask2FormerConfig``; the
modules are initialised by transformers' own ``_init_weights`` through a small
``Mask2FormerPreTrainedModel`` container. transformers' ``Mask2FormerModel`` insists on
building its own backbone, so this head calls the pixel decoder and the transformer module
directly on pyramid levels at strides 4/8/16/32 (the deformable encoder takes 8/16/32, the
stride-4 level feeds the mask features).

Defaults are Rein's ``rein_dinov2_mask2former`` settings: 100 queries, 9 masked-attention
layers, 256-d, 8 heads, pixel-decoder 6 layers with FFN 1024, decoder FFN 2048, loss weights
class 2 / mask 5 / dice 5, no-object 0.1, 12,544 points (oversample 3, importance 0.75),
auxiliary losses on every layer, and Rein's parameter-free bilinear pyramid. Note that
``decoder_layers`` here counts masked-attention layers (mmdet's convention); transformers'
config counts one more (the initial prediction), so it receives ``decoder_layers + 1``.

Query linkage (Rein, ``replace_query_feat=True``): a head built with
``external_queries=True`` has no learnt query tables; the tuning method's queries
``(num_queries, hidden_dim)`` are the query positional embeddings and
``query_feat = Linear(queries)`` the initial query features.

Ignored pixels (label 255, and the padding the segmenter adds) are negatives in every class
mask, exactly as mmdet's/mmseg's Mask2Former (used by Rein) builds its semantic targets: the
point-sampled mask loss cannot skip points without forking transformers' loss, and since an
ignored pixel belongs to no class mask, it only pushes every matched query's mask to 0 there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

from pivotseg.errors import ConfigError
from pivotseg.heads.base import IGNORE_INDEX, Head
from pivotseg.heads.pyramid import SimpleFeaturePyramid

PYRAMID_STRIDES = (4, 8, 16, 32)


class QueryLinkedTransformerModule(Mask2FormerTransformerModule):
    """transformers' masked-attention transformer module whose queries may come from outside.

    With ``external_queries`` the learnt ``queries_embedder``/``queries_features`` tables are
    removed (Rein deletes them too) and replaced by ``queries_to_features``. :meth:`forward`
    prepares the decoder inputs with the module's own submodules (sine positions, input
    projections, level embedding) exactly as the parent's forward does, then calls the parent's
    ``decoder`` with the chosen queries.
    """

    def __init__(self, in_features: int, config: Mask2FormerConfig, external_queries: bool):
        super().__init__(in_features=in_features, config=config)
        self.external_queries = external_queries
        if external_queries:
            del self.queries_embedder, self.queries_features
            self.queries_to_features = nn.Linear(config.hidden_dim, config.hidden_dim)

    def forward(
        self,
        multi_scale_features: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        queries: torch.Tensor | None = None,
    ):
        keys, key_positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            feature = multi_scale_features[level]
            sizes.append(feature.shape[-2:])
            position = self.position_embedder(feature.shape, feature.device, feature.dtype, None)
            key = self.input_projections[level](feature).flatten(2)
            key = key + self.level_embed.weight[level][None, :, None]
            # The decoder is sequence-first: (h*w, B, C).
            key_positions.append(position.flatten(2).permute(2, 0, 1))
            keys.append(key.permute(2, 0, 1))

        batch = mask_features.shape[0]
        if self.external_queries:
            if queries is None:
                raise ValueError("this Mask2Former head was built for external queries; got none")
            query_positions, query_features = queries, self.queries_to_features(queries)
        else:
            if queries is not None:
                raise ValueError(
                    "this Mask2Former head has its own learnt queries; build it with "
                    "external_queries=True to use the tuning method's queries"
                )
            query_positions = self.queries_embedder.weight
            query_features = self.queries_features.weight

        return self.decoder(
            inputs_embeds=_sequence_first(query_features, batch),
            multi_stage_positional_embeddings=key_positions,
            pixel_embeddings=mask_features,
            encoder_hidden_states=keys,
            query_position_embeddings=_sequence_first(query_positions, batch),
            feature_size_list=sizes,
            return_dict=True,
        )


def _sequence_first(queries: torch.Tensor, batch: int) -> torch.Tensor:
    """(Q, C) or (B, Q, C) -> (Q, B, C)."""
    if queries.ndim == 2:
        return queries.unsqueeze(1).repeat(1, batch, 1)
    return queries.transpose(0, 1)


class Mask2FormerModules(Mask2FormerPreTrainedModel):
    """Container so that transformers' ``post_init`` initialises its modules its own way
    (deformable-attention sampling grid, xavier decoder layers, level embeddings)."""

    def __init__(self, config: Mask2FormerConfig, in_dims: Sequence[int], external_queries: bool):
        super().__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(in_dims))
        self.transformer_module = QueryLinkedTransformerModule(
            config.feature_size, config, external_queries
        )
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.post_init()

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats classes defined outside it as remote code and then skips the
        # init of modules without direct parameters (the deformable attention's sampling grid).
        # Everything in here is transformers' own modules and ``_init_weights``, so run it fully.
        return False


def semantic_targets(
    labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-image binary masks ``(n, H, W)`` float and class ids ``(n,)`` of the classes present.

    Ignored pixels are 0 in every mask (see the module docstring).
    """
    valid = labels[labels != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= num_classes):
        bad = valid[(valid < 0) | (valid >= num_classes)][0].item()
        raise ValueError(
            f"label value {bad} is neither a class id in 0..{num_classes - 1} nor the "
            f"ignore value {ignore_index}; check the dataset's label mapping"
        )
    masks, classes = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[present != ignore_index]
        classes.append(present.long())
        masks.append((label[None] == present[:, None, None]).float())
    return masks, classes


def semantic_inference(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Per-class scores ``(B, K, H, W)``: sum over queries of p(class) x sigmoid(mask).

    ``class_logits (B, Q, K+1)`` (last = no object, dropped after the softmax) and
    ``mask_logits (B, Q, h, w)``, bilinearly resized to ``size`` first (as mmseg does).
    """
    if size is not None and tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    class_probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", class_probs, mask_logits.sigmoid())


class Mask2FormerHead(Head):
    """Mask2Former over a simple feature pyramid (defaults: Rein's settings).

    Args:
        in_dims, in_strides: the backbone levels; exactly 4 (they become strides 4/8/16/32).
        num_classes: K.
        external_queries: take queries from the tuning method (Rein's query linkage).
        num_queries: learnt queries when ``external_queries`` is False.
        hidden_dim: width of pixel decoder, mask features and decoder (a multiple of 32,
            since transformers' pixel decoder uses GroupNorm(32)).
        decoder_layers: masked-attention layers (mmdet's count; Rein 9).
        encoder_layers: deformable-attention layers of the pixel decoder (6).
        num_heads: attention heads in both decoders (8).
        dim_feedforward / encoder_feedforward_dim: FFN widths (2048 / 1024).
        class_weight, mask_weight, dice_weight, no_object_weight: loss and matching weights.
        train_num_points, oversample_ratio, importance_sample_ratio: point sampling of the
            mask losses (use a few hundred points for CPU tests).
        auxiliary_loss: also supervise every intermediate decoder layer.
        pyramid: ``"interpolate"`` (Rein) or ``"deconv"`` (ViTDet/VLTSeg).
        ignore_index: the label value that belongs to no class.
    """

    accepts_queries = True

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        external_queries: bool = False,
        num_queries: int = 100,
        hidden_dim: int = 256,
        decoder_layers: int = 9,
        encoder_layers: int = 6,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        encoder_feedforward_dim: int = 1024,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        auxiliary_loss: bool = True,
        pyramid: str = "interpolate",
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        if len(in_dims) != len(PYRAMID_STRIDES):
            raise ConfigError(
                f"mask2former head: needs 4 backbone levels (for strides 4/8/16/32), got "
                f"{len(in_dims)}; set out_indices to 4 blocks"
            )
        if hidden_dim % 32:
            raise ConfigError(
                f"mask2former head: hidden_dim={hidden_dim} must be a multiple of 32 "
                "(transformers' pixel decoder uses GroupNorm with 32 groups)"
            )
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.ignore_index = ignore_index
        self.uses_queries = external_queries
        self.auxiliary_loss = auxiliary_loss
        self.weights = {
            "loss_cls": class_weight,
            "loss_mask": mask_weight,
            "loss_dice": dice_weight,
        }
        self.mask2former_config = Mask2FormerConfig(
            num_labels=num_classes,
            feature_size=hidden_dim,
            mask_feature_size=hidden_dim,
            hidden_dim=hidden_dim,
            encoder_layers=encoder_layers,
            encoder_feedforward_dim=encoder_feedforward_dim,
            decoder_layers=decoder_layers + 1,
            num_attention_heads=num_heads,
            dim_feedforward=dim_feedforward,
            num_queries=num_queries,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            train_num_points=train_num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            use_auxiliary_loss=auxiliary_loss,
            feature_strides=list(PYRAMID_STRIDES),
            common_stride=PYRAMID_STRIDES[0],
        )
        self.pyramid = SimpleFeaturePyramid(in_dims, in_strides, PYRAMID_STRIDES, mode=pyramid)
        self.mask2former = Mask2FormerModules(
            self.mask2former_config, self.pyramid.out_dims, external_queries
        )
        # transformers applies the weights itself only inside its own model class, so the
        # criterion returns unweighted terms and :meth:`loss` weights them.
        self.criterion = Mask2FormerLoss(self.mask2former_config, weight_dict={})
        # A constant of the config: keep it out of checkpoints.
        self.criterion.register_buffer(
            "empty_weight", self.criterion.empty_weight, persistent=False
        )

    def forward(self, features, queries: torch.Tensor | None = None) -> dict:
        """``dict(class_logits (B,Q,K+1), mask_logits (B,Q,H/4,W/4), aux=[(class, mask), ...])``.

        ``aux`` holds the earlier decoder layers' predictions (training only).
        """
        if queries is not None and queries.shape[-1] != self.hidden_dim:
            raise ConfigError(
                f"mask2former head: the tuning method gives {queries.shape[-1]}-d queries but "
                f"hidden_dim is {self.hidden_dim}; set method_args.query_dim={self.hidden_dim}"
            )
        levels = self.pyramid(features)
        pixels = self.mask2former.pixel_decoder(levels)
        decoded = self.mask2former.transformer_module(
            pixels.multi_scale_features, pixels.mask_features, queries
        )
        predict = self.mask2former.class_predictor
        masks = decoded.masks_queries_logits
        states = decoded.intermediate_hidden_states  # sequence-first, normalised
        outputs = {"class_logits": predict(states[-1].transpose(0, 1)), "mask_logits": masks[-1]}
        outputs["aux"] = (
            [(predict(s.transpose(0, 1)), m) for s, m in zip(states[:-1], masks[:-1])]
            if self.training and self.auxiliary_loss
            else []
        )
        return outputs

    def loss(self, outputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted class CE, mask BCE and dice, each summed over the final and aux layers."""
        mask_labels, class_labels = semantic_targets(labels, self.num_classes, self.ignore_index)
        aux = [
            {"class_queries_logits": c.float(), "masks_queries_logits": m.float()}
            for c, m in outputs["aux"]
        ]
        # Matching and losses in float32 (scipy's assignment takes no bfloat16 cost matrix).
        with torch.autocast(labels.device.type, enabled=False):
            raw = self.criterion(
                masks_queries_logits=outputs["mask_logits"].float(),
                class_queries_logits=outputs["class_logits"].float(),
                mask_labels=mask_labels,
                class_labels=class_labels,
                auxiliary_predictions=aux or None,
            )
        # transformers' keys: loss_cross_entropy, loss_mask, loss_dice (+ "_<layer>" for aux).
        kinds = {
            "loss_cross_entropy": "loss_cls",
            "loss_mask": "loss_mask",
            "loss_dice": "loss_dice",
        }
        parts: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            kind = next(name for prefix, name in kinds.items() if key.startswith(prefix))
            weighted = self.weights[kind] * value
            parts[kind] = parts[kind] + weighted if kind in parts else weighted
        return parts

    def logits(self, outputs: dict, size: tuple[int, int]) -> torch.Tensor:
        return semantic_inference(outputs["class_logits"], outputs["mask_logits"], size)
