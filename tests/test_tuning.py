"""Tuning methods on tiny random backbones: what trains, what stays fixed, what the hooks do."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pivotseg.backbones.base import Backbone
from pivotseg.backbones.dinov2 import build_dinov2
from pivotseg.errors import ConfigError
from pivotseg.tuning import METHODS, build_method
from tests.helpers import DPFT_ALL_ON

TINY_DINO = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=28,
    patch_size=14,
)
TINY_TINYVIT = dict(
    embed_dims=[8, 16, 24, 32],
    depths=[1, 1, 2, 1],
    num_heads=[1, 2, 2, 2],
    window_sizes=[7, 7, 7, 7],
    neck_dim=16,
)
NUM_CLASSES = 3


def tiny_dinov2(**kw):
    return build_dinov2(config=dict(TINY_DINO), **kw)


def tiny_tinyvit():
    tinyvit = pytest.importorskip("pivotseg.backbones.tinyvit")
    return tinyvit.build_tinyvit(config=copy.deepcopy(TINY_TINYVIT))


BACKBONES = {"dinov2": (tiny_dinov2, 56), "tinyvit": (tiny_tinyvit, 64)}


def images(size, batch=2):
    return torch.randn(batch, 3, size, size)


def trainable_names(method):
    return {n for n, _ in method.trainable_parameters()}


def grad_flags(backbone, method):
    """Names that require grad, read from the modules themselves (not from the method)."""
    names = {"backbone." + n for n, p in backbone.named_parameters() if p.requires_grad}
    return names | {"tuning." + n for n, p in method.named_parameters() if p.requires_grad}


def first_rule(name, rules):
    return next((opts for key, opts in rules if key in name), None)


def expected_trainable(method_name, backbone):
    """The parameter names each method must train, written out from the method definitions
    (``dpft_all_on``: DPFT with every mechanism switched on)."""
    all_on = method_name == "dpft_all_on"
    method_name = "dpft" if all_on else method_name
    n = backbone.num_blocks
    widths = list(dict.fromkeys(backbone.block_dims))
    if method_name == "frozen":
        return set()
    if method_name == "full":
        unused = {"model.layernorm.weight", "model.layernorm.bias", "model.embeddings.mask_token"}
        if backbone.name == "tinyvit":
            unused = set()  # the default levels include the neck, so every parameter is used
        return {"backbone." + k for k, _ in backbone.named_parameters() if k not in unused}
    if method_name == "lora":
        if backbone.name == "dinov2":
            mods = [f"model.encoder.layer.{i}.attention.{p}" for i in range(n) for p in "qv"]
            mods = [m.replace(".q", ".q_proj").replace(".v", ".v_proj") for m in mods]
        else:  # TinyViT: one fused projection per attention block
            mods = [k for k, _ in backbone.named_modules() if k.endswith("attn.qkv")]
            assert len(mods) == n
        return {f"backbone.{m}.lora_{ab}.default.weight" for m in mods for ab in "AB"}
    blocks = range(n)
    if method_name == "dpft":  # its default: the deepest ceil(0.6 n) blocks
        blocks = range(n - math.ceil(0.6 * n), n)
        widths = list(dict.fromkeys(backbone.block_dims[i] for i in blocks))
    names = {f"tuning.tokens_{ab}.{i}" for i in range(len(blocks)) for ab in "ab"}
    for c in widths:
        for layer in ("mlp_token2feat", "mlp_delta_f", "transform"):
            names |= {f"tuning.{layer}.{c}.weight", f"tuning.{layer}.{c}.bias"}
    names |= {"tuning.merge.weight", "tuning.merge.bias"}
    if method_name == "rein":
        return names | {"tuning.scale"}
    for c in widths:
        names |= {f"tuning.attn_q.{c}.weight", f"tuning.attn_k.{c}.weight"}
    names |= {"tuning.gamma"}
    if not all_on:  # the defaults: no U(z), no presence gate
        return names
    for c in widths:
        names |= {f"tuning.context.{c}.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    return names | {"tuning.presence_scale", "tuning.presence_bias"}


# FAMix needs a mined style bank; tests/test_famix.py covers it. DPFT's mechanisms are off by
# default: "dpft_all_on" is DPFT with every one switched on.
DG_METHODS = [m for m in METHODS if m != "famix"] + ["dpft_all_on"]
CASES = [(m, b) for m in DG_METHODS for b in BACKBONES]


def build_case(case, backbone, **args):
    if case == "dpft_all_on":
        return build_method("dpft", backbone, NUM_CLASSES, **DPFT_ALL_ON, **args)
    return build_method(case, backbone, NUM_CLASSES, **args)


@pytest.mark.parametrize("method_name,backbone_name", CASES)
def test_trains_exactly_what_it_claims(method_name, backbone_name):
    make, _ = BACKBONES[backbone_name]
    backbone = make()
    method = build_case(method_name, backbone)
    claimed = trainable_names(method)
    assert claimed == expected_trainable(method_name, backbone)
    assert grad_flags(backbone, method) == claimed
    config = json.loads(json.dumps(method.config()))  # saved in the segmenter's JSON config
    rebuilt = build_method(method.name, make(), NUM_CLASSES, **config)
    assert {k: p.shape for k, p in rebuilt.trainable_parameters()} == {
        k: p.shape for k, p in method.trainable_parameters()
    }
    if method_name != "full":
        backbone.train()
        assert all(not m.training for m in backbone.modules() if m is not backbone)


@pytest.mark.parametrize("method_name,backbone_name", CASES)
def test_optimiser_moves_only_trainable_parameters(method_name, backbone_name):
    make, size = BACKBONES[backbone_name]
    backbone = make()
    # DPFT's calibrated gate acts on a class once it has been seen present and absent, which
    # three steps on stripes never show; uncalibrated, it gates every class with a pivot.
    args = {"presence_calibration": False} if method_name.startswith("dpft") else {}
    method = build_case(method_name, backbone, **args)
    if method_name == "frozen":
        return
    backbone.train()
    method.train()
    everything = {"backbone." + k: p for k, p in backbone.named_parameters()}
    everything |= {"tuning." + k: p for k, p in method.named_parameters()}
    before = {k: v.detach().clone() for k, v in everything.items()}
    opt = torch.optim.SGD(list(everything.values()), lr=0.5)
    x = images(size)
    targets = [torch.randn_like(f) for f in backbone(x)]
    stripes = (torch.arange(size) // 16).clamp(max=NUM_CLASSES - 1)  # whole patches per class
    labels = stripes.expand(2, size, size).clone()
    for _ in range(3):
        opt.zero_grad()
        loss = sum(F.mse_loss(f, t) for f, t in zip(backbone(x), targets))
        q = method.queries()
        if q is not None:
            loss = loss + q.pow(2).mean()
        loss = loss + sum(method.extra_loss(labels).values())
        loss.backward()
        opt.step()
    claimed = trainable_names(method)
    for name, param in everything.items():
        if name in claimed:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed"


@pytest.mark.parametrize("method_name,backbone_name", CASES)
def test_attaching_changes_output_only_through_the_method(method_name, backbone_name):
    make, size = BACKBONES[backbone_name]
    backbone = make().eval()
    x = images(size, batch=1)
    ref = backbone(x)
    method = build_case(method_name, backbone).eval()
    if method_name == "lora":
        for k, p in backbone.named_parameters():
            if "lora_B" in k:
                torch.nn.init.normal_(p)
    out = backbone(x)
    changed = any((a - b).abs().max() > 1e-7 for a, b in zip(out, ref))
    assert changed == (method_name in ("lora", "rein", "dpft", "dpft_all_on"))
    assert method.config() == dict(method._args)
    if method_name in ("rein", "dpft", "dpft_all_on"):
        method.remove_hooks()
        for a, b in zip(backbone(x), ref):
            torch.testing.assert_close(a, b)


def test_rein_update_matches_the_released_formula():
    backbone = tiny_dinov2().eval()
    seen = {}
    backbone.add_block_hook(1, lambda t, hw: seen.setdefault("in", t))  # runs before Rein's
    rein = build_method("rein", backbone, NUM_CLASSES)
    with torch.no_grad():
        rein.scale.fill_(0.7)
    backbone.add_block_hook(1, lambda t, hw: seen.setdefault("out", t))
    backbone(images(56, batch=1))
    f = seen["in"][0]  # (N, c)
    tokens = rein.tokens_a[1] @ rein.tokens_b[1]
    # Rein's reins.py (LoRAReins), written here with einsum on (n, c) features.
    attn = torch.softmax(torch.einsum("nc,mc->nm", f, tokens) * 32**-0.5, dim=-1)
    delta = torch.einsum("nm,mc->nc", attn[:, 1:], rein.mlp_token2feat["32"](tokens[1:]))
    expected = f + 0.7 * rein.mlp_delta_f["32"](delta + f)
    torch.testing.assert_close(seen["out"][0], expected)


def test_rein_queries_pool_layers_like_the_release():
    backbone = tiny_dinov2()
    rein = build_method("rein", backbone, NUM_CLASSES, query_dim=8)
    tokens = torch.stack([rein.tokens_a[i] @ rein.tokens_b[i] for i in range(4)])  # (L, m, c)
    t = rein.transform["32"](tokens).permute(1, 2, 0)  # (m, q, L)
    pooled = torch.cat(
        [F.max_pool1d(t, kernel_size=4), F.avg_pool1d(t, kernel_size=4), t[:, :, -1:]], dim=-1
    )
    expected = rein.merge(pooled.flatten(-2, -1))
    torch.testing.assert_close(rein.queries(), expected)
    assert rein.queries().shape == (100, 8) and rein.num_queries == 100
    assert build_method("rein", tiny_dinov2(), 3, link_queries=False).queries() is None


def test_rein_trainable_count_dinov2_large_on_meta():
    with torch.device("meta"):
        backbone = build_dinov2(config={"variant": "large"})
        rein = build_method("rein", backbone, 19)
    counts = {n: p.numel() for n, p in rein.trainable_parameters()}
    assert sum(counts.values()) == 2_990_081
    assert sum(v for k, v in counts.items() if "tokens_a" in k) == 24 * 100 * 16
    assert sum(v for k, v in counts.items() if "tokens_b" in k) == 24 * 16 * 1024
    assert counts["tuning.merge.weight"] + counts["tuning.merge.bias"] == 768 * 256 + 256


def test_rein_hierarchical_shares_modules_per_width():
    backbone = tiny_tinyvit()
    rein = build_method("rein", backbone, NUM_CLASSES)
    assert sorted(rein.mlp_token2feat.keys()) == ["16", "24", "32"]
    for i, c in enumerate(backbone.block_dims):
        assert rein.tokens_b[i].shape == (16, c)
    assert rein.queries().shape == (100, 256)


def test_rein_rules_and_state_round_trip(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path / "bb")
    backbone = build_dinov2(tmp_path / "bb").eval()
    rein = build_method("rein", backbone, NUM_CLASSES)
    rules = rein.param_group_rules()
    assert first_rule("tuning.tokens_a.3", rules) == {"lr_mult": 1.0, "decay_mult": 0.0}
    assert first_rule("tuning.scale", rules)["decay_mult"] == 0.0
    assert first_rule("tuning.mlp_delta_f.32.weight", rules) is None  # default decay
    x = images(56, batch=1)
    ref = backbone(x)[-1]
    save_file({k: v.detach() for k, v in rein.state_dict().items()}, tmp_path / "t.safetensors")
    again_backbone = build_dinov2(tmp_path / "bb").eval()
    again = build_method("rein", again_backbone, NUM_CLASSES)
    again.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    torch.testing.assert_close(again_backbone(x)[-1], ref)


class NoBlocks(Backbone):
    name = "convnet"

    @property
    def blocks(self):
        return []

    @property
    def block_dims(self):
        return []


@pytest.mark.parametrize("method_name", ["rein", "dpft", "lora"])
def test_methods_needing_blocks_refuse_backbones_without(method_name):
    with pytest.raises(ConfigError, match="needs transformer blocks; convnet has none"):
        build_method(method_name, NoBlocks(), NUM_CLASSES)


def test_build_method_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="unknown tuning method 'reins'"):
        build_method("reins", tiny_dinov2(), 3)
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        build_method("rein", tiny_dinov2(), 3, rnk=4)


# ----- full ---------------------------------------------------------------------------------


def test_full_recipe_rules_and_layer_decay():
    backbone = tiny_dinov2()
    full = build_method("full", backbone, NUM_CLASSES)
    rules = full.param_group_rules()
    prefix = "backbone.model."
    no_decay = {"lr_mult": 0.1, "decay_mult": 0.0}
    for name in (
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "encoder.layer.2.norm1.weight",
        "encoder.layer.2.norm2.bias",
    ):
        assert first_rule(prefix + name, rules) == no_decay, name
    for name in ("encoder.layer.2.attention.q_proj.weight", "encoder.layer.3.mlp.fc1.bias"):
        assert first_rule(prefix + name, rules) == {"lr_mult": 0.1, "decay_mult": 1.0}

    decayed = build_method("full", tiny_dinov2(), NUM_CLASSES, layer_decay=0.5)
    rules = decayed.param_group_rules()
    for i in range(4):  # block i of L = 4: 0.1 * 0.5 ** (4 - i)
        got = first_rule(f"{prefix}encoder.layer.{i}.mlp.fc2.weight", rules)
        assert math.isclose(got["lr_mult"], 0.1 * 0.5 ** (4 - i))
        assert got["decay_mult"] == 1.0
    stem = first_rule(f"{prefix}embeddings.patch_embeddings.projection.weight", rules)
    assert math.isclose(stem["lr_mult"], 0.1 * 0.5**5)
    assert first_rule(f"{prefix}embeddings.cls_token", rules)["decay_mult"] == 0.0


def test_full_leaves_blocks_after_the_last_output_frozen():
    backbone = tiny_dinov2(out_indices=[0, 1])
    full = build_method("full", backbone, NUM_CLASSES)
    names = trainable_names(full)
    assert any(".layer.1." in n for n in names)
    assert not any(".layer.2." in n or ".layer.3." in n for n in names)
    frozen = tiny_dinov2().freeze()
    with pytest.raises(ConfigError, match="frozen backbone"):
        build_method("full", frozen, NUM_CLASSES)


# ----- lora ---------------------------------------------------------------------------------


def test_lora_finds_projections_and_counts_parameters():
    backbone = tiny_dinov2()
    lora = build_method("lora", backbone, NUM_CLASSES, rank=4)
    assert lora.module_names == [
        f"model.encoder.layer.{i}.attention.{p}" for i in range(4) for p in ("q_proj", "v_proj")
    ]
    total = sum(p.numel() for _, p in lora.trainable_parameters())
    assert total == 4 * 2 * 4 * (32 + 32)  # layers x projections x r x (in + out)
    qkv = build_method("lora", tiny_dinov2(), NUM_CLASSES, rank=2, targets=["q", "k", "v"])
    assert sum(p.numel() for _, p in qkv.trainable_parameters()) == 4 * 3 * 2 * 64
    explicit = build_method("lora", tiny_dinov2(), 3, rank=2, target_modules=["fc1"])
    assert sum(p.numel() for _, p in explicit.trainable_parameters()) == 4 * 2 * (32 + 128)
    with pytest.raises(ConfigError, match="unknown targets"):
        build_method("lora", tiny_dinov2(), 3, targets=["query"])


def test_lora_fused_qkv_on_tinyvit():
    backbone = tiny_tinyvit()
    lora = build_method("lora", backbone, NUM_CLASSES, rank=2)
    assert all(n.endswith("attn.qkv") for n in lora.module_names)
    expected = sum(2 * (c + 3 * c) for c in backbone.block_dims)
    assert sum(p.numel() for _, p in lora.trainable_parameters()) == expected


def test_lora_tensors_save_and_load_alone(tmp_path):
    source = tiny_dinov2()
    source.save_pretrained(tmp_path / "bb")
    backbone = build_dinov2(tmp_path / "bb").eval()
    lora = build_method("lora", backbone, NUM_CLASSES, rank=4)
    for _, p in lora.trainable_parameters():
        torch.nn.init.normal_(p)
    x = images(56, batch=1)
    ref = backbone(x)
    state = {k: p.detach() for k, p in lora.trainable_parameters()}
    save_file(state, tmp_path / "lora.safetensors")
    assert len(state) == 16 and all("lora_" in k for k in state)

    fresh = build_dinov2(tmp_path / "bb").eval()
    build_method("lora", fresh, NUM_CLASSES, rank=4)
    loaded = {
        k.removeprefix("backbone."): v for k, v in load_file(tmp_path / "lora.safetensors").items()
    }
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    for a, b in zip(fresh(x), ref):
        torch.testing.assert_close(a, b)
    # Block hooks still see and rewrite the adapted blocks' tokens.
    handle = fresh.add_block_hook(0, lambda t, hw: t + 1.0)
    assert not torch.allclose(fresh(x)[-1], ref[-1])
    handle.remove()


def test_lora_dropout_follows_the_method_mode():
    backbone = tiny_dinov2()
    lora = build_method("lora", backbone, NUM_CLASSES, rank=4, dropout=0.5)
    for _, p in lora.trainable_parameters():
        torch.nn.init.normal_(p)
    x = images(56, batch=1)
    backbone.train()
    lora.train()
    assert not torch.equal(backbone(x)[-1], backbone(x)[-1])
    lora.eval()
    torch.testing.assert_close(backbone(x)[-1], backbone(x)[-1])


class ToyViT(Backbone):
    """Two attention-like blocks; ``bypass`` makes them use q_proj's weight via F.linear."""

    name = "toyvit"
    patch_size = size_divisor = 8

    def __init__(self, bypass: bool):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 8, 8)
        self.layers = torch.nn.ModuleList(ToyBlock(bypass) for _ in range(2))

    @property
    def blocks(self):
        return list(self.layers)

    @property
    def block_dims(self):
        return [16, 16]

    def block_strides(self):
        return [8, 8]

    def _split_block_output(self, index, output):
        return output, self._hw, lambda t: t

    def forward_blocks(self, pixel_values, indices):
        x = self.embed(pixel_values)
        self._hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        maps = []
        for blk in self.layers:
            x = blk(x)
            maps.append(x.transpose(1, 2).reshape(x.shape[0], 16, *self._hw))
        return [maps[i] for i in indices]


class ToyBlock(torch.nn.Module):
    def __init__(self, bypass: bool):
        super().__init__()
        self.bypass = bypass
        self.q_proj = torch.nn.Linear(16, 16)
        self.v_proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        if self.bypass:
            return x + F.linear(x, self.q_proj.weight) * F.linear(x, self.v_proj.weight)
        return x + self.q_proj(x) * self.v_proj(x)


def test_lora_refuses_models_that_bypass_the_adapted_modules():
    lora = build_method("lora", ToyViT(bypass=False), NUM_CLASSES, rank=2)
    assert lora.module_names == [f"layers.{i}.{p}_proj" for i in range(2) for p in "qv"]
    with pytest.raises(ConfigError, match="toyvit's forward bypasses the adapted layers"):
        build_method("lora", ToyViT(bypass=True), NUM_CLASSES)


def test_lora_adapts_only_blocks_that_run():
    lora = build_method("lora", tiny_dinov2(out_indices=[0, 1]), NUM_CLASSES, rank=2)
    assert [n.split(".")[3] for n in lora.module_names] == ["0", "0", "1", "1"]
