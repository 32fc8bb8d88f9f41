import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pivotseg.backbones import build_backbone
from pivotseg.backbones.clip_resnet import build_clip_resnet, public_state_dict
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester

TINY = dict(layers=[1, 1, 2, 3], width=8, heads=2, output_dim=16, image_size=64)


class TestClipResNet(BackboneTester):
    name = "clip_resnet"
    tiny_config = TINY
    has_blocks = False


class TestClipResNetDilated(BackboneTester):
    name = "clip_resnet"
    tiny_config = {**TINY, "output_stride": 16, "dilation_pattern": "famix"}
    build_kwargs = {"out_indices": [0, 3]}
    has_blocks = False


def tiny(**kw):
    return randomize_bn(build_clip_resnet(config={**TINY, **kw}))


def randomize_bn(bb):
    # CLIP zero-initialises each bottleneck's last BN; random statistics make every block count.
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return bb


# ----- sizes and the public key layout -----------------------------------------------------------
def resnet_params(layers, width, output_dim, grid):
    """Hand count of CLIP's ModifiedResNet (convs have no bias; BN has weight + bias)."""
    half = width // 2
    total = 27 * half + 2 * half + 9 * half * half + 2 * half + 9 * half * width + 2 * width
    inplanes = width
    for i, n in enumerate(layers):
        planes = width * 2**i
        for j in range(n):
            total += inplanes * planes + 2 * planes  # conv1 + bn1
            total += 9 * planes * planes + 2 * planes  # conv2 + bn2
            total += planes * 4 * planes + 2 * 4 * planes  # conv3 + bn3
            if j == 0:
                total += inplanes * 4 * planes + 2 * 4 * planes  # downsample conv + bn
            inplanes = 4 * planes
    dim = width * 32
    total += (grid * grid + 1) * dim + 3 * (dim * dim + dim) + dim * output_dim + output_dim
    return total


def test_published_sizes_on_meta_device():
    with torch.device("meta"):
        rn50 = build_clip_resnet(config={"variant": "RN50"})
        rn101 = build_clip_resnet(config={"variant": "RN101"})
    n50 = sum(p.numel() for p in rn50.parameters())
    n101 = sum(p.numel() for p in rn101.parameters())
    assert n50 == resnet_params([3, 4, 6, 3], 64, 1024, 7)
    assert n101 == resnet_params([3, 4, 23, 3], 64, 512, 7)
    assert abs(n50 - 38.3e6) < 0.01 * 38.3e6  # CLIP RN50 image tower: 38.3M
    assert abs(n101 - 56.3e6) < 0.01 * 56.3e6  # CLIP RN101 image tower: 56.3M


KNOWN_RN50_KEYS = {
    "visual.conv1.weight": (32, 3, 3, 3),
    "visual.bn1.running_var": (32,),
    "visual.conv2.weight": (32, 32, 3, 3),
    "visual.conv3.weight": (64, 32, 3, 3),
    "visual.bn3.running_mean": (64,),
    "visual.layer1.0.conv1.weight": (64, 64, 1, 1),
    "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "visual.layer1.0.downsample.1.running_var": (256,),
    "visual.layer1.2.conv3.weight": (256, 64, 1, 1),
    "visual.layer2.0.conv2.weight": (128, 128, 3, 3),
    "visual.layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "visual.layer2.3.bn2.bias": (128,),
    "visual.layer3.5.conv3.weight": (1024, 256, 1, 1),
    "visual.layer4.0.downsample.1.weight": (2048,),
    "visual.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "visual.layer4.2.bn3.bias": (2048,),
    "visual.attnpool.positional_embedding": (50, 2048),
    "visual.attnpool.q_proj.weight": (2048, 2048),
    "visual.attnpool.k_proj.bias": (2048,),
    "visual.attnpool.v_proj.weight": (2048, 2048),
    "visual.attnpool.c_proj.weight": (1024, 2048),
    "visual.attnpool.c_proj.bias": (1024,),
}


def test_public_key_layout_of_rn50_and_rn101():
    with torch.device("meta"):
        state = public_state_dict(build_clip_resnet(config={"variant": "RN50"}))
        state101 = public_state_dict(build_clip_resnet(config={"variant": "RN101"}))
    for key, shape in KNOWN_RN50_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert "visual.layer1.1.downsample.0.weight" not in state  # only first blocks project
    assert not any(k.startswith("visual.layer4.3.") for k in state)
    # stem: 3 convs + 3 BNs x 4 tensors; 16 bottlenecks x 15; 4 projections x 5; attnpool 9.
    assert len(state) == 15 + 16 * 15 + 4 * 5 + 9
    assert "visual.layer3.22.conv3.weight" in state101
    assert state101["visual.attnpool.c_proj.weight"].shape == (512, 2048)
    assert len(state101) == 15 + 33 * 15 + 4 * 5 + 9


# ----- public checkpoints ------------------------------------------------------------------------
def test_public_safetensors_round_trip(tmp_path):
    bb = tiny().eval()
    x = torch.randn(1, 3, 64, 96)
    ref = bb(x)
    state = public_state_dict(bb)  # no num_batches_tracked, as in OpenAI's files
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(8, 8)
    state["logit_scale"] = torch.tensor(4.6)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "rn.safetensors"))
    again = build_backbone("clip_resnet", source=tmp_path / "rn.safetensors", config=TINY).eval()
    for a, b in zip(ref, again(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(bb.clip_embed(x), again.clip_embed(x), rtol=0, atol=0)

    # OpenAI ships half precision; it loads as float32 with the rounded values.
    half = {k[len("visual.") :]: v.half() for k, v in public_state_dict(bb).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    third = build_clip_resnet(source=tmp_path / "half.safetensors", config=TINY)
    weight = third.visual.layer4[2].conv3.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, bb.visual.layer4[2].conv3.weight.half().float())


def test_mismatching_checkpoint_names_the_keys(tmp_path):
    state = {k: v.contiguous() for k, v in public_state_dict(tiny()).items()}
    save_file(state, str(tmp_path / "rn.safetensors"))
    with pytest.raises(CheckpointError) as err:
        build_backbone(
            "clip_resnet",
            source=tmp_path / "rn.safetensors",
            config={**TINY, "layers": [1, 1, 2, 2]},
        )
    assert "unexpected" in str(err.value) and "visual.layer4.2." in str(err.value)
    with pytest.raises(CheckpointError, match="other shape .*attnpool"):
        build_backbone(
            "clip_resnet", source=tmp_path / "rn.safetensors", config={**TINY, "output_dim": 8}
        )


def test_refuses_pickled_checkpoints(tmp_path):
    (tmp_path / "RN50.pt").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="safetensors"):
        build_clip_resnet(source=tmp_path / "RN50.pt", config=TINY)


def test_tower_without_attnpool_loads_a_full_checkpoint(tmp_path):
    full = tiny().eval()
    save_file(
        {k: v.contiguous() for k, v in public_state_dict(full).items()},
        str(tmp_path / "rn.safetensors"),
    )
    bare = build_clip_resnet(source=tmp_path / "rn.safetensors", config={**TINY, "attnpool": False})
    assert not any("attnpool" in k for k in bare.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bare.eval()(x)[-1], full(x)[-1], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="attnpool"):
        bare.attnpool_forward(full(x)[-1])


# ----- attention pool ----------------------------------------------------------------------------
def test_attnpool_equals_torch_multihead_attention_at_the_pretrained_grid():
    bb = tiny().eval()
    pool = bb.visual.attnpool
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            lin.bias.normal_()
    feats = torch.randn(2, 256, 2, 2)  # layer4 of a 64x64 input: the pretraining grid
    tokens = feats.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.positional_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        tokens,
        tokens,
        tokens,
        256,
        2,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        need_weights=False,
    )
    torch.testing.assert_close(bb.attnpool_forward(feats), expected[0])


def test_attnpool_interpolates_positions_for_other_grids():
    bb = tiny().eval()
    pool = bb.visual.attnpool
    assert pool.position_embedding((2, 2)) is pool.positional_embedding
    with torch.no_grad():
        pool.positional_embedding[1:] = 0.3
    resized = pool.position_embedding((3, 5))
    assert resized.shape == (16, 256)
    torch.testing.assert_close(resized[1:], torch.full((15, 256), 0.3))
    torch.testing.assert_close(resized[0], pool.positional_embedding[0])
    # OS16 layer4 of a 64x96 input is 4x6.
    dilated = tiny(output_stride=16).eval()
    layer4 = dilated.forward_stages(torch.randn(2, 3, 64, 96))
    assert layer4.shape == (2, 256, 4, 6)
    assert dilated.attnpool_forward(layer4).shape == (2, 16)


# ----- stage access, hooks, dilation -------------------------------------------------------------
def test_stages_can_be_run_in_pieces():
    bb = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    full = bb.stage_outputs(x)
    assert list(full) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert full["stem"].shape == (1, 8, 16, 16)
    layer1 = bb.forward_stages(x, stop="layer1")
    torch.testing.assert_close(layer1, full["layer1"], rtol=0, atol=0)
    torch.testing.assert_close(bb.forward_stages(layer1, start="layer2"), full["layer4"])
    torch.testing.assert_close(bb.forward_from("layer1", layer1), full["layer4"])
    torch.testing.assert_close(bb(x)[2], full["layer3"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="comes after"):
        bb.stage_outputs(x, start="layer3", stop="layer1")


def test_stage_hook_is_what_manual_stylisation_computes():
    bb = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    ref = bb(x)

    def stylise(f):  # a FAMix-like per-channel affine change of layer1 statistics
        return f * 1.3 + 0.2

    manual = bb.stage_outputs(stylise(bb.forward_stages(x, stop="layer1")), start="layer2")
    handle = bb.add_stage_hook("layer1", stylise)
    hooked = bb(x)
    handle.remove()
    torch.testing.assert_close(hooked[0], stylise(ref[0]))
    torch.testing.assert_close(hooked[3], manual["layer4"])
    assert not torch.allclose(hooked[3], ref[3])
    torch.testing.assert_close(bb(x)[3], ref[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="hookable"):
        bb.add_stage_hook("stem", stylise)


@pytest.mark.parametrize(
    "stride, pattern, l3, l4",
    [
        (32, "torchvision", [1, 1], [1, 1, 1]),
        (16, "torchvision", [1, 1], [1, 2, 2]),
        (16, "famix", [1, 1], [1, 1, 2]),
        (8, "torchvision", [1, 2], [2, 4, 4]),
        (8, "famix", [1, 2], [1, 2, 4]),
    ],
)
def test_dilation_replaces_the_stride(stride, pattern, l3, l4):
    bb = tiny(output_stride=stride, dilation_pattern=pattern).eval()
    assert [b.conv2.dilation[0] for b in bb.visual.layer3] == l3
    assert [b.conv2.dilation[0] for b in bb.visual.layer4] == l4
    assert bb.out_strides == [4, 8, min(16, stride), stride]
    assert bb.size_divisor == stride
    # The dilated stage's first block no longer pools (anti-aliasing at stride 1).
    first = bb.visual.layer4[0]
    assert isinstance(first.avgpool, torch.nn.AvgPool2d) == (stride == 32)
    assert isinstance(first.down_pool, torch.nn.AvgPool2d) == (stride == 32)
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // s for s in bb.out_strides]
    # Same weights at every output stride: the pretrained checkpoint fits all of them.
    assert {k: v.shape for k, v in bb.state_dict().items()} == {
        k: v.shape for k, v in tiny().state_dict().items()
    }


def test_norm_eval_keeps_batch_norm_statistics():
    bb = tiny(norm_eval=True)
    bb.train()
    assert bb.training
    assert all(not m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bb.visual.layer2[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(bb.visual.layer2[0].bn1.running_mean, before, rtol=0, atol=0)
    plain = tiny()
    plain.train()
    before = plain.visual.layer2[0].bn1.running_mean.clone()
    plain(torch.randn(2, 3, 64, 64))
    assert not torch.equal(plain.visual.layer2[0].bn1.running_mean, before)


def test_no_blocks_so_token_hooks_are_refused():
    bb = tiny()
    assert bb.blocks == [] and bb.block_dims == []
    with pytest.raises(ValueError, match="no transformer blocks"):
        bb.add_block_hook(0, lambda t, hw: t)


def test_unknown_settings_are_config_errors():
    with pytest.raises(ConfigError, match="output_stride"):
        build_clip_resnet(config={**TINY, "output_stride": 4})
    with pytest.raises(ConfigError, match="dilation_pattern"):
        build_clip_resnet(config={**TINY, "dilation_pattern": "all"})
    with pytest.raises(ConfigError, match="RN18"):
        build_clip_resnet(config={"variant": "RN18"})


def test_strided_bottleneck_matches_the_described_computation():
    # 1x1-BN-ReLU, 3x3-BN-ReLU, avgpool 2, 1x1-BN; shortcut avgpool 2, 1x1-BN; add, ReLU.
    bb = tiny().eval()
    block = bb.visual.layer2[0]
    x = torch.randn(1, 32, 16, 16)

    def bn(y, m):
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps)

    y = F.relu(bn(F.conv2d(x, block.conv1.weight), block.bn1))
    y = F.relu(bn(F.conv2d(y, block.conv2.weight, padding=1), block.bn2))
    y = bn(F.conv2d(F.avg_pool2d(y, 2), block.conv3.weight), block.bn3)
    short = bn(F.conv2d(F.avg_pool2d(x, 2), block.downsample[0].weight), block.downsample[1])
    torch.testing.assert_close(block(x), F.relu(y + short))
