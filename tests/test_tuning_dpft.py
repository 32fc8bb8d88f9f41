"""DPFT: budget, ablation switches, presence, set pivots and the pivot loss (hand-made numbers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pivotseg.backbones.dinov2 import build_dinov2
from pivotseg.errors import ConfigError
from pivotseg.tuning import build_method
from pivotseg.tuning.dpft import INGREDIENTS
from pivotseg.tuning.pivots import PivotBank, class_pool, patch_classes, pivot_info_nce
from tests.helpers import DPFT_ALL_ON
from tests.test_tuning import TINY_DINO, tiny_tinyvit

K = 3
OFF = dict.fromkeys(INGREDIENTS, False)


@pytest.fixture
def saved_backbone(tmp_path):
    build_dinov2(config=dict(TINY_DINO)).save_pretrained(tmp_path / "bb")
    return tmp_path / "bb"


def stripes(size=56, batch=2):
    """Labels: class 0 on patch columns 0-1, class 1 on column 2, class 2 on column 3 (14 px)."""
    cols = torch.tensor([0, 0, 1, 2]).repeat_interleave(14)[:size]
    return cols.expand(batch, size, size).clone()


def build(folder, **args):
    """DPFT with every mechanism on (they are off by default), ``args`` on top."""
    backbone = build_dinov2(folder).eval()
    return backbone, build_method("dpft", backbone, K, **{**DPFT_ALL_ON, **args})


# ----- budget and layout --------------------------------------------------------------------


def dinov2_large_parts(**args) -> tuple[object, dict[str, int]]:
    with torch.device("meta"):
        backbone = build_dinov2(config={"variant": "large"})
        dpft = build_method("dpft", backbone, 19, **{**DPFT_ALL_ON, **args})
    parts: dict[str, int] = {}
    for name, p in dpft.trainable_parameters():
        part = name.split(".")[1]
        parts[part] = parts.get(part, 0) + p.numel()
    return dpft, parts


def test_budget_dinov2_large_19_classes_on_meta():
    # Every block, as methods.md's table: its parts, plus the presence calibration (a scale and
    # a bias per presence block and class: 1 block x 19 classes x 2 = 38), which replaces the
    # table's implicit scalar b.
    dpft, parts = dinov2_large_parts(blocks=list(range(24)))
    table = {  # methods.md section 2, "Budget"
        "prompts": 431_616,  # 24 x (100 x 16 + 16 x 1024)
        "U": 132_160,
        "W_q, W_k": 524_288,
        "shared MLPs": 2_099_200,
        "gamma": 24,
        "query link": 459_264,
    }
    assert parts["tokens_a"] + parts["tokens_b"] == table["prompts"]
    assert parts["context"] == table["U"]
    assert parts["attn_q"] + parts["attn_k"] == table["W_q, W_k"]
    assert parts["mlp_token2feat"] + parts["mlp_delta_f"] == table["shared MLPs"]
    assert parts["gamma"] == table["gamma"]
    assert parts["transform"] + parts["merge"] == table["query link"]
    assert parts["presence_scale"] == parts["presence_bias"] == 19
    assert sum(parts.values()) == sum(table.values()) + 38 == 3_646_590
    assert dpft.num_tokens == 100 and dpft.num_queries == 100
    assert dpft.pivot_banks["1024"].pivots.shape == (19, 1024)
    assert dpft.pivot_layers == [5, 11, 17, 23]  # the backbone's default out_indices
    assert dpft.presence_blocks == [23]


def test_budget_dinov2_large_default_blocks_on_meta():
    # Default: the deepest ceil(0.6 x 24) = 15 blocks (9-23). Per-block parts scale with 15:
    # prompts 15 x (100 x 16 + 16 x 1024) = 269,760 and gamma 15; U 132,160, W_q/W_k 524,288,
    # MLPs 2,099,200, query link 459,264 and presence 38 as above: 3,484,725 in all.
    dpft, parts = dinov2_large_parts()
    assert dpft.token_blocks == list(range(9, 24))
    assert parts["tokens_a"] + parts["tokens_b"] == 269_760 and parts["gamma"] == 15
    assert sum(parts.values()) == 3_484_725
    assert dpft.pivot_layers == [11, 17, 23] and dpft.presence_blocks == [23]
    # The defaults, every switch off: no U (132,160) and no presence calibration (38).
    plain, parts = dinov2_large_parts(**OFF)
    assert "context" not in parts and "presence_scale" not in parts
    assert sum(parts.values()) == 3_484_725 - 132_160 - 38 == 3_352_527


def test_token_layout():
    backbone = build_dinov2(config=dict(TINY_DINO))
    dpft = build_method("dpft", backbone, 19, **DPFT_ALL_ON)
    assert dpft.num_tokens == 1 + 76 + 23
    assert dpft.token_class[0] == -1 and dpft.token_class[1:5].tolist() == [0] * 4
    assert dpft.token_class[73:77].tolist() == [18] * 4 and (dpft.token_class[77:] == -1).all()
    many = build_method("dpft", build_dinov2(config=dict(TINY_DINO)), 30, **DPFT_ALL_ON)
    assert many.num_tokens == 1 + 120 + 8 and many.queries().shape == (129, 256)
    plain = build_method("dpft", build_dinov2(config=dict(TINY_DINO)), 30, **OFF)
    assert plain.num_tokens == 100 and (plain.token_class == -1).all()
    with pytest.raises(ConfigError, match="presence_gating gates class tokens"):
        build_method(
            "dpft",
            build_dinov2(config=dict(TINY_DINO)),
            3,
            class_prompts=False,
            presence_gating=True,
        )


def test_defaults_are_rein_style_tokens_without_the_mechanisms():
    # Off by default since the paired ablation (docs/benchmarks.md, "DPFT ablation on CPU").
    backbone = build_dinov2(config=dict(TINY_DINO))
    dpft = build_method("dpft", backbone, K, warmup_images=500)
    assert not (dpft.class_prompts or dpft.presence_gating or dpft.dynamic_context)
    assert not (dpft.focus_gate or dpft.pivot_loss or dpft.presence_calibration)
    assert dpft.num_tokens == 100 and (dpft.token_class == -1).all()  # no class tokens
    assert not dpft.uses_pivots and dpft.warmup_images == 0  # nothing to warm up
    assert dpft.presence_blocks == [] and not hasattr(dpft, "pivot_banks")
    assert not hasattr(dpft, "context") and dpft.token_blocks == [1, 2, 3]
    assert torch.equal(dpft.gamma.detach(), torch.full((3,), 0.3))
    saved = dpft.state_dict().keys()
    assert not [k for k in saved if k.startswith(("presence_", "pivot_banks", "context"))]
    on = build_method("dpft", build_dinov2(config=dict(TINY_DINO)), K, warmup_images=500,
                      **DPFT_ALL_ON)  # fmt: skip
    assert on.uses_pivots and on.warmup_images == 500 and "32" in on.pivot_banks
    only_loss = dict(pivot_loss=True, warmup_images=500)
    assert (
        build_method("dpft", build_dinov2(config=dict(TINY_DINO)), K, **only_loss).warmup_images
        == 500
    )


def test_blocks_and_presence_blocks_settings():
    def dpft(**args):
        return build_method(
            "dpft", build_dinov2(config=dict(TINY_DINO)), K, **{**DPFT_ALL_ON, **args}
        )

    default = dpft()  # 4 blocks: the deepest ceil(2.4) = 3, the gate in the last
    assert default.token_blocks == [1, 2, 3] and default.presence_blocks == [3]
    assert len(default.tokens_a) == 3 and default.gamma.shape == (3,)
    assert default.presence_bias.shape == default.presence_scale.shape == (1, K)
    assert default.presence_stats.shape == (1, K, 2)
    chosen = dpft(blocks=[-1, 0, 3], presence_blocks=[-1])
    assert chosen.token_blocks == [0, 3] and chosen.presence_blocks == [3]
    assert dpft(presence_gating=False).presence_blocks == []
    with pytest.raises(ConfigError, match="presence_blocks \\[1\\] must be among blocks"):
        dpft(blocks=[2, 3], presence_blocks=[1])
    assert dpft(blocks="all").token_blocks == [0, 1, 2, 3]
    for bad in ([4], "some", [1.5]):
        with pytest.raises(ConfigError, match="blocks .* must be a list of blocks in \\[-4, 3\\]"):
            dpft(blocks=bad)
    with pytest.raises(ConfigError, match="presence_blocks \\[\\] must be a list of blocks"):
        dpft(presence_blocks=[])


def test_only_the_chosen_blocks_are_refined(saved_backbone):
    x = torch.randn(1, 3, 56, 56)
    plain = build_dinov2(saved_backbone).eval()
    outputs = {}
    backbone, dpft = build(saved_backbone, blocks=[2, 3])
    for i in range(4):  # registered after DPFT's hooks: each block's final output
        backbone.add_block_hook(i, lambda t, hw, i=i: outputs.__setitem__(i, t) or t)
        plain.add_block_hook(i, lambda t, hw, i=i: outputs.__setitem__(("plain", i), t) or t)
    with torch.no_grad():
        dpft.gamma.fill_(0.5)
        backbone(x)
        plain(x)
    for i in (0, 1):
        torch.testing.assert_close(outputs[i], outputs["plain", i])
    assert (outputs[2] - outputs["plain", 2]).abs().max() > 1e-3


# ----- reduction to Rein and the switches ---------------------------------------------------


def test_all_switches_off_computes_rein(saved_backbone):
    rein_bb = build_dinov2(saved_backbone).eval()
    rein = build_method("rein", rein_bb, K)
    dpft_bb, dpft = build(saved_backbone, attn_dim=32, blocks=[0, 1, 2, 3], **OFF)
    assert dpft.num_tokens == rein.num_tokens
    with torch.no_grad():
        rein.scale.fill_(0.5)  # large enough that a wrong update would show
        dpft.load_state_dict(rein.state_dict(), strict=False)
        dpft.attn_q["32"].weight.copy_(torch.eye(32))
        dpft.attn_k["32"].weight.copy_(torch.eye(32))
        dpft.gamma.fill_(0.5)
    x = torch.randn(2, 3, 56, 56)
    for a, b in zip(dpft_bb(x), rein_bb(x)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(dpft.queries(), rein.queries())
    assert dpft.extra_loss(stripes()) == {}


def ready_calibration(dpft, present=2.0, absent=-2.0):
    """Statistics that let the gate act on every class (present mean above absent)."""
    dpft.presence_stats[..., 0] = present
    dpft.presence_stats[..., 1] = absent
    dpft.presence_seen.fill_(True)


def test_each_switch_changes_behaviour(saved_backbone):
    x = torch.randn(2, 3, 56, 56)
    labels = stripes()
    ref_bb, ref = build(saved_backbone, presence_blocks=[1, 2, 3])
    ref.eval()
    with torch.no_grad():
        ref.gamma.fill_(0.5)
        for p in ref.context.parameters():
            torch.nn.init.normal_(p, std=0.5)
        ref.presence_bias.fill_(-2.0)  # rho ~ 0.1: the gate suppresses what it acts on
    ready_calibration(ref)
    ref_bb(x)
    ref.init_pivots(labels)
    assert ref.pivot_banks["32"].valid.all()
    ref_out = ref_bb(x)[-1]

    def variant(**switch):
        bb, m = build(saved_backbone, **{"presence_blocks": [1, 2, 3], **switch})
        m.load_state_dict(ref.state_dict(), strict=False)
        m.eval()
        return bb(x)[-1], m

    for switch in ("presence_gating", "dynamic_context", "focus_gate"):
        out, _ = variant(**{switch: False})
        assert (out - ref_out).abs().max() > 1e-4, switch
    same, _ = variant(pivot_loss=False)
    torch.testing.assert_close(same, ref_out)  # the loss switch leaves the forward alone
    ref.train()
    ref_bb(x)
    assert set(ref.extra_loss(labels)) == {"loss_pivot", "loss_presence"}
    _, no_loss = variant(pivot_loss=False, presence_weight=0.0)
    no_loss.train()
    no_loss.backbone(x)
    assert no_loss.extra_loss(labels) == {}
    # class_prompts: with the optional penalty on, the class layout adds a loss of its own.
    _, ortho = variant(ortho_weight=1e-3)
    assert set(ortho.extra_loss(labels)) == {"loss_prompt_ortho"}
    _, flat = variant(ortho_weight=1e-3, class_prompts=False, presence_gating=False)
    assert flat.extra_loss(labels) == {}
    # Switched off at run time (as bench/dpft_presence.py does), the gates act no more.
    ref.eval()
    ref.presence_gating = False
    torch.testing.assert_close(ref_bb(x)[-1], variant(presence_gating=False)[0])


# ----- presence ---------------------------------------------------------------------------


def test_presence_is_a_log_mean_exp_of_cosines(saved_backbone):
    _, dpft = build(saved_backbone, presence_calibration=False, presence_blocks=[2, 3])
    bank = dpft.pivot_banks["32"]
    e = torch.eye(32)
    bank.pivots.copy_(torch.stack([e[0], -e[0], e[1]]))
    bank.valid.copy_(torch.tensor([True, True, False]))
    with torch.no_grad():  # block 3 is the second presence block: row 1
        dpft.presence_bias[1] = torch.tensor([0.5, -1.0, 0.0])
        dpft.presence_scale[1] = torch.tensor([0.0, math.log(2.0), 0.0])
    f = torch.stack([3 * e[0], e[2]])[None]  # two patches: along class 0, orthogonal to all
    logits, gated = dpft.class_presence_logits(f, 3)
    tau = 0.07
    expected = [  # exp(scale) * log-mean-exp(cos / tau) + bias
        math.log((math.exp(1 / tau) + 1) / 2) + 0.5,
        2 * math.log((math.exp(-1 / tau) + 1) / 2) - 1.0,
    ]
    torch.testing.assert_close(logits[0, :2], torch.tensor(expected))
    assert gated.tolist() == [True, True, False]  # class 2 has no pivot yet: rho = 1
    log_rho = dpft.token_log_presence(f, 3)[0]
    assert log_rho[0] == 0 and (log_rho[13:] == 0).all()  # null and generic tokens
    torch.testing.assert_close(log_rho[1:5], F.logsigmoid(torch.tensor(expected[0])).expand(4))
    torch.testing.assert_close(log_rho[5:9], F.logsigmoid(torch.tensor(expected[1])).expand(4))
    assert (log_rho[9:13] == 0).all()


def two_patch_images():
    """Two 14x28 images (a 1x2 token grid at stride 14): image 0 shows classes 0 and 1, image 1
    class 0 only."""
    return torch.stack(
        [torch.tensor([0] * 14 + [1] * 14).expand(14, 28), torch.zeros(14, 28, dtype=torch.long)]
    )


def test_presence_bce_and_its_gradients_by_hand(saved_backbone):
    _, dpft = build(
        saved_backbone, presence_calibration=False, presence_weight=0.5, presence_blocks=[2, 3]
    )
    bank = dpft.pivot_banks["32"]
    e = torch.eye(32)
    bank.pivots.copy_(torch.stack([e[0], e[1], e[2]]))
    bank.valid.copy_(torch.tensor([True, True, False]))  # class 2 is not gated: no BCE term
    with torch.no_grad():
        dpft.presence_bias.copy_(torch.tensor([[-13.0, -9.0, 3.0], [-14.0, -8.0, 3.0]]))
    r = 1 / math.sqrt(2)
    f = torch.stack([torch.stack([e[0], r * (e[1] + e[2])]), torch.stack([e[0], e[0]])])
    f.requires_grad_(True)
    s = [[lme([1, 0]), lme([0, r])], [lme([1, 1]), lme([0, 0])]]  # image, class 0 / 1
    present = [[1.0, 1.0], [1.0, 0.0]]
    dpft.train()
    for index in (2, 3):
        dpft.token_log_presence(f, index, hw=(1, 2))
    loss = dpft.extra_loss(two_patch_images())["loss_presence"]

    def bce(x, y):
        return -(y * math.log(sigmoid(x)) + (1 - y) * math.log(1 - sigmoid(x)))

    bias = [[-13.0, -9.0], [-14.0, -8.0]]  # block, class: logits of a few units
    per_block = [
        sum(bce(s[i][k] + bias[b][k], present[i][k]) for i in range(2) for k in range(2)) / 4
        for b in range(2)
    ]
    assert math.isclose(loss.item(), 0.5 * sum(per_block) / 2, rel_tol=1e-5)
    loss.backward()
    # d loss / d bias_{b,k} = 0.5 / 2 blocks / 4 terms * sum_i (sigmoid(x) - y)
    for b in range(2):
        for k in range(2):
            expected = sum(sigmoid(s[i][k] + bias[b][k]) - present[i][k] for i in range(2)) / 16
            assert math.isclose(dpft.presence_bias.grad[b, k].item(), expected, rel_tol=1e-4)
    assert (dpft.presence_bias.grad[:, 2] == 0).all()  # not gated
    assert dpft.presence_scale.grad[:, :2].abs().min() > 0
    assert f.grad is None  # the BCE trains the calibration, not the features
    # Evaluation (and SPL mode, which calls extra_loss in eval mode) adds no presence term.
    dpft.eval()
    dpft.token_log_presence(f, 2, hw=(1, 2))
    assert "loss_presence" not in dpft.extra_loss(two_patch_images())


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def trained_gate(folder, steps, **args) -> dict[int, tuple[torch.Tensor, bool]]:
    """Train DPFT's presence gate (its BCE; Adam at 1e-3 times the method's multiplier) on four
    images that share a bright background, two of them with class 1 as a brighter half; then
    the presence block -> (rho of class 1 in each image, whether the gate acts on class 1)."""
    torch.manual_seed(0)
    backbone, dpft = build(folder, **args)
    x = torch.randn(4, 3, 56, 56) * 0.3 + 1.0
    labels = torch.zeros(4, 56, 56, dtype=torch.long)
    x[:2, :, :, 28:] += 0.5
    labels[:2, :, 28:] = 1
    multiplier = dict((rule, o["lr_mult"]) for rule, o in dpft.param_group_rules())
    presence = [dpft.presence_scale, dpft.presence_bias]
    opt = torch.optim.Adam(presence, lr=1e-3 * multiplier["tuning.presence_"])
    dpft.train()
    for _ in range(steps):
        backbone(x)
        loss = dpft.extra_loss(labels).get("loss_presence")
        if loss is not None and loss.requires_grad:
            opt.zero_grad()
            loss.backward()
            opt.step()
    dpft.eval()
    rho = {}
    presence_of = dpft._presence

    def record(f, index):
        out = presence_of(f, index)
        rho[index] = (torch.sigmoid(out[2][:, 1]), bool(out[3][1]))
        return out

    dpft._presence = record
    with torch.no_grad():
        backbone(x)
    return rho


def test_rho_learns_to_separate_present_from_absent_classes(tmp_path):
    torch.manual_seed(0)
    build_dinov2(config=dict(TINY_DINO)).save_pretrained(tmp_path / "bb")
    saved_backbone = tmp_path / "bb"
    (rho, gated), *_ = trained_gate(saved_backbone, steps=64).values()
    assert gated  # seen present and absent: the gate acts on class 1
    assert rho[:2].min() >= 0.8 and rho[2:].max() <= 0.2, rho
    # The BCE sharpens what the statistics start from (without it nothing trains, so a few
    # steps show where they end); the bare score, BCE or not, leaves every image at rho ~ 1.
    (start, _), *_ = trained_gate(saved_backbone, steps=4, presence_weight=0.0).values()
    assert rho[:2].min() > start[:2].min() + 0.05 and rho[2:].max() < start[2:].max() - 0.05
    for weight in (0.0, 0.1):
        (bare, _), *_ = trained_gate(
            saved_backbone, steps=16, presence_calibration=False, presence_weight=weight
        ).values()
        assert bare[2:].min() > 0.9


# ----- pivots -----------------------------------------------------------------------------


def test_half_or_more_of_a_patch_decides_its_class():
    labels = torch.tensor(
        [
            [1, 1, 2, 2, 0, 255],
            [1, 2, 2, 255, 1, 2],
        ]
    )[None]  # 2x6 pixels, stride 2 -> grid 1x3
    # patch 0: three of four pixels are 1; patch 1: two of four are 2 (the rest 2/255 -> 3 of 4)
    # patch 2: 0, 255, 1, 2 -> no class reaches half
    assert patch_classes(labels, (1, 3), 2, num_classes=3).tolist() == [[1, 2, -1]]
    half = torch.tensor([[2, 255], [2, 255]])[None]  # two of four pixels, the rest ignored
    assert patch_classes(half, (1, 1), 2, num_classes=3).tolist() == [[2]]
    # Labels of an unpadded image: the missing bottom/right pixels count as ignored.
    short = torch.tensor([[1, 1, 1]])[None]  # 1x3 in a 2x4 padded area
    assert patch_classes(short, (1, 2), 2, num_classes=3).tolist() == [[1, -1]]
    assert patch_classes(torch.full((1, 2, 2), 255), (1, 1), 2, 3).tolist() == [[-1]]


def test_class_pool_and_ema_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]]])
    classes = torch.tensor([[0, 0, 1, -1]])
    sums, counts = class_pool(tokens, classes, 2)
    assert sums.tolist() == [[[4.0, 2.0], [5.0, 4.0]]] and counts.tolist() == [[2.0, 1.0]]
    bank = PivotBank(3, 2, momentum=0.9)
    bank.update(torch.tensor([[4.0, 2.0], [5.0, 4.0], [0.0, 0.0]]), torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(bank.pivots, torch.tensor([[2.0, 1.0], [5.0, 4.0], [0.0, 0.0]]))
    assert bank.valid.tolist() == [True, True, False]
    bank.update(torch.tensor([[0.0, 0.0], [0.0, 0.0], [9.0, 3.0]]), torch.tensor([0.0, 0.0, 3.0]))
    bank.update(torch.tensor([[12.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([4.0, 0, 0]))
    # class 0: 0.9 * (2, 1) + 0.1 * (3, 0); class 1 untouched; class 2 first seen: its mean.
    expected = torch.tensor([[2.1, 0.9], [5.0, 4.0], [3.0, 1.0]])
    torch.testing.assert_close(bank.pivots, expected)
    assert bank.valid.all()


def test_training_step_updates_pivots_from_the_pivot_block(saved_backbone):
    backbone = build_dinov2(saved_backbone).eval()
    seen = []
    # Registered before DPFT's hooks, so it sees block 3's own output (the pivot tokens).
    backbone.add_block_hook(3, lambda t, hw: seen.append(t) or t)
    dpft = build_method("dpft", backbone, K, **DPFT_ALL_ON)
    assert dpft.pivot_blocks == {32: 3}
    dpft.train()
    x, labels = torch.randn(2, 3, 56, 56), stripes()
    backbone(x)
    dpft.extra_loss(labels)
    tokens = seen[0].view(2, 4, 4, 32)  # (B, h, w, c): patch column 0-1 class 0, 2 class 1, ...
    means = [
        tokens[:, :, :2].mean((0, 1, 2)),
        tokens[:, :, 2].mean((0, 1)),
        tokens[:, :, 3].mean((0, 1)),
    ]
    bank = dpft.pivot_banks["32"]
    torch.testing.assert_close(bank.pivots, torch.stack(means))
    seen.clear()
    backbone(x)
    dpft.extra_loss(labels)
    new_means = torch.stack([seen[0].view(2, 4, 4, 32)[:, :, :2].mean((0, 1, 2))])
    torch.testing.assert_close(bank.pivots[0], 0.999 * means[0] + 0.001 * new_means[0])
    # Evaluation forwards leave the pivots alone.
    before = bank.pivots.clone()
    dpft.eval()
    backbone(x)
    dpft.extra_loss(labels)
    torch.testing.assert_close(bank.pivots, before)


def test_init_pivots_averages_warm_up_batches(saved_backbone):
    backbone, dpft = build(saved_backbone)
    maps = [torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4)]
    batches = [stripes(batch=2), stripes(batch=1)]
    for m, lab in zip(maps, batches):
        dpft.init_pivots(lab, features={32: m})
    both = torch.cat(maps)  # class 0 sits in patch columns 0-1 of every image
    torch.testing.assert_close(dpft.pivot_banks["32"].pivots[0], both[..., :2].mean((0, 2, 3)))
    torch.testing.assert_close(dpft.pivot_banks["32"].pivots[2], both[..., 3].mean((0, 2)))
    # From the tokens the hooks cached during a forward.
    backbone2, dpft2 = build(saved_backbone)
    with torch.no_grad():
        backbone2(torch.randn(1, 3, 56, 56))
    dpft2.init_pivots(stripes(batch=1))
    assert dpft2.pivot_banks["32"].valid.all()


def test_info_nce_two_classes_by_hand():
    pivots = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    valid = torch.tensor([True, True])
    anchors = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    loss = pivot_info_nce(anchors, torch.tensor([0, 1]), pivots, valid, tau=0.1)
    # anchor 0: cosines (1, 0) -> -log(e^10 / (e^10 + 1)); anchor 1: (1/sqrt2, 1/sqrt2) -> log 2
    expected = (math.log(1 + math.exp(-10)) + math.log(2)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # An invalid pivot leaves the denominator and skips its anchors.
    one = pivot_info_nce(anchors, torch.tensor([0, 1]), pivots, torch.tensor([True, False]))
    assert math.isclose(one.item(), 0.0, abs_tol=1e-6)
    none = pivot_info_nce(anchors.requires_grad_(), torch.tensor([1, 1]), pivots, ~valid)
    assert none.item() == 0.0 and none.requires_grad


def test_pivot_loss_uses_class_pooled_outputs_of_the_chosen_layers(saved_backbone):
    backbone, dpft = build(saved_backbone, pivot_layers=[1, 3])
    outs = {}
    for i in (1, 3):  # registered after DPFT's hooks: they see the PFF outputs
        backbone.add_block_hook(i, lambda t, hw, i=i: outs.__setitem__(i, t) or t)
    x, labels = torch.randn(2, 3, 56, 56), stripes()
    with torch.no_grad():
        backbone(x)
    dpft.init_pivots(labels)
    dpft.train()
    backbone(x)
    bank = dpft.pivot_banks["32"]
    pivots, valid = bank.pivots.clone(), bank.valid.clone()  # the loss sees them before the EMA
    loss = dpft.extra_loss(labels)["loss_pivot"]
    terms = []
    for i in (1, 3):
        grid = outs[i].view(2, 4, 4, 32)
        anchors = [
            grid[b, :, cols].reshape(-1, 32).mean(0)
            for b in range(2)
            for cols in (slice(0, 2), slice(2, 3), slice(3, 4))
        ]
        classes = torch.tensor([0, 1, 2, 0, 1, 2])
        terms.append(pivot_info_nce(torch.stack(anchors), classes, pivots, valid))
    torch.testing.assert_close(loss, 0.1 * torch.stack(terms).mean())
    loss.backward()
    assert dpft.tokens_b[0].grad is not None and dpft.presence_bias.grad is not None


# ----- hierarchical backbones ---------------------------------------------------------------


def test_dpft_on_a_hierarchical_backbone():
    backbone = tiny_tinyvit()
    dpft = build_method("dpft", backbone, K, blocks=[0, 1, 2, 3], **DPFT_ALL_ON)
    dims = backbone.block_dims  # [16, 24, 24, 32]
    assert dpft.pivot_blocks == {16: 0, 24: 2, 32: 3}
    assert {k: b.pivots.shape[1] for k, b in dpft.pivot_banks.items()} == {
        "16": 16,
        "24": 24,
        "32": 32,
    }
    assert dpft.pivot_layers == [0, 2, 3]  # out_indices [0, 2, 3, neck]
    dpft.train()
    x = torch.randn(2, 3, 64, 64)
    labels = (torch.arange(64) // 16).clamp(max=K - 1).expand(2, 64, 64).clone()
    backbone(x)
    assert dpft.extra_loss(labels)["loss_pivot"].item() == 0.0  # no pivots before this step
    assert all(b.valid.all() for b in dpft.pivot_banks.values())
    out = backbone(x)
    loss = dpft.extra_loss(labels)["loss_pivot"]
    assert loss.item() > 0
    (loss + sum(o.mean() for o in out) + dpft.queries().mean()).backward()
    for i, c in enumerate(dims):
        assert dpft.tokens_b[i].shape == (16, c) and dpft.tokens_b[i].grad is not None


# ----- presence calibration and warm-up -----------------------------------------------------


def lme(cosines, tau=0.07):
    """log-mean-exp of cos / tau, written out."""
    return math.log(sum(math.exp(c / tau) for c in cosines) / len(cosines))


def test_presence_calibration_statistics_and_logits_by_hand(saved_backbone):
    _, dpft = build(saved_backbone, presence_momentum=0.9, presence_blocks=[2, 3])
    bank = dpft.pivot_banks["32"]
    e = torch.eye(32)
    bank.pivots.copy_(torch.stack([e[0], e[1], e[2]]))
    bank.valid.fill_(True)
    labels = two_patch_images()
    r = 1 / math.sqrt(2)
    f = torch.stack([torch.stack([e[0], r * (e[1] + e[2])]), torch.stack([e[0], e[0]])])
    s0 = [lme([1, 0]), lme([0, r]), lme([0, r])]  # image 0: classes 0, 1, 2
    s1 = [lme([1, 1]), lme([0, 0]), lme([0, 0])]  # image 1
    dpft.train()
    dpft.token_log_presence(f, index=2, hw=(1, 2))
    dpft.extra_loss(labels)
    stats, seen = dpft.presence_stats[0], dpft.presence_seen[0]  # block 2: the first row
    # class 0: present in both images; class 1: present in 0, absent in 1; class 2: absent.
    assert seen.tolist() == [[True, False], [True, True], [False, True]]
    assert not dpft.presence_seen[1].any()
    torch.testing.assert_close(stats[0, 0], torch.tensor((s0[0] + s1[0]) / 2))
    torch.testing.assert_close(stats[1], torch.tensor([s0[1], s1[1]]))
    torch.testing.assert_close(stats[2, 1], torch.tensor((s0[2] + s1[2]) / 2))
    # Only class 1 was seen both present and absent (with a positive gap): it alone is gated.
    logits, gated = dpft.class_presence_logits(f, 2)
    assert gated.tolist() == [False, True, False]
    mid, gap = (s0[1] + s1[1]) / 2, s0[1] - s1[1]
    expected = torch.tensor([4 * (s0[1] - mid) / gap, 4 * (s1[1] - mid) / gap])
    torch.testing.assert_close(logits[:, 1], expected)
    log_rho = dpft.token_log_presence(f, index=2, hw=(1, 2))
    # Tokens 1-4 are class 0's, 5-8 class 1's, 9-12 class 2's: classes 0 and 2 keep rho 1.
    assert (log_rho[:, 1:5] == 0).all() and (log_rho[:, 9:13] == 0).all()
    torch.testing.assert_close(log_rho[:, 5:9], F.logsigmoid(logits[:, 1:2]).expand(2, 4))
    assert log_rho[0, 5] > math.log(0.8) and log_rho[1, 5] < math.log(0.2)  # present / absent
    # A block without statistics gates nothing.
    assert not dpft.class_presence_logits(f, 3)[1].any()
    dpft.eval()
    dpft.extra_loss(labels)  # clears what the calls above cached, without updating
    torch.testing.assert_close(dpft.presence_stats[0], stats)
    # A second training batch moves the statistics by EMA (momentum 0.9) where it measures them.
    dpft.train()
    g = torch.stack([e[0], e[0]])[None].expand(2, 2, 32)
    t = [lme([1, 1]), lme([0, 0]), lme([0, 0])]
    before = stats.clone()
    dpft.token_log_presence(g, index=2, hw=(1, 2))
    dpft.extra_loss(labels)
    torch.testing.assert_close(stats[0, 0], 0.9 * before[0, 0] + 0.1 * t[0])
    torch.testing.assert_close(stats[1], 0.9 * before[1] + 0.1 * torch.tensor([t[1], t[1]]))
    torch.testing.assert_close(stats[0, 1], before[0, 1])  # never measured: unchanged


def test_warm_up_sets_pivots_then_a_running_mean_of_calibration(saved_backbone):
    backbone = build_dinov2(saved_backbone).eval()
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    # Registered before DPFT's hooks: each block's own output = the f DPFT's update receives.
    for i in range(4):
        backbone.add_block_hook(i, lambda t, hw, i=i: seen[i].append(t) or t)
    dpft = build_method("dpft", backbone, K, **{**DPFT_ALL_ON, "presence_calibration": True})
    bank = dpft.pivot_banks["32"]
    all_three, no_class_2 = stripes(batch=1), stripes(batch=1).clamp(max=1)
    torch.manual_seed(0)
    xs = [torch.randn(1, 3, 56, 56) for _ in range(3)]
    scores: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    for step, (x, labels) in enumerate(zip(xs, [all_three, no_class_2, no_class_2])):
        pivots = bank.pivots.clone()
        with torch.no_grad():
            backbone(x)
        dpft.warm_up(labels)
        if step == 0:
            continue  # no pivots during the first batch: no statistics
        for i in range(4):
            cos = F.normalize(seen[i][-1][0], dim=-1) @ F.normalize(pivots, dim=-1).T
            scores[i].append(torch.log(torch.exp(cos / 0.07).mean(0)))  # (K,)
    # Pivots: plain class means of the pivot block's tokens over all three batches.
    grids = torch.cat([t.view(1, 4, 4, 32) for t in seen[3]])
    torch.testing.assert_close(bank.pivots[0], grids[:, :, :2].mean((0, 1, 2)))
    class_1 = torch.cat([grids[0, :, 2], grids[1:, :, 2:].reshape(-1, 32)])  # cols 2(-3)
    torch.testing.assert_close(bank.pivots[1], class_1.mean(0))
    torch.testing.assert_close(bank.pivots[2], grids[0, :, 3].mean(0))  # batch 1 only
    # Calibration of the presence blocks 2 and 3: a running mean over batches 2 and 3
    # (classes 0, 1 present, 2 absent).
    for slot, i in enumerate(dpft.presence_blocks):
        both = torch.stack(scores[i]).mean(0)
        stats, measured = dpft.presence_stats[slot], dpft.presence_seen[slot]
        assert measured.tolist() == [[True, False], [True, False], [False, True]]
        torch.testing.assert_close(stats[:2, 0], both[:2])
        torch.testing.assert_close(stats[2, 1], both[2])
