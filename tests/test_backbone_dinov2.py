import torch

from pivotseg.backbones.dinov2 import build_dinov2, convert_patch_size
from tests.backbone_tester import BackboneTester

TINY = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=28
)


class TestDinov2(BackboneTester):
    name = "dinov2"
    tiny_config = {**TINY, "patch_size": 14}
    sizes = ((56, 56), (42, 70))


class TestDinov2Patch16(BackboneTester):
    name = "dinov2"
    tiny_config = {**TINY, "patch_size": 14}
    build_kwargs = {"patch_size": 16}


def test_patch_conversion_resizes_kernel_and_grid():
    bb = build_dinov2(config={**TINY, "patch_size": 14})
    model = convert_patch_size(bb.model, 16, image_size=512)
    assert model.embeddings.patch_embeddings.projection.weight.shape[-2:] == (16, 16)
    assert model.embeddings.position_embeddings.shape[1] == 1 + 32 * 32
    # A constant kernel stays constant under bicubic resizing: checks the interpolation axis.
    bb2 = build_dinov2(config={**TINY, "patch_size": 14})
    proj = bb2.model.embeddings.patch_embeddings.projection
    torch.nn.init.constant_(proj.weight, 0.5)
    convert_patch_size(bb2.model, 16)
    torch.testing.assert_close(
        bb2.model.embeddings.patch_embeddings.projection.weight,
        torch.full_like(bb2.model.embeddings.patch_embeddings.projection.weight, 0.5),
    )


def test_published_sizes_on_meta_device():
    with torch.device("meta"):
        large = build_dinov2(config={"variant": "large"})
    assert abs(sum(p.numel() for p in large.parameters()) - 304e6) < 2e6
