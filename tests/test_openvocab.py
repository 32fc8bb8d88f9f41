"""Open-vocabulary segmentation: each last-block variant against its paper's formula, written
out again here from the layer's own q/k/v projections; end to end against transformers' CLIP;
PAMR; errors; the CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.openvocab import PAMR, OpenVocabSegmenter, dense_last_block
from pivotseg.tasks.openvocab.classes import parse_class_names, read_classes_file
from pivotseg.tasks.openvocab.dense import proxy_attention
from tests.helpers import tiny_clip_text_config, tiny_clip_tokenizer, tiny_vit_config

VISION = tiny_vit_config(num_hidden_layers=3)
TEXT = tiny_clip_text_config()
# What each paper keeps of the last block: (residual, FFN).
KEEPS = {
    "clip": (True, True),
    "maskclip": (True, True),
    "sclip": (True, True),
    "clearclip": (False, False),
    "naclip": (False, False),
}


tiny_tokenizer = tiny_clip_tokenizer


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "hf"
    model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16))
    model.eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ----- the direct formulas -------------------------------------------------------------------
def _softmax_rows(scores):
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def direct_last_block(layer, x, hw, variant, sigma=5.0):
    """The variant's last block written out per image and head, as the papers state it."""
    attn = layer.self_attn
    heads = attn.num_heads
    c = x.shape[-1]
    d = c // heads
    s = d**-0.5
    y = F.layer_norm(x, (c,), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-5)
    q, k, v = attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)
    n = x.shape[1]
    h, w = hw
    omega = torch.zeros(n, n)
    for a in range(1, n):
        for b in range(1, n):
            ra, ca = divmod(a - 1, w)
            rb, cb = divmod(b - 1, w)
            omega[a, b] = math.exp(-((ra - rb) ** 2 + (ca - cb) ** 2) / (2 * sigma**2))
    outs = []
    for i in range(x.shape[0]):
        per_head = []
        for hd in range(heads):
            qi, ki, vi = (t[i, :, hd * d : (hd + 1) * d] for t in (q, k, v))
            if variant == "clip":
                a = _softmax_rows(qi @ ki.T * s)
            elif variant == "maskclip":
                a = torch.eye(n)
            elif variant == "sclip":
                a = _softmax_rows(qi @ qi.T * s) + _softmax_rows(ki @ ki.T * s)
            elif variant == "clearclip":
                a = _softmax_rows(qi @ qi.T * s)
            elif variant == "naclip":
                a = _softmax_rows(ki @ ki.T * s + omega)
            per_head.append(a @ vi)
        outs.append(torch.cat(per_head, dim=-1))
    out = attn.out_proj(torch.stack(outs))
    residual, ffn = KEEPS[variant]
    if residual:
        out = out + x
    if ffn:
        z = F.layer_norm(out, (c,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-5)
        out = out + layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(z)))
    return out[:, 1:]


@pytest.fixture(scope="module")
def last_layer(clip_folder):
    model = CLIPModel.from_pretrained(clip_folder).eval()
    return model.vision_model.encoder.layers[-1]


@pytest.mark.parametrize("variant", list(KEEPS))
def test_variant_last_block_matches_direct_formula(last_layer, variant):
    hw = (3, 4)
    x = torch.randn(2, 1 + 12, 32)
    with torch.no_grad():
        ours, grid = dense_last_block(last_layer, x, hw, variant, sigma=1.5)
        ref = direct_last_block(last_layer, x, hw, variant, sigma=1.5)
    assert grid == hw and ours.shape == (2, 12, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_variants_differ_from_each_other(last_layer):
    x = torch.randn(1, 13, 32)
    with torch.no_grad():
        outs = {v: dense_last_block(last_layer, x, (3, 4), v)[0] for v in KEEPS}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


def test_clip_variant_equals_the_unmodified_transformers_layer(last_layer):
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        ours, _ = dense_last_block(last_layer, x, (3, 4), "clip")
        ref = last_layer(x, None)
        ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(ours, ref[:, 1:], rtol=1e-5, atol=1e-5)


def test_proxy_attention_matches_direct_formula():
    feats = torch.randn(2, 6, 3, 4)
    got = proxy_attention(feats, beta=1.2, gamma=3.0)
    for i in range(2):
        f = feats[i].reshape(6, 12)
        f = f / f.norm(dim=0, keepdim=True)
        sim = f.T @ f
        sim = (sim - 1.2 * sim.mean()) * 3.0
        sim[sim < 0] = float("-inf")
        torch.testing.assert_close(got[i], torch.softmax(sim, dim=-1))
    # Identical features: every S' < 0 and each token falls back to itself, never NaN.
    same = proxy_attention(torch.ones(1, 4, 2, 2))
    torch.testing.assert_close(same[0], torch.eye(4))


def test_proxyclip_block_resizes_v_to_the_vfm_grid(last_layer):
    hw, vfm_hw = (2, 3), (4, 6)
    x = torch.randn(1, 7, 32)
    feats = torch.randn(1, 5, *vfm_hw)
    attention = proxy_attention(feats)
    with torch.no_grad():
        ours, grid = dense_last_block(
            last_layer, x, hw, "proxyclip", proxy=attention, proxy_hw=vfm_hw
        )
        attn = last_layer.self_attn
        y = F.layer_norm(x, (32,), last_layer.layer_norm1.weight, last_layer.layer_norm1.bias)
        v = attn.v_proj(y)[0, 1:]  # (6, 32), patch tokens only
        heads = []
        for hd in range(2):
            vh = v[:, hd * 16 : (hd + 1) * 16].T.reshape(1, 16, *hw)
            vh = F.interpolate(vh, size=vfm_hw, mode="bilinear", align_corners=False)
            heads.append(attention[0] @ vh.reshape(16, -1).T)
        ref = attn.out_proj(torch.cat(heads, dim=-1))
    assert grid == vfm_hw
    torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-5)


# ----- end to end -----------------------------------------------------------------------------
def test_segmenter_logits_equal_a_manual_clearclip(clip_folder):
    seg = OpenVocabSegmenter(
        clip_folder, "clearclip", ["cat", "dog", "sky"], templates="single", mode="whole"
    )
    model = CLIPModel.from_pretrained(clip_folder).eval()
    image = torch.rand(1, 3, 24, 40) * 255
    captured = {}
    layer = model.vision_model.encoder.layers[-1]

    def keep_input(module, args):
        captured["x"] = args[0]

    handle = layer.register_forward_pre_hook(keep_input)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        model.vision_model((image - mean) / std, interpolate_pos_encoding=True)
        handle.remove()
        tokens = direct_last_block(layer, captured["x"], (3, 5), "clearclip")
        emb = model.visual_projection(model.vision_model.post_layernorm(tokens))
        emb = F.normalize(emb, dim=-1)
        tok = tiny_tokenizer()
        texts = tok(
            [f"a photo of a {c}." for c in ("cat", "dog", "sky")], padding=True, return_tensors="pt"
        )
        text = F.normalize(model.get_text_features(**texts).pooler_output, dim=-1)
        cos = (emb @ text.T).transpose(1, 2).reshape(1, 3, 3, 5)
        ref = F.interpolate(cos, size=(24, 40), mode="bilinear", align_corners=False) * 50.0
        ours = seg.logits(image)
    assert seg.logit_scale == 50.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_shapes_slide_resize_and_background(clip_folder):
    image = (np.random.rand(30, 45, 3) * 255).astype(np.uint8)
    seg = OpenVocabSegmenter(
        clip_folder,
        "sclip",
        ["cat; kitten", "dog"],
        templates="single",
        crop=16,
        stride=8,
        resize_short=20,
    )
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    assert seg.query_scores(pixels).shape == (1, 3, 30, 45)
    logits = seg.logits(pixels)
    assert logits.shape == (1, 2, 30, 45) and torch.isfinite(logits).all()
    labels = seg.predict(image)
    assert labels.shape == (30, 45) and set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(labels, logits.argmax(1)[0].numpy())
    probs = seg.probabilities(pixels)
    assert (probs <= 1).all() and (probs >= 0).all()

    everything_background = OpenVocabSegmenter(
        clip_folder, "sclip", ["cat", "dog"], templates="single", mode="whole", threshold=1.0
    )
    assert (everything_background.predict(image) == 255).all()
    with_background = OpenVocabSegmenter(
        clip_folder,
        "sclip",
        ["cat", "dog"],
        background=["sky"],
        templates="single",
        mode="whole",
    )
    p = with_background.probabilities(pixels)
    assert p.shape == (1, 3, 30, 45)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 30, 45))  # one prompt per channel
    labels = with_background.predict(image)
    expected = p.argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels, np.where(expected == 2, 255, expected))


def test_imagenet_templates_are_averaged(clip_folder):
    from pivotseg.tasks.openvocab import OPENAI_IMAGENET_TEMPLATES

    seg = OpenVocabSegmenter(clip_folder, "maskclip", ["cat"], mode="whole")
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = tiny_tokenizer()
    texts = tok(
        [t.format("cat") for t in OPENAI_IMAGENET_TEMPLATES],
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    with torch.no_grad():
        each = F.normalize(model.get_text_features(**texts).pooler_output, dim=-1)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    torch.testing.assert_close(seg.text[0], F.normalize(each.mean(0), dim=-1))


def test_proxyclip_end_to_end_with_a_dinov2_vfm(clip_folder):
    from pivotseg.backbones import build_backbone

    vfm = build_backbone(
        "dinov2",
        config=dict(
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            patch_size=4,
            image_size=32,
        ),
    )
    seg = OpenVocabSegmenter(
        clip_folder, "proxyclip", ["cat", "dog"], vfm=vfm, templates="single", mode="whole"
    )
    image = torch.rand(1, 3, 32, 48) * 255
    logits = seg.logits(image)
    assert logits.shape == (1, 2, 32, 48) and torch.isfinite(logits).all()
    # The output grid is the VFM's (8 x 12 here), finer than CLIP's 4 x 6.
    emb = seg.dense(image)
    assert emb.shape[-2:] == (8, 12)


# ----- PAMR ------------------------------------------------------------------------------------
def test_pamr_affinity_matches_direct_formula():
    torch.manual_seed(1)
    image = torch.rand(1, 3, 12, 12)
    pamr = PAMR(iterations=1, dilations=(2, 3))
    weights = pamr.affinity(image)[0]  # (P, H, W)
    i, j = 5, 1  # near the left border: replicated neighbours
    neighbours, window = [], []
    for d in (2, 3):
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                pos = (min(max(i + dy, 0), 11), min(max(j + dx, 0), 11))
                window.append(image[0, :, pos[0], pos[1]])
                if (dy, dx) != (0, 0):
                    neighbours.append(image[0, :, pos[0], pos[1]])
    sigma = torch.stack(window).std(dim=0)
    logits = torch.stack(
        [(-(image[0, :, i, j] - n).abs() / (1e-8 + 0.1 * sigma)).mean() for n in neighbours]
    )
    torch.testing.assert_close(weights[:, i, j], torch.softmax(logits, 0))


def test_pamr_moves_labels_to_image_edges():
    h, w = 32, 48
    image = torch.zeros(1, 3, h, w)
    image[..., 24:] = 1.0  # the object starts at column 24
    image += 0.01 * torch.randn_like(image)
    cols = torch.arange(w).float()
    # Coarse scores whose boundary sits 6 columns too far right (column 30).
    score = torch.sigmoid((cols - 30.0) / 3.0).expand(h, w)
    masks = torch.stack([1 - score, score])[None]
    truth = (cols >= 24).long().expand(h, w)
    before = (masks.argmax(1)[0] == truth).float().mean()
    after = (PAMR(10, (8, 16))(image, masks).argmax(1)[0] == truth).float().mean()
    assert before < 0.9 and after > before + 0.05


# ----- errors ---------------------------------------------------------------------------------
def test_class_name_errors(tmp_path):
    with pytest.raises(ConfigError, match="no class names"):
        parse_class_names([])
    with pytest.raises(ConfigError, match="empty name"):
        parse_class_names(["road", ""])
    with pytest.raises(ConfigError, match="given twice"):
        parse_class_names(["road", "car", "Road"])
    with pytest.raises(DataError, match="classes file not found"):
        read_classes_file(tmp_path / "missing.txt")
    (tmp_path / "c.txt").write_text("# comment\nroad\n\ncar; automobile\n")
    assert read_classes_file(tmp_path / "c.txt") == ["road", "car; automobile"]
    assert parse_class_names(["traffic_light"]) == [["traffic light"]]


def test_backbone_errors(clip_folder, tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "vision")
    with pytest.raises(ConfigError, match="vision tower"):
        OpenVocabSegmenter(tmp_path / "vision", "naclip", ["cat"])
    with pytest.raises(ConfigError, match="unknown"):
        OpenVocabSegmenter(clip_folder, "gemclip", ["cat"])
    with pytest.raises(ConfigError, match="vfm"):
        OpenVocabSegmenter(clip_folder, "proxyclip", ["cat"], templates="single")
    with pytest.raises(ConfigError, match="given twice"):
        OpenVocabSegmenter(clip_folder, "naclip", ["cat", "cat"])
    with pytest.raises(ConfigError, match="also a class"):
        OpenVocabSegmenter(clip_folder, "naclip", ["cat"], background=["cat"])
    for err in (ConfigError, DataError):
        assert "\n" not in str(err("x"))


# ----- CLI ------------------------------------------------------------------------------------
def _camvid(root, n=2, size=(40, 56)):
    from pivotseg.data.taxonomy import CAMVID_CLASSES

    (root / "test").mkdir(parents=True)
    (root / "testannot").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            root / "test" / f"f{i}.png"
        )
        label = rng.integers(0, len(CAMVID_CLASSES), size, dtype=np.uint8)
        Image.fromarray(label).save(root / "testannot" / f"f{i}.png")
    return root


def test_cli_predicts_and_evaluates(clip_folder, tmp_path, capsys):
    from pivotseg.cli.main import main

    data = _camvid(tmp_path / "camvid")
    out = tmp_path / "out"
    code = main(
        [
            "ovseg",
            str(data / "test"),
            "--clip",
            str(clip_folder),
            "--variant",
            "naclip",
            "--templates",
            "single",
            "--out",
            str(out),
            "--eval-data",
            str(data),
            "--eval-format",
            "camvid",
            "--eval-split",
            "test",
            "--crop",
            "32",
            "--stride",
            "16",
        ]
    )
    assert code == 0
    labels = np.array(Image.open(out / "f0.png"))
    assert labels.shape == (40, 56) and labels.max() < 11
    assert np.array(Image.open(out / "f0_color.png")).shape == (40, 56, 3)
    text = capsys.readouterr().out
    assert "mIoU" in text and "Sky" in text
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    (scored,) = metrics["datasets"]  # docs/evaluation.md: percent, IoU by class name
    assert len(scored["per_class"]) == 11 and "Sky" in scored["per_class"]
    assert 0 <= scored["acc"] <= 100 and scored["frames"] == 2 and scored["limit"] is None


def test_cli_errors_are_one_line(clip_folder, tmp_path, capsys):
    from pivotseg.cli.main import main

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    code = main(
        ["ovseg", str(img), "--classes-file", str(tmp_path / "none.txt"), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "classes file not found" in err and err.count("\n") == 1
    code = main(
        [
            "ovseg",
            str(img),
            "--classes",
            "road,,car",
            "--out",
            str(tmp_path),
            "--clip",
            str(clip_folder),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "empty name" in err and err.count("\n") == 1
