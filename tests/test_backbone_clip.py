import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from pivotseg.backbones import build_backbone
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester
from tests.helpers import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vit_config

VISION = tiny_vit_config()
TEXT = tiny_clip_text_config(max_position_embeddings=16)


class TestClip(BackboneTester):
    name = "clip"
    tiny_config = VISION
    sizes = ((32, 32), (40, 56))


class TestClipWithText(BackboneTester):
    name = "clip"
    tiny_config = {**VISION, "text_config": TEXT, "projection_dim": 16}
    build_kwargs = {"with_text": True}


def tiny_tokenizer() -> CLIPTokenizer:
    """Letters plus the merges that spell "cat"."""
    return tiny_clip_tokenizer(merges=(("c", "a"), ("ca", "t</w>")))


@pytest.fixture
def hf_clip_folder(tmp_path):
    """A transformers save_pretrained folder (what a hub download holds), with tokenizer."""
    config = CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_mean_std_are_clips():
    bb = build_backbone("clip", config=VISION)
    assert bb.pixel_mean == pytest.approx((122.77, 116.75, 104.09), abs=0.01)
    assert bb.pixel_std == pytest.approx((68.50, 66.63, 70.32), abs=0.01)


def test_loads_transformers_folder_and_matches_hf_outputs(hf_clip_folder):
    model, folder = hf_clip_folder
    bb = build_backbone("clip", source=folder, out_indices=[1, 3]).eval()
    assert bb.has_text and bb.tokenizer is not None
    # Non-square, off-pretraining size: transformers' own interpolation is the reference.
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ours = bb(x)[-1]
        ref = model.vision_model(x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        torch.testing.assert_close(ours.flatten(2).transpose(1, 2), ref)
        proj = bb.project_patch_tokens(ours)
        assert proj.shape == (2, 16, 5, 7)
        ref_proj = model.visual_projection(model.vision_model.post_layernorm(ref))
        torch.testing.assert_close(proj.flatten(2).transpose(1, 2), ref_proj)
        tokens = tiny_tokenizer()(["a cat", "a dog"], padding=True, return_tensors="pt")
        ref_text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        torch.testing.assert_close(bb.encode_text(["a cat", "a dog"]), ref_text)
        by_ids = bb.encode_text(tokens["input_ids"], tokens["attention_mask"])
        torch.testing.assert_close(by_ids, ref_text)
    assert torch.allclose(ref_text.norm(dim=-1), torch.ones(2))


def test_text_survives_pivotseg_round_trip(hf_clip_folder, tmp_path):
    _, folder = hf_clip_folder
    bb = build_backbone("clip", source=folder).eval()
    bb.save_pretrained(tmp_path / "saved")
    again = build_backbone(source=tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(["a cat"]), bb.encode_text(["a cat"]))


def test_vision_only_load_of_full_checkpoint(hf_clip_folder):
    model, folder = hf_clip_folder
    bb = build_backbone("clip", source=folder, with_text=False).eval()
    assert not bb.has_text
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_model(x).last_hidden_state[:, 1:]
        torch.testing.assert_close(bb(x)[-1].flatten(2).transpose(1, 2), ref)
    with pytest.raises(ConfigError, match="text tower"):
        bb.encode_text(torch.ones(1, 4, dtype=torch.long))


def test_vision_model_folder_without_tokenizer(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "v")
    bb = build_backbone("clip", source=tmp_path / "v")
    assert not bb.has_text and bb.tokenizer is None
    with pytest.raises(ConfigError, match="vision tower"):
        build_backbone("clip", source=tmp_path / "v", with_text=True)


def test_strings_without_tokenizer_ask_for_ids(tmp_path):
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT)).save_pretrained(tmp_path / "m")
    bb = build_backbone("clip", source=tmp_path / "m")
    assert bb.tokenizer is None
    with pytest.raises(ConfigError, match="token ids"):
        bb.encode_text(["a cat"])


def test_checkpoint_with_missing_and_foreign_keys_is_refused(hf_clip_folder):
    _, folder = hf_clip_folder
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if "vision_model.encoder.layers.0.mlp.fc1" in k)
    del state[key]
    state["head.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing.*fc1.*1 unexpected.*head.weight"):
        build_backbone("clip", source=folder)


def test_checkpoint_of_other_shape_is_refused(hf_clip_folder):
    _, folder = hf_clip_folder
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if "vision_model.encoder.layers.0.mlp.fc1.weight" in k)
    state[key] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"other shape .*\(3, 3\) vs \(64, 32\)"):
        build_backbone("clip", source=folder)


def test_other_model_type_is_refused(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="'dinov2' model.*clip, clip_vision_model"):
        build_backbone("clip", source=tmp_path / "d")
