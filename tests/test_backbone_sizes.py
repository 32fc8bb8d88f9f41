"""Full-size presets built on the meta device (no memory) have the published parameter counts.

Sources of the expected numbers: SAM's image encoders 89.67 M / 308.28 M / 637.03 M (ViT-B/L/H,
segment-anything); CLIP and SigLIP image and text towers from open_clip's
``docs/model_profile.csv`` (``image_mparams``/``text_mparams``; its image towers include CLIP's
``visual_projection`` and SigLIP's attention-pooling head); SAM 2.1's whole-model sizes
38.9 M / 46 M / 80.8 M / 224.4 M (facebookresearch/sam2 README), checked by putting each trunk
preset into transformers' full ``Sam2VideoModel``. The DINOv2-L check lives in
``test_backbone_dinov2.py``.
"""

import pytest
import torch

from pivotseg.backbones import build_backbone


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def build_on_meta(name: str, **kwargs):
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


@pytest.mark.parametrize(
    ("variant", "expected"), [("vit_b", 89.67), ("vit_l", 308.28), ("vit_h", 637.03)]
)
def test_sam_image_encoder(variant, expected):
    bb = build_on_meta("sam", config={"variant": variant})
    assert millions(bb) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    ("variant", "image", "total"), [("vit_b16", 86.19, 149.62), ("vit_l14", 303.97, 427.62)]
)
def test_clip_towers(variant, image, total):
    bb = build_on_meta("clip", config={"variant": variant}, with_text=True)
    image_tower = millions(bb.vision) + millions(bb.model.visual_projection)
    assert image_tower == pytest.approx(image, rel=0.01)
    assert millions(bb) == pytest.approx(total, rel=0.01)
    vision_only = build_on_meta("clip", config={"variant": variant})
    assert millions(vision_only) == pytest.approx(millions(bb.vision))


@pytest.mark.parametrize(
    ("variant", "image", "text"),
    [
        ("base_p16_224", 92.88, 110.27),
        ("large_p16_256", 315.96, 336.19),
        ("so400m_p14_384", 428.23, 449.73),
    ],
)
def test_siglip_towers(variant, image, text):
    bb = build_on_meta("siglip", config={"variant": variant}, with_text=True)
    assert millions(bb.vision) == pytest.approx(image, rel=0.01)
    assert millions(bb.model.text_model) == pytest.approx(text, rel=0.01)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("tiny", 38.9), ("small", 46.0), ("base_plus", 80.8), ("large", 224.4)],
)
def test_sam2_trunk_presets_give_published_model_sizes(variant, expected):
    from transformers import Sam2VideoConfig, Sam2VideoModel

    from pivotseg.backbones.sam2 import PRESETS

    trunk = {**PRESETS[variant], "model_type": "sam2_hiera_det_model"}
    channels = list(reversed(PRESETS[variant]["embed_dim_per_stage"]))
    vision = dict(backbone_config=trunk, backbone_channel_list=channels)
    with torch.device("meta"):
        model = Sam2VideoModel(Sam2VideoConfig(vision_config=vision))
        bb = build_backbone("sam2", config={"variant": variant})
    assert millions(model) == pytest.approx(expected, rel=0.01)
    assert millions(bb) == pytest.approx(millions(model.vision_encoder.backbone))
