"""Decode heads: feature pyramid, FPN and Mask2Former (tiny settings, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

from pivotseg.errors import ConfigError
from pivotseg.heads import HEADS, build_head
from pivotseg.heads.mask2former import semantic_inference, semantic_targets
from pivotseg.heads.pyramid import SimpleFeaturePyramid, group_norm

TINY_M2F = dict(
    num_queries=6,
    hidden_dim=32,
    decoder_layers=3,
    encoder_layers=1,
    num_heads=4,
    dim_feedforward=64,
    encoder_feedforward_dim=64,
    train_num_points=256,
)


def vit_features(batch=2, dim=24, grid=(4, 6)):
    return [torch.randn(batch, dim, *grid) for _ in range(4)]


# ----- pyramid ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["deconv", "interpolate"])
def test_pyramid_vit_levels_reach_strides_4_to_32(mode):
    pyr = SimpleFeaturePyramid([24] * 4, [16] * 4, mode=mode)
    outs = pyr(vit_features(grid=(4, 6)))
    assert pyr.out_strides == [4, 8, 16, 32]
    # stride 16 grid 4x6 = image 64x96
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(o.shape[1] == 24 for o in outs)


def test_pyramid_deconv_ops_follow_vitdet():
    pyr = SimpleFeaturePyramid([24] * 4, [16] * 4, mode="deconv")
    up4, up2, same, down2 = pyr.resamplers
    assert [type(m).__name__ for m in up4] == [
        "ConvTranspose2d",
        "GroupNorm",
        "GELU",
        "ConvTranspose2d",
    ]
    assert [type(m).__name__ for m in up2] == ["ConvTranspose2d"]
    assert isinstance(same, nn.Identity) and isinstance(down2, nn.MaxPool2d)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 24, 1, 1)
    torch.testing.assert_close(down2(x)[0, 0], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))


def test_pyramid_interpolate_is_reins_bilinear_resize():
    feats = vit_features()
    outs = SimpleFeaturePyramid([24] * 4, [16] * 4, mode="interpolate")(feats)
    for out, f, scale in zip(outs, feats, (4, 2, 1, 0.5)):
        ref = F.interpolate(f, scale_factor=scale, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, ref if scale != 1 else f)


def test_pyramid_hierarchical_strides_and_projection():
    # TinyViT-like: strides 8/16/16/16 with different widths.
    dims, strides = [16, 24, 24, 32], [8, 16, 16, 16]
    pyr = SimpleFeaturePyramid(dims, strides, mode="deconv", out_dim=8)
    feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(dims, strides)]
    outs = pyr(feats)
    assert [tuple(o.shape[1:]) for o in outs] == [(8, 16, 24), (8, 8, 12), (8, 4, 6), (8, 2, 3)]
    # 8 -> 4 and 16 -> 8 are one deconv each, 16 -> 16 identity, 16 -> 32 pooling.
    kinds = [type(m).__name__ for m in pyr.resamplers]
    assert kinds == ["Sequential", "Sequential", "Identity", "MaxPool2d"]
    assert len(pyr.resamplers[0]) == 1


def test_pyramid_rejects_non_power_of_two_and_level_mismatch():
    with pytest.raises(ValueError, match="power-of-two"):
        SimpleFeaturePyramid([8] * 4, [12] * 4)
    with pytest.raises(ValueError, match="target strides"):
        SimpleFeaturePyramid([8] * 4, [16] * 4, target_strides=[4, 8])


def test_group_norm_uses_a_dividing_group_count():
    assert group_norm(256).num_groups == 32
    assert group_norm(48).num_groups == 8
    assert group_norm(16).num_groups == 8  # two channels per group, never one
    assert group_norm(7).num_groups == 1
    group_norm(16)(torch.randn(1, 16, 1, 1))  # a 1x1 map still normalises


# ----- build_head ------------------------------------------------------------------------------
def test_build_head_names_and_errors():
    assert set(HEADS) == {"fpn", "mask2former", "deeplabv3plus"}
    with pytest.raises(ConfigError, match="known: deeplabv3plus, fpn, mask2former"):
        build_head("uper", [8] * 4, [16] * 4, 3)
    with pytest.raises(ConfigError, match="did you mean 'channels'"):
        build_head("fpn", [8] * 4, [16] * 4, 3, chanels=16)


# ----- FPN -------------------------------------------------------------------------------------
def test_fpn_shapes_and_logits_upsampling():
    head = build_head("fpn", [24] * 4, [16] * 4, 5, channels=16)
    out = head(vit_features(grid=(4, 6)))
    assert out.shape == (2, 5, 16, 24)  # stride 4
    logits = head.logits(out, (64, 96))
    torch.testing.assert_close(
        logits, F.interpolate(out, size=(64, 96), mode="bilinear", align_corners=False)
    )
    assert head.uses_queries is False


def test_fpn_loss_is_cross_entropy_over_valid_pixels():
    head = build_head("fpn", [24] * 4, [16] * 4, 5, channels=16)
    out = head(vit_features(grid=(4, 6)))
    labels = torch.randint(0, 5, (2, 64, 96))
    labels[:, :20] = 255
    loss = head.loss(out, labels)["loss_ce"]
    up = F.interpolate(out, size=(64, 96), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1).permute(0, 2, 3, 1)[labels != 255]
    manual = -logp.gather(1, labels[labels != 255][:, None]).mean()
    torch.testing.assert_close(loss, manual)
    empty = head.loss(out, torch.full_like(labels, 255))["loss_ce"]
    assert empty.item() == 0.0 and empty.requires_grad


# ----- Mask2Former -----------------------------------------------------------------------------
def test_semantic_inference_equals_direct_computation():
    torch.manual_seed(1)
    cls = torch.randn(2, 3, 4 + 1)  # B=2, Q=3, K=4 (+ no-object)
    masks = torch.randn(2, 3, 5, 6)
    out = semantic_inference(cls, masks)
    expected = torch.zeros(2, 4, 5, 6)
    for b in range(2):
        for k in range(4):
            for q in range(3):
                p = torch.exp(cls[b, q, k]) / torch.exp(cls[b, q]).sum()
                expected[b, k] += p * torch.sigmoid(masks[b, q])
    torch.testing.assert_close(out, expected)
    # Resizing happens on the mask logits, before the sigmoid (as mmseg does).
    up = semantic_inference(cls, masks, (10, 12))
    ref = semantic_inference(
        cls, F.interpolate(masks, size=(10, 12), mode="bilinear", align_corners=False)
    )
    torch.testing.assert_close(up, ref)


def test_semantic_targets_drop_ignored_pixels_from_every_mask():
    labels = torch.tensor([[[0, 2], [255, 2]], [[255, 255], [255, 255]]])
    masks, classes = semantic_targets(labels, num_classes=3)
    assert classes[0].tolist() == [0, 2]
    torch.testing.assert_close(masks[0], torch.tensor([[[1.0, 0], [0, 0]], [[0, 1], [0, 1]]]))
    assert classes[1].numel() == 0 and masks[1].shape == (0, 2, 2)
    with pytest.raises(ValueError, match="label value 7"):
        semantic_targets(torch.tensor([[[7]]]), num_classes=3)


def test_mask2former_is_initialised_by_transformers():
    head = build_head("mask2former", [24] * 4, [16] * 4, 5, **TINY_M2F)
    attn = head.mask2former.pixel_decoder.encoder.layers[0].self_attn
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    # Head 0 of the deformable sampling grid points along +x at distances 1..n_points.
    assert attn.sampling_offsets.bias[:8].tolist() == [1, 0, 2, 0, 3, 0, 4, 0]
    assert torch.isfinite(head.mask2former.pixel_decoder.level_embed).all()
    assert head.mask2former_config.decoder_layers == TINY_M2F["decoder_layers"] + 1
    assert len(head.mask2former.transformer_module.decoder.layers) == TINY_M2F["decoder_layers"]
    assert not any("empty_weight" in k for k in head.state_dict())


def test_mask2former_forward_loss_and_logits():
    head = build_head("mask2former", [24] * 4, [16] * 4, 5, **TINY_M2F).train()
    out = head(vit_features(grid=(4, 6)))
    assert out["class_logits"].shape == (2, 6, 6)
    assert out["mask_logits"].shape == (2, 6, 16, 24)
    assert len(out["aux"]) == TINY_M2F["decoder_layers"]
    labels = torch.randint(0, 5, (2, 64, 96))
    labels[1] = 255  # an image without any labelled pixel
    parts = head.loss(out, labels)
    assert set(parts) == {"loss_cls", "loss_mask", "loss_dice"}
    total = sum(parts.values())
    assert torch.isfinite(total)
    total.backward()
    assert head.logits(out, (64, 96)).shape == (2, 5, 64, 96)
    assert head.eval()(vit_features(grid=(4, 6)))["aux"] == []


def test_mask2former_needs_four_levels_and_hidden_multiple_of_32():
    with pytest.raises(ConfigError, match="4 backbone levels"):
        build_head("mask2former", [24] * 3, [16] * 3, 5, **TINY_M2F)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_head("mask2former", [24] * 4, [16] * 4, 5, **{**TINY_M2F, "hidden_dim": 48})


def _reference_module(head, queries=None):
    """transformers' own module holding the head's weights (and ``queries`` as its tables)."""
    ours = head.mask2former.transformer_module
    cfg = head.mask2former_config
    ref = Mask2FormerTransformerModule(in_features=cfg.feature_size, config=cfg)
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("queries_to")}
    if queries is not None:
        state["queries_embedder.weight"] = queries
        state["queries_features.weight"] = ours.queries_to_features(queries)
    ref.load_state_dict(state)
    return ref.eval()


def _decoder_inputs(head, feats):
    pixels = head.mask2former.pixel_decoder(head.pyramid(feats))
    return pixels.multi_scale_features, pixels.mask_features


@torch.no_grad()
def test_own_queries_match_transformers_module():
    head = build_head("mask2former", [24] * 4, [16] * 4, 5, **TINY_M2F).eval()
    ms, mask_features = _decoder_inputs(head, vit_features())
    ours = head.mask2former.transformer_module(ms, mask_features)
    ref = _reference_module(head)(ms, mask_features)
    torch.testing.assert_close(ours.masks_queries_logits[-1], ref.masks_queries_logits[-1])
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state)


@torch.no_grad()
def test_external_queries_are_position_embedding_and_feed_query_features():
    head = build_head(
        "mask2former", [24] * 4, [16] * 4, 5, external_queries=True, **TINY_M2F
    ).eval()
    assert head.uses_queries
    names = [n for n, _ in head.named_parameters()]
    assert not any("queries_embedder" in n or "queries_features" in n for n in names)
    feats = vit_features()
    queries = torch.randn(6, 32)
    ms, mask_features = _decoder_inputs(head, feats)
    ours = head.mask2former.transformer_module(ms, mask_features, queries)
    ref = _reference_module(head, queries)(ms, mask_features)
    torch.testing.assert_close(ours.masks_queries_logits[-1], ref.masks_queries_logits[-1])
    # Other queries give other predictions; a query count other than num_queries works too.
    other = head(feats, torch.randn(6, 32))["mask_logits"]
    assert not torch.allclose(other, head(feats, queries)["mask_logits"])
    assert head(feats, torch.randn(9, 32))["class_logits"].shape == (2, 9, 6)
    with pytest.raises(ValueError, match="external queries"):
        head(feats)
    with pytest.raises(ConfigError, match="query_dim=32"):
        head(feats, torch.randn(6, 16))


def test_no_decay_names_cover_norms_biases_and_embeddings():
    head = build_head("mask2former", [24] * 4, [16] * 4, 5, **TINY_M2F)
    no_decay = head.no_decay_parameter_names()
    params = dict(head.named_parameters())
    assert no_decay <= set(params)
    for name in (
        "mask2former.pixel_decoder.level_embed",
        "mask2former.transformer_module.level_embed.weight",
        "mask2former.transformer_module.queries_embedder.weight",
        "mask2former.transformer_module.queries_features.weight",
        "mask2former.transformer_module.decoder.layers.0.cross_attn.in_proj_bias",
        "mask2former.pixel_decoder.adapter_1.1.weight",  # GroupNorm
        "mask2former.transformer_module.decoder.layernorm.weight",
        "mask2former.class_predictor.bias",
    ):
        assert name in no_decay, name
    for name in (
        "mask2former.class_predictor.weight",
        "mask2former.pixel_decoder.adapter_1.0.weight",  # Conv2d
        "mask2former.transformer_module.decoder.layers.0.cross_attn.in_proj_weight",
    ):
        assert name not in no_decay, name
