"""FAMix: style mining moves CLIP toward the text, mixing, banks and their checks, the OpenAI
text-tower conversion, the DeepLabv3+ head, the segmenter integration and the mining CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from pivotseg.backbones import build_backbone
from pivotseg.backbones.clip_resnet import build_clip_resnet, public_state_dict
from pivotseg.errors import CheckpointError
from pivotseg.text.encoder import load_openai_text_encoder, prompt_embeddings
from pivotseg.tuning.famix import (
    FAMix,
    StyleBank,
    dominant_classes,
    mean_std,
    mine_styles,
    mix_styles,
    patch_regions,
    select_patches,
    site_fingerprint,
    style_site,
)
from tests.helpers import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vit_config

RN_TINY = dict(layers=[1, 1, 1, 1], width=8, heads=2, output_dim=16, image_size=64)
VIT = tiny_vit_config()
TEXT = tiny_clip_text_config()


tiny_tokenizer = tiny_clip_tokenizer


def randomize_bn(module):
    # CLIP zero-initialises each bottleneck's last BN (blocks start as identities).
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


# ----- an OpenAI-layout text tower, written independently of transformers ----------------------
class OpenAIBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class OpenAIText(nn.Module):
    """OpenAI CLIP's text encoder: causal transformer, EOT (max id) pooling, projection."""

    def __init__(self, vocab=60, width=24, layers=2, heads=2, ctx=32, dim=16):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenAIBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, dim) * 0.2)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def forward(self, ids):
        n = ids.shape[1]
        x = (self.token_embedding(ids) + self.positional_embedding[:n]).transpose(0, 1)
        mask = torch.full((n, n), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x.transpose(0, 1))
        return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection


@pytest.fixture(scope="module")
def rn_checkpoint(tmp_path_factory):
    """A tiny CLIP RN in OpenAI's layout (visual.* + text tower) with tokenizer files beside."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rn")
    visual = randomize_bn(build_clip_resnet(config=RN_TINY))
    # The tiny tokenizer's end-of-text id is 1, not the largest id: use ids whose EOT is max.
    text = OpenAIText().eval()
    state = {**public_state_dict(visual), **text.state_dict()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "rn.safetensors"))
    tiny_tokenizer().save_pretrained(folder)
    return folder / "rn.safetensors", text


def test_openai_text_tower_converts_exactly(rn_checkpoint):
    path, reference = rn_checkpoint
    encoder = load_openai_text_encoder(path, heads=2)
    # OpenAI pools at the largest id (its EOT); give transformers that position as EOS.
    encoder.model.config.eos_token_id = 59
    encoder.model.text_model.eos_token_id = 59
    ids = torch.tensor([[0, 5, 9, 59, 0, 0], [0, 7, 59, 3, 3, 3]])
    with torch.no_grad():
        ours = encoder(ids)
        ref = reference(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_openai_text_tower_errors(tmp_path, rn_checkpoint):
    visual_only = {k: v for k, v in public_state_dict(build_clip_resnet(config=RN_TINY)).items()}
    save_file(visual_only, str(tmp_path / "v.safetensors"))
    with pytest.raises(CheckpointError, match="no OpenAI CLIP text tower"):
        load_openai_text_encoder(tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match=".safetensors"):
        load_openai_text_encoder(tmp_path / "missing.pt")


# ----- patches, statistics and mixing ----------------------------------------------------------
def test_dominant_classes_hand_computed():
    k = 3
    # Feature grid 3x4 at stride 2 covers 6x8 pixels; the label is 6x7 (column 7 is padding).
    # Patches split the cells rows 0|1|2 and columns 0|1-2|3, i.e. pixel rows 0-1|2-3|4-5 and
    # pixel columns 0-1|2-5|6(-7).
    assert patch_regions((3, 4))[:3] == [
        (slice(0, 1), slice(0, 1)),
        (slice(0, 1), slice(1, 3)),
        (slice(0, 1), slice(3, 4)),
    ]
    labels = torch.full((1, 6, 7), 255)
    labels[0, 0:2, 0:2] = torch.tensor([[0, 0], [1, 0]])  # mode 0
    labels[0, 0:2, 2:6] = torch.tensor([[1, 2, 1, 2], [1, 2, 0, 255]])  # tie 1/2 -> 1
    labels[0, 2:4, 0:2] = torch.tensor([[7, 7], [7, 0]])  # 7 is no class: ignore wins
    labels[0, 2:4, 2:6] = torch.tensor([[1, 255, 255, 1], [255, 255, 1, 1]])  # tie -> class 1
    got = dominant_classes(labels, (3, 4), stride=2, num_classes=k)
    assert got[0].tolist() == [0, 1, k, k, 1, k, k, k, k]
    # A patch entirely in the padding (label smaller than the features) is ignore.
    assert dominant_classes(torch.zeros(1, 2, 2, dtype=torch.long), (3, 3), 2, k)[0, 8] == k


def test_mixing_with_s_one_is_identity_and_s_zero_takes_the_target():
    feats = torch.randn(2, 5, 9, 10) * 3 + 1
    mu_t, sigma_t = torch.randn(2, 9, 5), torch.rand(2, 9, 5) + 0.5
    same = mix_styles(feats, mu_t, sigma_t, torch.ones(2, 5))
    torch.testing.assert_close(same, feats, rtol=1e-5, atol=1e-5)
    relu_feats = feats.relu()  # a ResNet stage output: ReLU(identity) is the identity
    torch.testing.assert_close(
        mix_styles(relu_feats, mu_t, sigma_t, torch.ones(2, 5), activation=F.relu),
        relu_feats,
        rtol=1e-5,
        atol=1e-5,
    )
    moved = mix_styles(feats, mu_t, sigma_t, torch.zeros(2, 5))
    for p, (ys, xs) in enumerate(patch_regions((9, 10))):
        m, s = mean_std(moved[..., ys, xs], eps=0.0)
        torch.testing.assert_close(m, mu_t[:, p], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s, sigma_t[:, p], rtol=1e-2, atol=1e-2)


def test_select_patches_takes_first_of_each_class():
    classes = torch.tensor([[2, 2, 0, 3, 3, 3, 3, 3, 3], [0, 1, 2, 2, 2, 2, 2, 2, 2]])
    chosen = select_patches(classes)
    assert [(c.batch_index, c.patch, c.klass) for c in chosen] == [
        (0, 0, 2),
        (0, 2, 0),
        (0, 3, 3),
        (1, 1, 1),
    ]


# ----- mining ----------------------------------------------------------------------------------
def _rn_backbone(path):
    return build_backbone("clip_resnet", source=str(path), config=RN_TINY).freeze().eval()


def test_mining_moves_the_rn_embedding_toward_the_text(rn_checkpoint):
    path, _ = rn_checkpoint
    backbone = _rn_backbone(path)
    site = style_site(backbone)
    assert site.layer_id == "layer1" and site.stride == 4
    encoder = load_openai_text_encoder(path, heads=2)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 48, 48)
    labels = torch.randint(0, 3, (2, 48, 48))
    features, context = site.features(pixels)
    patches = select_patches(dominant_classes(labels, features.shape[-2:], 4, 3))
    prompts = [f"Cyberpunk Cityscape style {['road', 'car', 'sky'][p.klass]}" for p in patches]
    targets = prompt_embeddings(encoder, prompts, ["a photo of a {}."], normalize_each=False)
    mu, sigma, before, after = mine_styles(site, features, context, patches, targets, steps=30)
    assert mu.shape == (len(patches), 32) and sigma.shape == mu.shape
    assert (after > before + 0.03).all(), (before, after)
    # The returned statistics reproduce the "after" embedding (they are what the bank stores).
    regions = patch_regions(features.shape[-2:])
    styled = []
    for i, item in enumerate(patches):
        patch = features[item.batch_index, :, regions[item.patch][0], regions[item.patch][1]]
        m, s = mean_std(patch)
        styled.append(
            F.relu(
                sigma[i, :, None, None] * (patch - m[:, None, None]) / s[:, None, None]
                + mu[i, :, None, None]
            )
        )
    with torch.no_grad():
        again = F.cosine_similarity(site.embed(styled, [None] * len(styled)), targets)
    torch.testing.assert_close(again, after, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit") / "hf"
    CLIPModel(CLIPConfig(vision_config=VIT, text_config=TEXT, projection_dim=16)).save_pretrained(
        folder
    )
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_mining_moves_the_vit_embedding_toward_the_text(vit_folder):
    from pivotseg.text.encoder import text_encoder_from_backbone

    backbone = build_backbone("clip", source=vit_folder, with_text=True).freeze().eval()
    site = style_site(backbone, 1)
    assert site.layer_id == "block1" and site.stride == 8 and site.activation is None
    torch.manual_seed(0)
    features, context = site.features(torch.randn(1, 3, 48, 48))
    assert features.shape == (1, 32, 6, 6) and context.shape == (1, 1, 32)
    labels = torch.zeros(1, 48, 48, dtype=torch.long)
    labels[:, 16:] = 1
    patches = select_patches(dominant_classes(labels, (6, 6), 8, 2))
    targets = prompt_embeddings(
        text_encoder_from_backbone(backbone),
        ["Urban Grit style road", "Urban Grit style car"],
        ["a photo of a {}."],
        normalize_each=False,
    )[[p.klass for p in patches]]
    _, _, before, after = mine_styles(site, features, context, patches, targets, steps=20)
    assert (after > before + 0.05).all(), (before, after)


# ----- banks -----------------------------------------------------------------------------------
def _bank_for(site, classes=("road", "car"), source="x"):
    fp = site_fingerprint(site)
    bank = StyleBank(
        list(classes),
        site.channels,
        {
            "backbone": {"name": site.backbone.name, "source": source, **fp},
            "layer": site.layer_id,
        },
    )
    return bank


def test_bank_round_trip_and_refusals(tmp_path, rn_checkpoint, vit_folder):
    path, _ = rn_checkpoint
    site = style_site(_rn_backbone(path))
    bank = _bank_for(site)
    bank.add(0, torch.arange(32.0), torch.ones(32))
    bank.add(2, torch.zeros(32), torch.full((32,), 2.0))
    bank.save(tmp_path / "bank.safetensors")
    again = StyleBank.load(tmp_path / "bank.safetensors")
    assert again.class_names == ["road", "car"] and again.counts() == [1, 0, 1]
    torch.testing.assert_close(again.mu[0][0], torch.arange(32.0))
    torch.testing.assert_close(again.sigma[2][0], torch.full((32,), 2.0))
    assert again.info["backbone"] == bank.info["backbone"]
    again.check_fits(site, 2)  # the same backbone: fine

    other_weights = randomize_bn(build_clip_resnet(config=RN_TINY))
    with pytest.raises(CheckpointError, match="other weights"):
        again.check_fits(style_site(other_weights))
    wider = build_clip_resnet(config={**RN_TINY, "width": 16})
    with pytest.raises(CheckpointError, match="another backbone"):
        again.check_fits(style_site(wider))
    vit = build_backbone("clip", source=vit_folder)
    with pytest.raises(CheckpointError, match="another backbone"):
        again.check_fits(style_site(vit))
    with pytest.raises(CheckpointError, match="layer"):
        again.check_fits(style_site(_rn_backbone(path), "layer2"))
    with pytest.raises(CheckpointError, match="2 classes"):
        again.check_fits(site, 19)
    # Same weights loaded with or without the text tower: same fingerprint.
    with_text = build_backbone("clip", source=vit_folder, with_text=True)
    without = build_backbone("clip", source=vit_folder, with_text=False)
    assert site_fingerprint(style_site(with_text)) == site_fingerprint(style_site(without))
    (tmp_path / "plain.safetensors").write_bytes(b"not a bank")
    with pytest.raises(CheckpointError, match="not a readable"):
        StyleBank.load(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        StyleBank.load(tmp_path / "none.safetensors")


# ----- training: the tuning method in a segmenter ----------------------------------------------
@pytest.fixture
def famix_registered(monkeypatch):
    """Register famix and deeplabv3plus the way the lead will (until then, for this test)."""
    from pivotseg.heads import HEADS
    from pivotseg.heads.deeplabv3plus import DeepLabV3PlusHead
    from pivotseg.tuning import METHODS

    monkeypatch.setitem(METHODS, "famix", FAMix)
    monkeypatch.setitem(HEADS, "deeplabv3plus", DeepLabV3PlusHead)


def test_famix_segmenter_trains_only_layer4_last_block_and_mixes(
    tmp_path, rn_checkpoint, famix_registered
):
    from pivotseg.segmenter import build_segmenter

    path, _ = rn_checkpoint
    site = style_site(_rn_backbone(path))
    bank = _bank_for(site, ("road", "car", "sky"), source=str(path))
    for k in range(3):
        bank.add(k, torch.full((32,), float(k)), torch.full((32,), 0.5 + k))
    bank.save(tmp_path / "styles.safetensors")
    cfg = dict(
        num_classes=3,
        backbone="clip_resnet",
        backbone_source=str(path),
        backbone_config={**RN_TINY, "output_stride": 16, "dilation_pattern": "famix"},
        out_indices=[0, 3],
        method="famix",
        method_args={"style_bank": str(tmp_path / "styles.safetensors")},
        head="deeplabv3plus",
        head_args={"aspp_rates": [6, 12, 18], "label_smoothing": 0.1},
    )
    model = build_segmenter(cfg)
    trained = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("visual.layer4.0.") for n in trained)
    images = torch.rand(2, 3, 64, 64) * 255
    labels = torch.randint(0, 3, (2, 64, 64))

    model.eval()
    with torch.no_grad():
        plain = model(images)
        handles, model.tuning._handles = model.tuning._handles, []
        for h in handles:
            h.remove()
        unhooked = model(images)
        model.tuning.attach(model.backbone)
    torch.testing.assert_close(plain, unhooked)  # identity in eval mode

    model.train()
    stem_bn = model.backbone.visual.bn1
    before = stem_bn.running_mean.clone()
    head_bn = model.head.decoder[1]
    head_before = head_bn.running_mean.clone()
    model.tuning.prepare_batch(labels)
    loss, parts = model.compute_loss(images, labels)
    loss.backward()
    assert "loss_ce" in parts and torch.isfinite(loss)
    torch.testing.assert_close(stem_bn.running_mean, before)  # frozen BN stays in eval
    assert not torch.allclose(head_bn.running_mean, head_before)  # the head's BN trains
    assert model.backbone.visual.layer4[0].conv3.weight.grad is not None
    groups = model.param_groups(0.1, 1e-4)
    backbone_group = next(
        g for g in groups if any(n.startswith("backbone.") for n in g["param_names"])
    )
    assert backbone_group["lr"] == pytest.approx(0.01)

    torch.manual_seed(3)
    model.tuning.prepare_batch(labels)
    with torch.no_grad():
        mixed = model(images)
    assert not torch.allclose(mixed, plain)


def test_sampled_styles_come_from_the_patch_class_bank(tmp_path, rn_checkpoint):
    path, _ = rn_checkpoint
    backbone = _rn_backbone(path)
    site = style_site(backbone)
    bank = _bank_for(site, ("road", "car", "sky"))
    bank.add(0, torch.full((32,), 10.0), torch.ones(32))
    bank.add(0, torch.full((32,), 11.0), torch.ones(32))
    bank.add(1, torch.full((32,), 20.0), torch.ones(32))
    bank.add(3, torch.full((32,), 99.0), torch.ones(32))  # ignore bank; "sky" (2) is empty
    bank.save(tmp_path / "b.safetensors")
    method = FAMix(backbone, 3, str(tmp_path / "b.safetensors"))
    classes = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0]] * 50)
    mu, _ = method.sample_styles(classes, 50)
    first = mu[..., 0]
    assert set(first[:, 0].tolist()) == {10.0, 11.0}
    assert (first[:, 1] == 20).all() and (first[:, 2] == 99).all() and (first[:, 3] == 99).all()
    anything, _ = method.sample_styles(None, 200)
    assert set(anything[..., 0].flatten().tolist()) == {10.0, 11.0, 20.0, 99.0}


def test_deeplabv3plus_head_shapes_and_smoothing():
    from pivotseg.heads.deeplabv3plus import DeepLabV3PlusHead

    head = DeepLabV3PlusHead([32, 256], [4, 16], 5, label_smoothing=0.1)
    params = sum(p.numel() for p in head.parameters())
    # ASPP: 1x1 + 3 dilated 3x3 + pooling branch on 256 -> 256, projection 1280 -> 256;
    # low-level 1x1 32 -> 48; decoder 3x3 304 -> 256; classifier 256 -> 5; 7 BN of 256, 1 of 48.
    expected = (
        256 * 256
        + 3 * 256 * 256 * 9
        + 256 * 256
        + 5 * 256 * 256
        + 32 * 48
        + 304 * 256 * 9
        + 256 * 5
        + 5
        + 2 * (256 * 7 + 48)
    )
    assert params == expected
    feats = [torch.randn(2, 32, 16, 16), torch.randn(2, 256, 4, 4)]
    out = head(feats)
    assert out.shape == (2, 5, 16, 16)
    assert head.logits(out, (64, 64)).shape == (2, 5, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))
    smooth = head.loss(out, labels)["loss_ce"]
    plain = F.cross_entropy(head.logits(out, (64, 64)), labels)
    assert not torch.isclose(smooth, plain)
    assert head.loss(out, torch.full((2, 64, 64), 255))["loss_ce"] == 0


# ----- the mining CLI --------------------------------------------------------------------------
def _camvid(root, n=3, size=(40, 48)):
    from pivotseg.data.taxonomy import CAMVID_CLASSES

    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            root / "train" / f"f{i}.png"
        )
        label = np.zeros(size, np.uint8)
        label[:, size[1] // 2 :] = 3
        label[: size[0] // 3] = i % len(CAMVID_CLASSES)
        Image.fromarray(label).save(root / "trainannot" / f"f{i}.png")
    return root


def test_mine_cli_writes_and_resumes(tmp_path, vit_folder, capsys, monkeypatch):
    import pivotseg.tuning.famix.mining as famix_module
    from pivotseg.cli.main import main

    data = _camvid(tmp_path / "camvid")
    out = tmp_path / "styles.safetensors"
    config = tmp_path / "mine.yaml"
    base = (
        f"backbone: clip\nsource: {vit_folder}\nlayer: 1\n"
        f"dataset: {{path: {data}, format: camvid, split: train}}\n"
        f"out: {out}\nsteps: 3\nbatch_size: 1\ncrop: 32\nsave_every: 1\ntemplates: single\n"
    )
    config.write_text(base)
    calls = []
    real = famix_module.mine_styles
    monkeypatch.setattr(
        famix_module, "mine_styles", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert main(["famix", "mine", str(config), "--limit", "2"]) == 0
    first = StyleBank.load(out)
    assert first.info["done_batches"] == 2 and len(calls) == 2
    assert first.info["layer"] == "block1" and first.info["backbone"]["name"] == "clip"
    assert sum(first.counts()) >= 2
    assert main(["famix", "mine", str(config), "--limit", "2"]) == 0  # nothing left to do
    assert len(calls) == 2
    # A longer run with otherwise equal settings is refused (the dataset size changed).
    assert main(["famix", "mine", str(config), "--limit", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["famix", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block1" in text and "Sky" in text and "ignore" in text

    # Interrupted run: only the first batch was saved; the rerun mines the second only.
    bank = StyleBank.load(out)
    bank.info["done_batches"] = 1
    bank.save(out)
    calls.clear()
    assert main(["famix", "mine", str(config), "--limit", "2"]) == 0
    assert len(calls) == 1 and StyleBank.load(out).info["done_batches"] == 2

    config.write_text(base + "stepz: 4\n")
    capsys.readouterr()
    assert main(["famix", "mine", str(config)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'steps'" in err and err.count("\n") == 1
    bank_json = json.loads(json.dumps(StyleBank.load(out).info))
    assert bank_json["mining"]["steps"] == 3


def test_missing_bank_only_blocks_training(tmp_path, rn_checkpoint):
    path, _ = rn_checkpoint
    backbone = _rn_backbone(path)
    method = FAMix(backbone, 3, str(tmp_path / "moved.safetensors"))
    method.attach(backbone)
    x = torch.randn(1, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        backbone(x)  # evaluating a trained model needs no bank
    method.train()
    with pytest.raises(CheckpointError, match="style bank not found"):
        backbone(x)


# ----- the pipeline-check inputs of bench dg ---------------------------------------------------
def test_pipeline_check_inputs_fit_together_and_are_reused(tmp_path, monkeypatch):
    import yaml

    import pivotseg.tuning.famix.mining as famix_module
    from bench.famix_inputs import prepare_famix_check, prompt_words
    from pivotseg.benchmarking.benchmark import load_row_model
    from pivotseg.data.taxonomy import CAMVID_CLASSES
    from pivotseg.segmenter import build_segmenter
    from pivotseg.text.encoder import load_tokenizer
    from pivotseg.text.templates import FAMIX_STYLES

    data = _camvid(tmp_path / "camvid", n=3)
    base = tmp_path / "base.yaml"
    source = {"path": str(data), "format": "camvid", "split": "train"}
    base.write_text(
        yaml.safe_dump({"model": {"num_classes": 11}, "data": {"source": source, "crop_size": 32}})
    )
    calls = []
    real = famix_module.mine_styles
    monkeypatch.setattr(
        famix_module, "mine_styles", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    tiny_text = dict(width=64, layers=1, heads=1, context=32, embed_dim=16)
    cache = tmp_path / "cache"
    kwargs = dict(limit=2, batch_size=1, steps=2, templates="single", visual=RN_TINY)
    row = prepare_famix_check(cache, base, text=tiny_text, progress=False, **kwargs)
    assert len(calls) == 2  # two batches of one image

    # The tokenizer: every word of the mining prompts is one token; end of text is the last id.
    tokenizer = load_tokenizer(cache)
    words = prompt_words(list(CAMVID_CLASSES), ["a photo of a {}."], list(FAMIX_STYLES))
    assert "signsymbol" in words and "cyberpunk" in words
    for word in words:
        ids = tokenizer(word)["input_ids"]
        assert len(ids) == 3 and tokenizer.decode(ids[1:2]) == word
    assert tokenizer.eos_token_id == len(tokenizer) - 1

    # The weights load through the loaders FAMix uses; the bank fits the row's model.
    model_section = load_row_model(row, "famix")
    weights = model_section["backbone_source"]
    encoder = load_openai_text_encoder(weights)
    assert encoder.model.config.vocab_size == len(tokenizer) and encoder.dim == 16
    assert encoder.encode(["Urban Grit style road"]).shape == (1, 16)
    bank = StyleBank.load(model_section["method_args"]["style_bank"])
    assert bank.info["done_batches"] == bank.info["total_batches"] == 2 and sum(bank.counts())
    model = build_segmenter(model_section)  # FAMix checks the bank against the backbone here
    assert model.tuning.bank_loaded and model.config.head == "deeplabv3plus"
    assert model.config.num_classes == 11 and "RANDOM" in row.read_text()

    # A second call reuses the cache: no mining, the same weights file.
    stamp = Path(weights).stat().st_mtime_ns
    assert prepare_famix_check(cache, base, text=tiny_text, progress=False, **kwargs) == row
    assert len(calls) == 2 and Path(weights).stat().st_mtime_ns == stamp
