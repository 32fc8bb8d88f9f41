"""``pivotseg weights import-dinov2`` / ``import-rein`` on small checkpoints built here in the
released key layouts (facebookresearch/dinov2, Rein's mmseg + mmdet Mask2Former).

The real released files could not be checked here (no network to the model hubs): these tests
fix the layouts from the published code and check values against computations written out
from the original layout.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

from pivotseg.backbones import build_backbone
from pivotseg.backbones.convert.dinov2_pth import import_dinov2
from pivotseg.backbones.convert.rein import import_rein
from pivotseg.cli.main import main
from pivotseg.data.taxonomy import CITYSCAPES_CLASSES
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.errors import CheckpointError
from pivotseg.segmenter import load_segmenter

WIDTH, HEADS = 32, 2


def dinov2_state(depth=2, patch=14, grid=4, registers=0, swiglu=False, seed=0, width=WIDTH):
    """A random backbone in facebookresearch/dinov2's key layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "mask_token": r(1, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch, scale=0.05),
        "patch_embed.proj.bias": r(width),
        "norm.weight": 1 + r(width),
        "norm.bias": r(width),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, width)
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + r(width),
            b + "norm1.bias": r(width),
            b + "attn.qkv.weight": r(3 * width, width),
            b + "attn.qkv.bias": r(3 * width),
            b + "attn.proj.weight": r(width, width),
            b + "attn.proj.bias": r(width),
            b + "ls1.gamma": r(width, scale=0.5),
            b + "norm2.weight": 1 + r(width),
            b + "norm2.bias": r(width),
            b + "ls2.gamma": r(width, scale=0.5),
        }
        if swiglu:
            hidden = (int(width * 4 * 2 / 3) + 7) // 8 * 8
            sd |= {
                b + "mlp.w12.weight": r(2 * hidden, width),
                b + "mlp.w12.bias": r(2 * hidden),
                b + "mlp.w3.weight": r(width, hidden),
                b + "mlp.w3.bias": r(width),
            }
        else:
            sd |= {
                b + "mlp.fc1.weight": r(4 * width, width),
                b + "mlp.fc1.bias": r(4 * width),
                b + "mlp.fc2.weight": r(width, 4 * width),
                b + "mlp.fc2.bias": r(width),
            }
    return sd


def reference_dinov2(sd, x, heads=HEADS, registers=0, swiglu=False):
    """DINOv2's forward (final norm included) from the original-layout tensors."""
    width = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        b, n, _ = h.shape
        qkv = (h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(b, n, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, width)
        t = t + p["ls1.gamma"] * (o @ p["attn.proj.weight"].T + p["attn.proj.bias"])
        h = F.layer_norm(t, (width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        if swiglu:
            x1, x2 = (h @ p["mlp.w12.weight"].T + p["mlp.w12.bias"]).chunk(2, -1)
            m = (F.silu(x1) * x2) @ p["mlp.w3.weight"].T + p["mlp.w3.bias"]
        else:
            m = F.gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
            m = m @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
        t = t + p["ls2.gamma"] * m
    return F.layer_norm(t, (width,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


# ----- import-dinov2 -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "registers, swiglu", [(0, False), (4, False), (0, True)], ids=["mlp", "registers", "swiglu"]
)
def test_dinov2_import_reproduces_the_original_forward(tmp_path, registers, swiglu):
    sd = dinov2_state(registers=registers, swiglu=swiglu)
    torch.save(sd, tmp_path / "dinov2.pth")
    done = import_dinov2(tmp_path / "dinov2.pth", tmp_path / "hf", num_heads=HEADS)
    name = "dinov2_reg" if registers else "dinov2"
    assert done["backbone"] == name
    assert done["config"]["image_size"] == 56 and done["config"]["patch_size"] == 14
    backbone = build_backbone(name, source=tmp_path / "hf")  # the loader configs use
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone.model(pixel_values=x).last_hidden_state
    truth = reference_dinov2(sd, x, registers=registers, swiglu=swiglu)
    assert ours.shape == truth.shape
    torch.testing.assert_close(ours, truth, atol=2e-5, rtol=1e-4)


def test_dinov2_tensors_land_where_expected(tmp_path):
    sd = dinov2_state(swiglu=True)
    torch.save(sd, tmp_path / "g.pth")
    import_dinov2(tmp_path / "g.pth", tmp_path / "hf", num_heads=HEADS)
    layer = build_backbone("dinov2", source=tmp_path / "hf").model.encoder.layer[1]
    qkv = sd["blocks.1.attn.qkv.weight"]
    attn = layer.attention
    torch.testing.assert_close(attn.q_proj.weight, qkv[:WIDTH])
    torch.testing.assert_close(attn.k_proj.weight, qkv[WIDTH : 2 * WIDTH])
    torch.testing.assert_close(attn.v_proj.bias, sd["blocks.1.attn.qkv.bias"][2 * WIDTH :])
    torch.testing.assert_close(layer.layer_scale1.lambda1, sd["blocks.1.ls1.gamma"])
    torch.testing.assert_close(layer.layer_scale2.lambda1, sd["blocks.1.ls2.gamma"])
    w12 = sd["blocks.1.mlp.w12.weight"]
    torch.testing.assert_close(layer.mlp.gate_proj.weight, w12[: len(w12) // 2])
    torch.testing.assert_close(layer.mlp.up_proj.weight, w12[len(w12) // 2 :])


def test_dinov2_chunked_blocks_and_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file

    sd = dinov2_state()
    chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in sd.items()}
    save_file(chunked, str(tmp_path / "d.safetensors"))
    done = import_dinov2(tmp_path / "d.safetensors", tmp_path / "hf", num_heads=HEADS)
    assert done["config"]["num_hidden_layers"] == 2
    model = build_backbone("dinov2", source=tmp_path / "hf").model
    torch.testing.assert_close(model.encoder.layer[1].norm2.bias, sd["blocks.1.norm2.bias"])


def test_dinov2_cli_names_the_model_and_the_backbone(tmp_path, capsys):
    torch.save(dinov2_state(width=64, depth=1), tmp_path / "s.pth")
    assert (
        main(["weights", "import-dinov2", str(tmp_path / "s.pth"), "--out", str(tmp_path / "o")])
        == 0
    )
    line = capsys.readouterr().out
    # 64 wide -> one 64-wide head by default, as every released DINOv2.
    assert "64 wide, 1 blocks, 1 heads, image 56" in line and "backbone: dinov2," in line
    assert (tmp_path / "o" / "config.json").is_file() and (
        tmp_path / "o" / "model.safetensors"
    ).is_file()


class RunsCode:
    """A pickled object whose unpickling would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_objects_are_refused_without_running_them(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    sd = dinov2_state()
    sd["extra"] = RunsCode(marker)
    torch.save(sd, tmp_path / "evil.pth")
    code = main(
        ["weights", "import-dinov2", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "refused" in err and "pathlib" in err and "weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_another_models_keys_get_one_line_naming_them(tmp_path, capsys):
    torch.save(
        {"encoder.conv.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, tmp_path / "x.pth"
    )
    code = main(["weights", "import-dinov2", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "missing (e.g. cls_token" in err and "unexpected (e.g. encoder.conv.weight" in err


def test_a_dinov2_with_a_block_missing_names_its_keys(tmp_path):
    sd = dinov2_state(depth=3)
    del sd["blocks.1.attn.proj.weight"], sd["blocks.2.ls2.gamma"]
    sd["blocks.0.attn.q_norm.weight"] = torch.zeros(WIDTH)
    with pytest.raises(
        CheckpointError, match=r"2 missing .*blocks\.1\.attn\.proj\.weight.*1 unexpected .*q_norm"
    ):
        import_dinov2_state(tmp_path, sd)


def import_dinov2_state(tmp_path, sd):
    torch.save(sd, tmp_path / "m.pth")
    return import_dinov2(tmp_path / "m.pth", tmp_path / "hf", num_heads=HEADS)


def test_dinov2_output_folder_with_files_is_left_alone(tmp_path):
    torch.save(dinov2_state(), tmp_path / "d.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not an empty folder"):
        import_dinov2(tmp_path / "d.pth", tmp_path / "hf", num_heads=HEADS)
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


# ----- import-rein -------------------------------------------------------------------------------
TOKENS, RANK, DEPTH, HIDDEN, DEC_HEADS = 5, 3, 4, 32, 8


def rein_state(plain_tokens=False, with_scale=True, seed=2):
    """Rein's ``backbone.reins.*`` and mmdet's ``decode_head.*`` (Rein's head) at tiny sizes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    c, q = WIDTH, HIDDEN
    sd = {}
    if plain_tokens:
        sd["backbone.reins.learnable_tokens"] = r(DEPTH, TOKENS, c)
    else:
        sd["backbone.reins.learnable_tokens_a"] = r(DEPTH, TOKENS, RANK)
        sd["backbone.reins.learnable_tokens_b"] = r(DEPTH, RANK, c)
    if with_scale:
        sd["backbone.reins.scale"] = torch.tensor(0.37)
    for name, (o, i) in {
        "mlp_token2feat": (c, c),
        "mlp_delta_f": (c, c),
        "transform": (q, c),
        "merge": (q, 3 * q),
    }.items():
        sd[f"backbone.reins.{name}.weight"], sd[f"backbone.reins.{name}.bias"] = r(o, i), r(o)
    h = "decode_head."
    pd = h + "pixel_decoder."
    for i in range(3):
        sd |= {
            f"{pd}input_convs.{i}.conv.weight": r(q, c, 1, 1),
            f"{pd}input_convs.{i}.conv.bias": r(q),
            f"{pd}input_convs.{i}.gn.weight": r(q),
            f"{pd}input_convs.{i}.gn.bias": r(q),
        }
    sd[pd + "level_encoding.weight"] = r(3, q)
    e = pd + "encoder.layers.0."
    sd |= {
        e + "self_attn.sampling_offsets.weight": r(DEC_HEADS * 3 * 4 * 2, q),
        e + "self_attn.sampling_offsets.bias": r(DEC_HEADS * 3 * 4 * 2),
        e + "self_attn.attention_weights.weight": r(DEC_HEADS * 3 * 4, q),
        e + "self_attn.attention_weights.bias": r(DEC_HEADS * 3 * 4),
        e + "self_attn.value_proj.weight": r(q, q),
        e + "self_attn.value_proj.bias": r(q),
        e + "self_attn.output_proj.weight": r(q, q),
        e + "self_attn.output_proj.bias": r(q),
        e + "ffn.layers.0.0.weight": r(48, q),
        e + "ffn.layers.0.0.bias": r(48),
        e + "ffn.layers.1.weight": r(q, 48),
        e + "ffn.layers.1.bias": r(q),
    }
    for n in range(2):
        sd[e + f"norms.{n}.weight"], sd[e + f"norms.{n}.bias"] = r(q), r(q)
    sd |= {
        pd + "lateral_convs.0.conv.weight": r(q, c, 1, 1),
        pd + "lateral_convs.0.gn.weight": r(q),
        pd + "lateral_convs.0.gn.bias": r(q),
        pd + "output_convs.0.conv.weight": r(q, q, 3, 3),
        pd + "output_convs.0.gn.weight": r(q),
        pd + "output_convs.0.gn.bias": r(q),
        pd + "mask_feature.weight": r(q, q, 1, 1),
        pd + "mask_feature.bias": r(q),
    }
    for layer in range(2):
        d = f"{h}transformer_decoder.layers.{layer}."
        for attn in ("self_attn", "cross_attn"):
            sd |= {
                f"{d}{attn}.attn.in_proj_weight": r(3 * q, q),
                f"{d}{attn}.attn.in_proj_bias": r(3 * q),
                f"{d}{attn}.attn.out_proj.weight": r(q, q),
                f"{d}{attn}.attn.out_proj.bias": r(q),
            }
        sd |= {
            d + "ffn.layers.0.0.weight": r(64, q),
            d + "ffn.layers.0.0.bias": r(64),
            d + "ffn.layers.1.weight": r(q, 64),
            d + "ffn.layers.1.bias": r(q),
        }
        for n in range(3):
            sd[d + f"norms.{n}.weight"], sd[d + f"norms.{n}.bias"] = r(q), r(q)
    sd |= {
        h + "transformer_decoder.post_norm.weight": r(q),
        h + "transformer_decoder.post_norm.bias": r(q),
        h + "level_embed.weight": r(3, q),
        h + "querys2feat.weight": r(q, q),
        h + "querys2feat.bias": r(q),
        h + "cls_embed.weight": r(20, q),
        h + "cls_embed.bias": r(20),
    }
    for n in (0, 2, 4):
        sd[h + f"mask_embed.{n}.weight"], sd[h + f"mask_embed.{n}.bias"] = r(q, q), r(q)
    return sd


def full_rein_checkpoint(tmp_path, **kwargs) -> tuple[pathlib.Path, dict]:
    """A full segmentor (generate_full_weights): backbone at patch 16, 4x4 grid (image 64)."""
    sd = rein_state(**kwargs)
    sd |= {f"backbone.{k}": v for k, v in dinov2_state(depth=DEPTH, patch=16, seed=3).items()}
    classes = tuple(f"class{i}" for i in range(19))
    path = tmp_path / "rein.pth"
    torch.save({"meta": {"dataset_meta": {"classes": classes}}, "state_dict": sd}, path)
    return path, sd


def import_tiny(tmp_path, path, **kwargs):
    return import_rein(
        path, tmp_path / "run", backbone_heads=HEADS, out_indices=[0, 1, 2, 3], **kwargs
    )


def test_rein_import_gives_a_run_that_eval_opens_with_every_tensor_in_place(tmp_path):
    path, sd = full_rein_checkpoint(tmp_path)
    report = import_tiny(tmp_path, path)
    assert report["head_imported"], report["head"]
    folder = resolve_model_folder(tmp_path / "run")  # what eval / predict do
    model = load_segmenter(folder)
    assert find_run_config(folder).eval.mode == "slide"
    assert model.config.class_names == [f"class{i}" for i in range(19)]  # from the file's meta
    params = dict(model.named_parameters())

    def same(ours, key, rows=slice(None)):
        torch.testing.assert_close(params[ours].detach(), sd[key][rows])

    reins = "backbone.reins."
    same("tuning.tokens_a.2", reins + "learnable_tokens_a", 2)
    same("tuning.tokens_b.3", reins + "learnable_tokens_b", 3)
    same("tuning.mlp_delta_f.32.weight", reins + "mlp_delta_f.weight")
    same("tuning.transform.32.bias", reins + "transform.bias")
    same("tuning.merge.weight", reins + "merge.weight")
    assert float(params["tuning.scale"].detach()) == pytest.approx(0.37)
    m2f = "head.mask2former."
    dec = m2f + "transformer_module.decoder."
    src = "decode_head.transformer_decoder.layers.1."
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(i * HIDDEN, (i + 1) * HIDDEN)
        same(f"{dec}layers.1.self_attn.{proj}.weight", src + "self_attn.attn.in_proj_weight", rows)
        same(f"{dec}layers.1.self_attn.{proj}.bias", src + "self_attn.attn.in_proj_bias", rows)
    same(f"{dec}layers.1.cross_attn.in_proj_weight", src + "cross_attn.attn.in_proj_weight")
    same(f"{dec}layers.1.cross_attn_layer_norm.weight", src + "norms.0.weight")
    same(f"{dec}layers.1.self_attn_layer_norm.bias", src + "norms.1.bias")
    same(f"{dec}layers.1.fc2.weight", src + "ffn.layers.1.weight")
    same(f"{dec}layernorm.weight", "decode_head.transformer_decoder.post_norm.weight")
    same(f"{dec}mask_predictor.mask_embedder.1.0.weight", "decode_head.mask_embed.2.weight")
    same(m2f + "transformer_module.queries_to_features.weight", "decode_head.querys2feat.weight")
    same(m2f + "class_predictor.bias", "decode_head.cls_embed.bias")
    pd, spd = m2f + "pixel_decoder.", "decode_head.pixel_decoder."
    same(pd + "input_projections.1.1.weight", spd + "input_convs.1.gn.weight")
    same(pd + "level_embed", spd + "level_encoding.weight")
    same(pd + "encoder.layers.0.fc1.weight", spd + "encoder.layers.0.ffn.layers.0.0.weight")
    same(pd + "encoder.layers.0.final_layer_norm.bias", spd + "encoder.layers.0.norms.1.bias")
    same(pd + "adapter_1.0.weight", spd + "lateral_convs.0.conv.weight")
    same(pd + "layer_1.1.bias", spd + "output_convs.0.gn.bias")
    same(pd + "mask_projection.weight", spd + "mask_feature.weight")
    attn = model.backbone.model.encoder.layer[3].attention
    torch.testing.assert_close(
        attn.k_proj.weight, sd["backbone.blocks.3.attn.qkv.weight"][WIDTH : 2 * WIDTH]
    )
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 80) * 255)
    assert logits.shape == (1, 19, 64, 80) and torch.isfinite(logits).all()


def reference_rein_update(sd, layer, f):
    """Rein's ``forward_delta_feat`` and scale from its tensors (LoRAReins)."""
    p = {k[len("backbone.reins.") :]: v for k, v in sd.items() if k.startswith("backbone.reins.")}
    tokens = p["learnable_tokens_a"][layer] @ p["learnable_tokens_b"][layer]
    attn = torch.einsum("nbc,mc->nbm", f, tokens) * f.shape[-1] ** -0.5
    attn = attn.softmax(-1)
    token_feat = tokens[1:] @ p["mlp_token2feat.weight"].T + p["mlp_token2feat.bias"]
    delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], token_feat)
    delta = (delta + f) @ p["mlp_delta_f.weight"].T + p["mlp_delta_f.bias"]
    return f + p["scale"] * delta


def reference_rein_queries(sd):
    """Rein's ``return_auto``: max, mean and last over layers, per channel, then ``merge``."""
    p = {k[len("backbone.reins.") :]: v for k, v in sd.items() if k.startswith("backbone.reins.")}
    tokens = p["learnable_tokens_a"] @ p["learnable_tokens_b"]  # (L, m, c)
    t = (tokens @ p["transform.weight"].T + p["transform.bias"]).permute(1, 2, 0)  # (m, q, L)
    layers = t.shape[-1]
    pooled = torch.cat(
        [F.max_pool1d(t, layers), F.avg_pool1d(t, layers), t[:, :, -1:]], dim=-1
    ).flatten(-2)
    return pooled @ p["merge.weight"].T + p["merge.bias"]


def test_imported_rein_computes_what_reins_code_computes(tmp_path):
    path, sd = full_rein_checkpoint(tmp_path)
    import_tiny(tmp_path, path)
    tuning = load_segmenter(tmp_path / "run").tuning
    f = torch.randn(2, 16, WIDTH, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = tuning.update(2, f, (4, 4))
        queries = tuning.queries()
    torch.testing.assert_close(ours, reference_rein_update(sd, 2, f))
    torch.testing.assert_close(queries, reference_rein_queries(sd))


def test_plain_reins_tokens_and_a_fixed_scale(tmp_path):
    path, sd = full_rein_checkpoint(tmp_path, plain_tokens=True, with_scale=False)
    import_tiny(tmp_path, path)
    tuning = load_segmenter(tmp_path / "run").tuning
    with torch.no_grad():
        torch.testing.assert_close(tuning.layer_tokens(1), sd["backbone.reins.learnable_tokens"][1])
    assert float(tuning.scale.detach()) == 1.0  # zero_mlp_delta_f: Rein's scale is the constant 1


def test_released_rein_file_takes_the_backbone_from_the_dinov2_pth(tmp_path, capsys):
    sd = rein_state()  # *_rein_and_head.pth: no backbone.*
    torch.save({"meta": {}, "state_dict": sd}, tmp_path / "rein_and_head.pth")
    backbone = dinov2_state(depth=DEPTH, patch=14, grid=4, seed=4)
    torch.save(backbone, tmp_path / "dinov2_vitl14_pretrain.pth")
    args = ["weights", "import-rein", str(tmp_path / "rein_and_head.pth"), "--out"]
    assert main([*args, str(tmp_path / "a")]) == 2
    assert "pass --backbone dinov2_vitl14_pretrain.pth" in capsys.readouterr().err
    report = import_tiny(
        tmp_path,
        tmp_path / "rein_and_head.pth",
        backbone=tmp_path / "dinov2_vitl14_pretrain.pth",
        image_size=64,
    )
    assert report["head_imported"]
    model = load_segmenter(tmp_path / "run")
    assert model.config.class_names == list(CITYSCAPES_CLASSES)
    emb = model.backbone.model.embeddings
    # Rein's conversion: kernel 14 -> 16 and the position grid to image_size / 16, bicubic.
    kernel = F.interpolate(backbone["patch_embed.proj.weight"], size=(16, 16), mode="bicubic")
    torch.testing.assert_close(emb.patch_embeddings.projection.weight, kernel)
    assert emb.position_embeddings.shape == (1, 1 + 16, WIDTH)
    torch.testing.assert_close(emb.position_embeddings[:, 0], backbone["pos_embed"][:, 0])


def test_a_head_pivotseg_cannot_hold_is_reported_and_backbone_and_rein_still_imported(
    tmp_path, capsys
):
    sd = rein_state()
    sd["decode_head.query_feat.weight"] = torch.zeros(TOKENS, HIDDEN)  # replace_query_feat=False
    del sd["decode_head.querys2feat.weight"], sd["decode_head.querys2feat.bias"]
    sd |= {f"backbone.{k}": v for k, v in dinov2_state(depth=DEPTH, patch=16).items()}
    torch.save(sd, tmp_path / "r.pth")
    run = tmp_path / "run"
    args = ["weights", "import-rein", str(tmp_path / "r.pth"), "--out", str(run)]
    args += ["--out-indices", "0", "1", "2", "3", "--backbone-heads", str(HEADS)]
    assert main(args) == 0
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and "decode_head NOT imported" in note
    assert "decode_head.query_feat.weight" in note
    assert "head.mask2former.transformer_module.queries_to_features.weight" in note
    report = json.loads((run / "import.json").read_text())
    assert not report["head_imported"] and report["head"] in note
    tokens = load_segmenter(run).tuning.tokens_b[0]
    torch.testing.assert_close(tokens.detach(), sd["backbone.reins.learnable_tokens_b"][0])


def test_wrong_decoder_heads_leave_the_head_out_and_say_so(tmp_path):
    path, _ = full_rein_checkpoint(tmp_path)
    report = import_tiny(tmp_path, path, num_heads=4)  # the file's deformable attention has 8
    assert not report["head_imported"]
    assert "sampling_offsets" in report["head"] and "check --num-heads" in report["head"]


def test_not_a_rein_checkpoint_gets_one_line_naming_keys(tmp_path, capsys):
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(3)}}, tmp_path / "x.pth")
    code = main(["weights", "import-rein", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "missing (e.g. backbone.reins.learnable_tokens_a" in err
    assert "unexpected (e.g. model.fc.weight" in err
    assert not (tmp_path / "o").exists()


def test_rein_tokens_for_another_backbone_are_refused(tmp_path):
    sd = rein_state()
    sd |= {f"backbone.{k}": v for k, v in dinov2_state(depth=DEPTH + 1, patch=16).items()}
    torch.save(sd, tmp_path / "r.pth")
    with pytest.raises(
        CheckpointError, match="Rein tokens are for 4 blocks of width 32, the backbone has 5"
    ):
        import_tiny(tmp_path, tmp_path / "r.pth")
    assert not (tmp_path / "run").exists()


def test_mmengine_checkpoint_with_pickled_objects_is_refused_by_name(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": rein_state(), "message_hub": RunsCode(marker)}, tmp_path / "r.pth")
    code = main(["weights", "import-rein", str(tmp_path / "r.pth"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "refused" in err
    assert "['state_dict']" in err and not marker.exists()
