import math

import pytest
import torch
from safetensors.torch import save_file

from pivotseg.backbones import build_backbone
from pivotseg.backbones.eva02 import (
    apply_rope,
    build_eva02,
    public_state_dict,
    resize_grid,
    rope_angles,
)
from pivotseg.errors import CheckpointError, ConfigError
from tests.backbone_tester import BackboneTester

TINY = dict(
    width=32,
    depth=4,
    heads=2,
    patch_size=14,
    image_size=56,
    rope_pt_seq_len=4,
    embed_dim=16,
)


class TestEva02(BackboneTester):
    name = "eva02"
    tiny_config = TINY
    sizes = ((56, 56), (42, 70))


class TestEva02MimStyle(BackboneTester):
    # MIM towers: patch 16, no attention sub-LN, no CLIP head; here also without q/v biases.
    name = "eva02"
    tiny_config = {
        **TINY,
        "variant": "mim_l16",
        "patch_size": 16,
        "image_size": 64,
        "qkv_bias": False,
    }


def tiny(**kw):
    return build_eva02(config={**TINY, **kw})


def randomize_norms(bb):
    # LayerNorms start at (1, 0); random values make layout mistakes visible in outputs.
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return bb


# ----- sizes and the public key layout -----------------------------------------------------------
def vit_params(width, depth, hidden, patch, grid, embed, attn_norm=True, head=True):
    """Hand count of an EVA-02 tower from the architecture description."""
    per_block = (
        2 * width  # norm1
        + 3 * width * width  # q, k, v projections (no bias)
        + 2 * width  # q_bias, v_bias
        + (2 * width if attn_norm else 0)  # inner_attn_ln
        + width * width
        + width  # proj
        + 2 * width  # norm2
        + 2 * (width * hidden + hidden)  # w1, w2
        + 2 * hidden  # ffn_ln
        + hidden * width
        + width  # w3
    )
    stem = 3 * patch * patch * width + width + width + (1 + grid * grid) * width
    tail = 2 * width + width * embed + embed if head else 0
    return stem + depth * per_block + tail


def test_published_sizes_on_meta_device():
    with torch.device("meta"):
        large = build_eva02(config={"variant": "clip_l14"})
        base = build_eva02(config={"variant": "clip_b16"})
        mim = build_eva02(config={"variant": "mim_l16"})
    n_large = sum(p.numel() for p in large.parameters())
    assert n_large == vit_params(1024, 24, 2730, 14, 16, 768)
    assert abs(n_large - 304e6) < 0.01 * 304e6  # EVA02-CLIP-L/14 image tower: 304M
    n_base = sum(p.numel() for p in base.parameters())
    assert n_base == vit_params(768, 12, 2048, 16, 14, 512)
    assert abs(n_base - 86e6) < 0.01 * 86e6  # EVA02-CLIP-B/16 image tower: 86M
    n_mim = sum(p.numel() for p in mim.parameters())
    assert n_mim == vit_params(1024, 24, 2730, 16, 14, 0, attn_norm=False, head=False)
    assert abs(n_mim - 304e6) < 0.01 * 304e6  # EVA02-L: 304M


KNOWN_L14_KEYS = {
    "visual.cls_token": (1, 1, 1024),
    "visual.pos_embed": (1, 257, 1024),
    "visual.patch_embed.proj.weight": (1024, 3, 14, 14),
    "visual.patch_embed.proj.bias": (1024,),
    "visual.rope.freqs_cos": (256, 64),
    "visual.rope.freqs_sin": (256, 64),
    "visual.blocks.0.norm1.weight": (1024,),
    "visual.blocks.0.attn.q_proj.weight": (1024, 1024),
    "visual.blocks.0.attn.k_proj.weight": (1024, 1024),
    "visual.blocks.0.attn.v_proj.weight": (1024, 1024),
    "visual.blocks.0.attn.q_bias": (1024,),
    "visual.blocks.0.attn.v_bias": (1024,),
    "visual.blocks.0.attn.inner_attn_ln.weight": (1024,),
    "visual.blocks.0.attn.inner_attn_ln.bias": (1024,),
    "visual.blocks.0.attn.proj.weight": (1024, 1024),
    "visual.blocks.0.attn.proj.bias": (1024,),
    "visual.blocks.0.attn.rope.freqs_cos": (256, 64),
    "visual.blocks.0.norm2.bias": (1024,),
    "visual.blocks.0.mlp.w1.weight": (2730, 1024),
    "visual.blocks.0.mlp.w2.bias": (2730,),
    "visual.blocks.0.mlp.ffn_ln.weight": (2730,),
    "visual.blocks.0.mlp.w3.weight": (1024, 2730),
    "visual.blocks.12.attn.q_proj.weight": (1024, 1024),
    "visual.blocks.23.attn.rope.freqs_sin": (256, 64),
    "visual.blocks.23.mlp.w3.weight": (1024, 2730),
    "visual.blocks.23.mlp.w3.bias": (1024,),
    "visual.norm.weight": (1024,),
    "visual.norm.bias": (1024,),
    "visual.head.weight": (768, 1024),
    "visual.head.bias": (768,),
}


def test_public_key_layout_of_eva02_clip_l14():
    with torch.device("meta"):
        bb = build_eva02(config={"variant": "clip_l14"})
    state = public_state_dict(bb)
    for key, shape in KNOWN_L14_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # k has no bias and nothing beyond 24 blocks exists.
    assert "visual.blocks.0.attn.k_bias" not in state
    assert not any(k.startswith("visual.blocks.24.") for k in state)
    # cls, pos, patch w/b + 2 rope buffers; per block 23 tensors (incl. 2 rope); norm + head.
    assert len(state) == 4 + 2 + 24 * 23 + 4
    assert all(k.startswith("visual.") for k in state)


def test_mim_layout_has_no_attention_sub_ln_nor_clip_head():
    with torch.device("meta"):
        keys = set(public_state_dict(build_eva02(config={"variant": "mim_l16"})))
    assert "visual.blocks.0.mlp.ffn_ln.weight" in keys
    assert not any("inner_attn_ln" in k for k in keys)
    assert not any(k.startswith(("visual.head.", "visual.norm.")) for k in keys)


# ----- public checkpoints ------------------------------------------------------------------------
def test_public_safetensors_round_trip(tmp_path):
    bb = randomize_norms(tiny()).eval()
    x = torch.randn(1, 3, 42, 70)
    ref = bb(x)
    state = public_state_dict(bb)
    # A whole EVA-CLIP checkpoint also holds the text tower and the logit scale.
    state["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(8, 8)
    state["logit_scale"] = torch.tensor(4.6)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "eva.safetensors"))
    again = build_backbone("eva02", source=tmp_path / "eva.safetensors", config=TINY).eval()
    for a, b in zip(ref, again(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(bb.clip_embed(x), again.clip_embed(x), rtol=0, atol=0)

    # The bare tower layout (no ``visual.`` prefix, as in MIM checkpoints) loads too.
    bare = {k[len("visual.") :]: v for k, v in public_state_dict(bb).items()}
    bare["mask_token"] = torch.zeros(1, 1, 32)
    save_file({k: v.contiguous() for k, v in bare.items()}, str(tmp_path / "bare.safetensors"))
    third = build_backbone("eva02", source=tmp_path / "bare.safetensors", config=TINY).eval()
    torch.testing.assert_close(third(x)[-1], ref[-1], rtol=0, atol=0)


def test_mismatching_checkpoint_names_the_keys(tmp_path):
    state = {k: v.contiguous() for k, v in public_state_dict(tiny()).items()}
    save_file(state, str(tmp_path / "eva.safetensors"))
    with pytest.raises(CheckpointError) as err:
        build_backbone("eva02", source=tmp_path / "eva.safetensors", config={**TINY, "depth": 3})
    assert "unexpected" in str(err.value) and "visual.blocks.3." in str(err.value)
    with pytest.raises(CheckpointError) as err:
        build_backbone("eva02", source=tmp_path / "eva.safetensors", config={**TINY, "width": 48})
    assert "other shape" in str(err.value)
    del state["visual.blocks.1.mlp.w3.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="missing .*visual.blocks.1.mlp.w3.weight"):
        build_backbone("eva02", source=tmp_path / "cut.safetensors", config=TINY)


def test_refuses_pickled_checkpoints(tmp_path):
    (tmp_path / "eva.pt").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="safetensors"):
        build_eva02(source=tmp_path / "eva.pt", config=TINY)


def test_checkpoint_rope_buffers_must_match_the_config(tmp_path):
    state = public_state_dict(tiny())
    wrong = rope_angles((4, 4), 16, pt_seq_len=8)  # as if pretrained on another grid
    state["visual.rope.freqs_cos"], state["visual.rope.freqs_sin"] = wrong.cos(), wrong.sin()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "eva.safetensors"))
    with pytest.raises(CheckpointError, match="visual.rope.freqs_cos"):
        build_eva02(source=tmp_path / "eva.safetensors", config=TINY)


def test_patch14_checkpoint_loads_at_patch16(tmp_path):
    bb = tiny()
    with torch.no_grad():
        bb.visual.patch_embed.proj.weight.fill_(0.5)
    state = {k: v.contiguous() for k, v in public_state_dict(bb).items()}
    save_file(state, str(tmp_path / "p14.safetensors"))
    p16 = build_eva02(
        source=tmp_path / "p14.safetensors", config={**TINY, "patch_size": 16, "image_size": 64}
    ).eval()
    kernel = p16.visual.patch_embed.proj.weight
    assert kernel.shape == (32, 3, 16, 16)
    # A constant kernel stays constant under bicubic resizing.
    torch.testing.assert_close(kernel, torch.full_like(kernel, 0.5))
    assert p16.visual.pos_embed.shape == (1, 1 + 16, 32)
    assert p16(torch.randn(1, 3, 64, 64))[-1].shape == (1, 32, 4, 4)


# ----- RoPE --------------------------------------------------------------------------------------
def test_rope_angles_match_the_formula_at_the_pretrained_grid():
    # head_dim 8: per axis 4 channels = 2 frequency pairs, theta^(-0/4) = 1, theta^(-2/4) = 0.01.
    angles = rope_angles((3, 3), head_dim=8, pt_seq_len=3, theta=10000.0)
    for r in range(3):
        for c in range(3):
            expected = [r, r, 0.01 * r, 0.01 * r, c, c, 0.01 * c, 0.01 * c]
            torch.testing.assert_close(angles[r * 3 + c], torch.tensor(expected))
    # Interpolated positions: a 2x4 grid spans a pretraining grid of 4 (rows 0, 2; cols 0..3).
    angles = rope_angles((2, 4), head_dim=8, pt_seq_len=4, theta=10000.0)
    torch.testing.assert_close(
        angles[1 * 4 + 3], torch.tensor([2, 2, 0.02, 0.02, 3, 3, 0.03, 0.03])
    )
    plain = rope_angles((2, 4), head_dim=8, pt_seq_len=4, interpolate=False)
    torch.testing.assert_close(plain[1 * 4 + 3], torch.tensor([1, 1, 0.01, 0.01, 3, 3, 0.03, 0.03]))


def test_apply_rope_is_a_complex_rotation_of_channel_pairs():
    x = torch.randn(2, 3, 12, 16)
    angles = rope_angles((3, 4), 16, pt_seq_len=3)
    rotated = apply_rope(x, angles.cos(), angles.sin())
    as_complex = torch.view_as_complex(x.reshape(2, 3, 12, 8, 2).contiguous())
    turn = torch.polar(torch.ones(12, 8), angles[:, ::2])
    expected = torch.view_as_real(as_complex * turn).reshape(2, 3, 12, 16)
    torch.testing.assert_close(rotated, expected)


def test_rope_scores_depend_only_on_relative_grid_offsets():
    torch.manual_seed(1)
    grid, dim = (6, 7), 16
    angles = rope_angles(grid, dim, pt_seq_len=6)  # interpolated: positions affine in the index
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(dim), torch.randn(dim)

    def score(pq, pk):
        iq, ik = pq[0] * grid[1] + pq[1], pk[0] * grid[1] + pk[1]
        rq = apply_rope(q[None], cos[iq : iq + 1], sin[iq : iq + 1])[0]
        rk = apply_rope(k[None], cos[ik : ik + 1], sin[ik : ik + 1])[0]
        return (rq @ rk).item()

    base = score((1, 2), (3, 1))
    for shift in [(1, 0), (0, 3), (2, 4), (-1, 1)]:
        moved = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 1 + shift[1]))
        assert math.isclose(moved, base, rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(score((1, 2), (4, 1)), base, rel_tol=1e-3)  # positions do matter


def test_attention_without_rope_equals_torch_multihead_attention():
    # Independent check of the q/k/v + (q, v)-bias layout against torch's own attention.
    bb = tiny(attn_norm=False)
    attn = bb.visual.blocks[0].attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        )
        mha.in_proj_bias.copy_(torch.cat([attn.q_bias, torch.zeros(32), attn.v_bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(attn(x, None), mha(x, x, x, need_weights=False)[0])


def test_attention_rotates_patch_tokens_only():
    # Hand computation: complex rotation of the 16 patch tokens, explicit softmax attention.
    bb = tiny(attn_norm=False)
    attn = bb.visual.blocks[0].attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(1, 17, 32)
    heads = lambda t: t.view(1, 17, 2, 16).transpose(1, 2)  # noqa: E731
    q = heads(torch.nn.functional.linear(x, attn.q_proj.weight, attn.q_bias))
    k = heads(torch.nn.functional.linear(x, attn.k_proj.weight))
    v = heads(torch.nn.functional.linear(x, attn.v_proj.weight, attn.v_bias))
    turn = torch.polar(torch.ones(16, 8), rope_angles((4, 4), 16, pt_seq_len=4)[:, ::2])

    def rotate_patches(t):
        z = torch.view_as_complex(t[:, :, 1:].reshape(1, 2, 16, 8, 2).contiguous()) * turn
        return torch.cat([t[:, :, :1], torch.view_as_real(z).reshape(1, 2, 16, 16)], dim=2)

    scores = rotate_patches(q) @ rotate_patches(k).transpose(-1, -2) / 4.0  # sqrt(head dim)
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 17, 32))
    rope = bb.visual.rope((4, 4), x.device, x.dtype)
    torch.testing.assert_close(attn(x, rope), expected)
    assert not torch.allclose(attn(x, None), expected, atol=1e-4)  # the rotation mattered


# ----- position embedding, drop path, checkpointing, CLIP head ----------------------------------
def test_position_embedding_resizes_only_off_the_pretrained_grid():
    bb = tiny()
    assert bb.visual.position_embedding((4, 4)) is bb.visual.pos_embed
    resized = bb.visual.position_embedding((3, 5))
    assert resized.shape == (1, 1 + 15, 32)
    torch.testing.assert_close(resized[:, :1], bb.visual.pos_embed[:, :1])
    constant = torch.full((1, 16, 32), 0.25)
    torch.testing.assert_close(resize_grid(constant, (6, 2)), torch.full((1, 12, 32), 0.25))


def test_drop_path_is_linear_and_active_only_in_training():
    bb = tiny(drop_path_rate=0.6)
    rates = [b.drop_path.p for b in bb.visual.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.tensor([0.0, 0.2, 0.4, 0.6]))
    x = torch.randn(4, 3, 56, 56)
    bb.train()
    torch.manual_seed(0)
    a = bb(x)[-1]
    b = bb(x)[-1]
    assert not torch.allclose(a, b)
    bb.eval()
    torch.testing.assert_close(bb(x)[-1], bb(x)[-1], rtol=0, atol=0)
    bb.freeze()
    bb.train()  # frozen backbones stay in eval mode: no drop path
    torch.testing.assert_close(bb(x)[-1], bb(x)[-1], rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    plain = tiny().train()
    ckpt = tiny(grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 56, 56)
    calls = []
    ckpt.visual.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    ckpt.add_block_hook(1, lambda t, hw: t * 1.5)
    plain.add_block_hook(1, lambda t, hw: t * 1.5)
    out_plain = sum(f.square().mean() for f in plain(x))
    out_ckpt = sum(f.square().mean() for f in ckpt(x))
    out_plain.backward()
    out_ckpt.backward()
    torch.testing.assert_close(out_plain, out_ckpt)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert len(calls) == 2  # the block ran in the forward and again in the backward


def test_clip_embedding_and_head_switch():
    bb = tiny().eval()
    assert bb.clip_embed(torch.randn(2, 3, 56, 56)).shape == (2, 16)
    no_head = tiny(clip_head=False).eval()
    assert not any(k.startswith(("visual.head", "visual.norm")) for k in no_head.state_dict())
    with pytest.raises(ConfigError, match="clip_head"):
        no_head.clip_embed(torch.randn(1, 3, 56, 56))


def test_headless_tower_accepts_a_full_clip_checkpoint(tmp_path):
    full = tiny()
    save_file(
        {k: v.contiguous() for k, v in public_state_dict(full).items()},
        str(tmp_path / "eva.safetensors"),
    )
    headless = build_eva02(source=tmp_path / "eva.safetensors", config={**TINY, "clip_head": False})
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(headless.eval()(x)[-1], full.eval()(x)[-1], rtol=0, atol=0)


def test_unknown_settings_are_config_errors():
    with pytest.raises(ConfigError, match="variant"):
        build_eva02(config={"variant": "huge"})
    with pytest.raises(ConfigError, match="widht"):
        build_eva02(config={**TINY, "widht": 8})


def test_block_matches_the_described_computation():
    # Pre-LN residuals; FFN = w3(ffn_ln(silu(w1 h) * w2 h)).
    bb = randomize_norms(tiny())
    block = bb.visual.blocks[2]
    x = torch.randn(2, 17, 32)
    rope = bb.visual.rope((4, 4), x.device, x.dtype)
    mid = x + block.attn(block.norm1(x), rope)
    h = block.norm2(mid)
    mlp = block.mlp
    ffn = mlp.w3(mlp.ffn_ln(torch.nn.functional.silu(mlp.w1(h)) * mlp.w2(h)))
    torch.testing.assert_close(block(x, rope), mid + ffn)
    # The sub-LN sits inside the FFN: a hidden-width LayerNorm.
    assert mlp.ffn_ln.normalized_shape == (85,)
    assert bb.visual.blocks[0].attn.inner_attn_ln.normalized_shape == (32,)
