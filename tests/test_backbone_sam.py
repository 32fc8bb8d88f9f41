import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel

from pivotseg.backbones import build_backbone
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    mlp_dim=64,
    image_size=64,
    patch_size=8,
    window_size=4,
    global_attn_indexes=[1, 3],
    output_channels=16,
    num_pos_feats=8,
    initializer_range=0.02,  # transformers' 1e-10 would make every output near-constant
)


class TestSam(BackboneTester):
    name = "sam"
    tiny_config = TINY
    sizes = ((64, 64), (48, 80))  # 6x10 tokens: windows of 4 need padding


class TestSamWithNeck(BackboneTester):
    name = "sam"
    tiny_config = TINY
    build_kwargs = {"out_indices": [1, "neck"]}


def tiny_sam_model() -> SamModel:
    config = SamConfig(
        vision_config=TINY,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8),
        mask_decoder_config=dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
            iou_head_hidden_dim=16,
        ),
    )  # fmt: skip
    return SamModel(config).eval()


def randomise_position_embedding(encoder):
    # transformers initialises it to zeros, which would hide a wrong resize.
    torch.nn.init.normal_(encoder.pos_embed)


def test_neck_level_and_default_levels():
    bb = build_backbone("sam", config=TINY, out_indices=[1, -1, "neck"])
    assert bb.out_indices == [1, 3, 4]
    assert bb.out_dims == [32, 32, 16] and bb.out_strides == [8, 8, 8]
    assert bb.config_dict()["out_indices"] == [1, 3, "neck"]
    assert build_backbone("sam", config=TINY).out_indices == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="'neck'"):
        build_backbone("sam", config=TINY, out_indices=[7])


def test_matches_transformers_at_the_trained_size(tmp_path):
    model = tiny_sam_model()
    randomise_position_embedding(model.vision_encoder)
    model.save_pretrained(tmp_path / "hf")
    bb = build_backbone("sam", source=tmp_path / "hf", out_indices=[3, "neck"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last, neck = bb(x)
        ref = model.vision_encoder(x, output_hidden_states=True)
        torch.testing.assert_close(neck, ref.last_hidden_state)
        torch.testing.assert_close(last, ref.hidden_states[-1].permute(0, 3, 1, 2))


def test_position_embedding_is_resized_to_the_grid():
    bb = build_backbone("sam", config=TINY)
    randomise_position_embedding(bb.encoder)
    assert bb.position_embedding((8, 8)) is bb.encoder.pos_embed
    resized = bb.position_embedding((6, 10))
    assert resized.shape == (1, 6, 10, 32)
    # A constant embedding stays constant: the resize runs over the grid axes, not channels.
    torch.nn.init.constant_(bb.encoder.pos_embed, 0.25)
    torch.testing.assert_close(bb.position_embedding((6, 10)), torch.full((1, 6, 10, 32), 0.25))


def test_vision_model_folder_and_bad_checkpoint(tmp_path):
    SamVisionModel(SamVisionConfig(**TINY)).save_pretrained(tmp_path / "v")
    bb = build_backbone("sam", source=tmp_path / "v")
    assert bb.num_blocks == 4
    state = load_file(str(tmp_path / "v" / "model.safetensors"))
    del state[next(k for k in state if k.endswith("neck.conv1.weight"))]
    save_file(state, str(tmp_path / "v" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing .*neck.conv1.weight"):
        build_backbone("sam", source=tmp_path / "v")
