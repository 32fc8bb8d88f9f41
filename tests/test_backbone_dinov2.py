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


class TestDinov2Registers(BackboneTester):
    name = "dinov2_reg"
    tiny_config = {**TINY, "patch_size": 14, "num_register_tokens": 2}
    sizes = ((56, 56), (42, 70))


def test_register_tokens_are_dropped_and_hub_folder_loads(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from pivotseg.backbones import build_backbone

    model = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(**TINY, patch_size=14, num_register_tokens=2)
    ).eval()
    model.save_pretrained(tmp_path / "hf")
    bb = build_backbone("dinov2_reg", source=tmp_path / "hf", out_indices=[3]).eval()
    x = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states[-1]
        (ours,) = bb(x)
    assert ours.shape == (1, 32, 3, 5)
    # 1 class + 2 register tokens come first in transformers' sequence.
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), ref[:, 3:])
    bb.save_pretrained(tmp_path / "saved")
    assert build_backbone(source=tmp_path / "saved").name == "dinov2_reg"


def test_plain_dinov2_refuses_register_checkpoint(tmp_path):
    import pytest
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from pivotseg.backbones import build_backbone
    from pivotseg.errors import CheckpointError

    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY)).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="dinov2_with_registers"):
        build_backbone("dinov2", source=tmp_path / "hf")
