"""The backbone split interface FAMix works through: run up to block i, continue from block i
(to the image embedding), rewrite block i's output as a map, name the last block."""

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from pivotseg.backbones import build_backbone
from pivotseg.backbones.clip_resnet import build_clip_resnet
from tests.helpers import tiny_clip_text_config, tiny_vit_config

RN_TINY = dict(layers=[1, 1, 1, 1], width=8, heads=2, output_dim=16, image_size=64)


def randomized_resnet():
    backbone = build_clip_resnet(config=RN_TINY)
    # CLIP zero-initialises each bottleneck's last BN (blocks start as identities): undo that so
    # every stage changes its input.
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return backbone.eval()


@pytest.fixture(scope="module")
def clip_vit(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "hf"
    config = CLIPConfig(
        vision_config=tiny_vit_config(), text_config=tiny_clip_text_config(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_resnet_split_points_name_the_stages():
    points = randomized_resnet().split_points()
    assert [p.name for p in points] == ["layer1", "layer2", "layer3", "layer4"]
    assert [p.stride for p in points] == [4, 8, 16, 32]
    assert [p.channels for p in points] == [32, 64, 128, 256]
    assert [p.pretraining_grid for p in points] == [16, 8, 4, 2]
    assert all(p.nonnegative for p in points)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_resnet_run_to_and_continue_from_a_stage_is_the_whole_tower(index):
    torch.manual_seed(0)
    backbone = randomized_resnet()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features, prefix = backbone.run_to_block(x, index)
        assert prefix is None and features.shape[1] == backbone.split_points()[index].channels
        assert features.shape[-1] == 96 // backbone.split_points()[index].stride
        torch.testing.assert_close(
            backbone.continue_from_block(index, features), backbone.clip_embed(x)
        )


def test_resnet_map_hook_rewrites_the_stage_output():
    torch.manual_seed(0)
    backbone = randomized_resnet()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = backbone.forward_blocks(x, [0, 3])
        handle = backbone.add_map_hook(0, lambda m: m.flip(-1))
        hooked = backbone.forward_blocks(x, [0, 3])
        handle.remove()
        expected = backbone.continue_from_block(0, plain[0].flip(-1))
        assert torch.equal(hooked[0], plain[0].flip(-1))
        torch.testing.assert_close(backbone.attnpool_forward(hooked[1]), expected)
    assert backbone.last_block_prefix() == "visual.layer4.0."


@pytest.mark.parametrize("index", [0, 2])
def test_clip_vit_run_to_and_continue_from_a_block_is_clips_image_embedding(clip_vit, index):
    backbone = build_backbone("clip", source=clip_vit, with_text=True).eval()
    reference = CLIPModel.from_pretrained(clip_vit).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)  # the pretraining size: no position interpolation
    with torch.no_grad():
        features, prefix = backbone.run_to_block(x, index)
        assert features.shape == (2, 32, 4, 4) and prefix.shape == (2, 1, 32)
        ours = backbone.continue_from_block(index, features, prefix)
        theirs = reference.get_image_features(pixel_values=x)
    theirs = theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_clip_vit_split_points_map_hook_and_last_block(clip_vit):
    backbone = build_backbone("clip", source=clip_vit, with_text=True).eval()
    points = backbone.split_points()
    assert [p.name for p in points] == ["block0", "block1", "block2", "block3"]
    assert {(p.stride, p.channels, p.nonnegative, p.pretraining_grid) for p in points} == {
        (8, 32, False, None)
    }
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        plain = backbone.forward_blocks(x, [1])[0]
        handle = backbone.add_map_hook(1, lambda m: m.flip(-1))
        hooked = backbone.forward_blocks(x, [1])[0]
        handle.remove()
    assert torch.equal(hooked, plain.flip(-1))
    assert backbone.last_block_prefix() == "model.vision_model.encoder.layers.3."


def test_continuing_needs_the_projection_and_a_backbone_that_offers_it(clip_vit):
    from pivotseg.errors import ConfigError

    vision_only = build_backbone("clip", source=clip_vit, with_text=False).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features, prefix = vision_only.run_to_block(x, 1)
        with pytest.raises(ConfigError, match="with_text=True"):
            vision_only.continue_from_block(1, features, prefix)
    dinov2 = build_backbone("dinov2", config=tiny_vit_config(image_size=32, patch_size=8))
    with pytest.raises(NotImplementedError):
        dinov2.run_to_block(x, 1)
