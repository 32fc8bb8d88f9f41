import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2HieraDetModel,
    Sam2Model,
    Sam2VideoConfig,
    Sam2VideoModel,
)

from pivotseg.backbones import build_backbone
from pivotseg.backbones.sam2 import PRESETS
from pivotseg.errors import CheckpointError
from tests.backbone_tester import BackboneTester

HIERA = dict(
    hidden_size=8,
    num_attention_heads=1,
    embed_dim_per_stage=[8, 16, 32, 64],
    num_attention_heads_per_stage=[1, 1, 2, 2],
    blocks_per_stage=[1, 1, 2, 1],
    window_size_per_stage=[4, 2, 2, 2],
    global_attention_blocks=[3],
    window_positional_embedding_background_size=[4, 4],
)


class TestSam2(BackboneTester):
    name = "sam2"
    tiny_config = HIERA
    sizes = ((64, 64), (64, 96))


class TestSam2TwoLevels(BackboneTester):
    name = "sam2"
    tiny_config = HIERA
    build_kwargs = {"out_indices": [1, -1]}


def tiny_sam2_kwargs() -> dict:
    vision = dict(
        backbone_config={**HIERA, "model_type": "sam2_hiera_det_model"},
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=16,
    )
    return dict(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
            iou_head_hidden_dim=16,
        ),
    )  # fmt: skip


def randomise_position_embeddings(trunk):
    # transformers initialises both to zeros, which would hide a wrong resize or tiling.
    torch.nn.init.normal_(trunk.pos_embed)
    torch.nn.init.normal_(trunk.pos_embed_window)


def test_stage_levels_strides_and_divisor():
    bb = build_backbone("sam2", config=HIERA)
    assert bb.out_indices == [0, 1, 3, 4]  # last block of each stage
    assert bb.out_dims == [8, 16, 32, 64]
    assert bb.out_strides == [4, 8, 16, 32]
    assert bb.block_strides() == [4, 8, 16, 16, 32]
    assert bb.size_divisor == 32


def test_published_tiny_trunk_layout():
    with torch.device("meta"):
        bb = build_backbone("sam2", config={"variant": "tiny"})
    assert bb.out_dims == [96, 192, 384, 768] and bb.out_strides == [4, 8, 16, 32]
    assert bb.num_blocks == 12 and bb.size_divisor == 32
    assert set(PRESETS) == {"tiny", "small", "base_plus", "large"}


def test_matches_transformers_trunk(tmp_path):
    model = Sam2Model(Sam2Config(**tiny_sam2_kwargs())).eval()
    randomise_position_embeddings(model.vision_encoder.backbone)
    model.save_pretrained(tmp_path / "hf")
    bb = build_backbone("sam2", source=tmp_path / "hf").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = bb(x)
        ref = model.vision_encoder.backbone(x).intermediate_hidden_states
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.permute(0, 3, 1, 2))


def test_video_and_trunk_folders_load(tmp_path):
    video = Sam2VideoModel(
        Sam2VideoConfig(
            **tiny_sam2_kwargs(),
            memory_attention_hidden_size=16,
            memory_attention_num_layers=1,
            memory_attention_feed_forward_hidden_size=32,
            memory_encoder_hidden_size=16,
            memory_encoder_output_channels=8,
            mask_downsampler_embed_dim=16,
            memory_fuser_embed_dim=16,
            memory_fuser_intermediate_dim=32,
        )
    )
    video.save_pretrained(tmp_path / "video")
    bb = build_backbone("sam2", source=tmp_path / "video")
    torch.testing.assert_close(
        bb.trunk.blocks[0].attn.qkv.weight, video.vision_encoder.backbone.blocks[0].attn.qkv.weight
    )
    Sam2HieraDetModel(Sam2HieraDetConfig(**HIERA)).save_pretrained(tmp_path / "trunk")
    assert build_backbone("sam2", source=tmp_path / "trunk").num_blocks == 5


def test_checkpoint_with_missing_key_is_refused(tmp_path):
    Sam2Model(Sam2Config(**tiny_sam2_kwargs())).save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state[next(k for k in state if k.endswith("backbone.blocks.2.attn.qkv.weight"))]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing .*blocks.2.attn.qkv.weight"):
        build_backbone("sam2", source=tmp_path / "hf")
