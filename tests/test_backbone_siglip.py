import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel

from pivotseg.backbones import build_backbone
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester
from tests.helpers import tiny_text_tower, tiny_vit_config

VISION = tiny_vit_config()
TEXT = tiny_text_tower(
    vocab_size=50, max_position_embeddings=8, pad_token_id=1, eos_token_id=1, bos_token_id=None
)


class TestSiglip(BackboneTester):
    name = "siglip"
    tiny_config = VISION
    sizes = ((32, 32), (40, 56))


class TestSiglipWithText(BackboneTester):
    name = "siglip"
    tiny_config = {**VISION, "text_config": TEXT}
    build_kwargs = {"with_text": True}


@pytest.fixture
def hf_siglip_folder(tmp_path):
    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_stats_map_pixels_to_minus_one_one():
    bb = build_backbone("siglip", config=VISION)
    mean, std = bb.pixel_stats()
    ends = (torch.tensor([0.0, 255.0]).view(2, 1, 1, 1) - mean) / std
    torch.testing.assert_close(ends[:, :, 0, 0], torch.tensor([[-1.0] * 3, [1.0] * 3]))


def test_loads_transformers_folder_and_matches_hf_outputs(hf_siglip_folder):
    model, folder = hf_siglip_folder
    bb = build_backbone("siglip", source=folder).eval()
    assert bb.has_text and bb.tokenizer is None  # no tokenizer files were saved
    x = torch.randn(2, 3, 40, 56)
    ids = torch.tensor([[5, 7, 9, 1, 1, 1, 1, 1], [4, 4, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        last = bb(x)[-1]
        assert last.shape == (2, 32, 5, 7)  # every token is a patch token
        ref = model.vision_model(x, interpolate_pos_encoding=True).last_hidden_state
        ours = model.vision_model.post_layernorm(last.flatten(2).transpose(1, 2))
        torch.testing.assert_close(ours, ref)
        ref_text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        torch.testing.assert_close(bb.encode_text(ids), ref_text)
    with pytest.raises(ConfigError, match="token ids"):
        bb.encode_text(["a cat"])


def test_vision_only_load_and_round_trip(hf_siglip_folder, tmp_path):
    model, folder = hf_siglip_folder
    bb = build_backbone("siglip", source=folder, with_text=False).eval()
    assert not bb.has_text
    bb.save_pretrained(tmp_path / "saved")
    again = build_backbone(source=tmp_path / "saved").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_model(x).last_hidden_state
        ours = model.vision_model.post_layernorm(again(x)[-1].flatten(2).transpose(1, 2))
        torch.testing.assert_close(ours, ref)


def test_checkpoint_with_missing_key_is_refused(hf_siglip_folder):
    _, folder = hf_siglip_folder
    state = load_file(str(folder / "model.safetensors"))
    del state[next(k for k in state if k.endswith("encoder.layers.1.self_attn.q_proj.weight"))]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing .*layers.1.self_attn.q_proj.weight"):
        build_backbone("siglip", source=folder)
