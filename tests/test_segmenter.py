"""Segmenter = tiny DINOv2 + tuning method + each head: shapes, training, checkpoints, groups."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from pivotseg.backbones.dinov2 import build_dinov2
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.heads.base import NORM_TYPES
from pivotseg.segmenter import SegmenterConfig, build_segmenter, load_segmenter
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, tiny_vit_config

NUM_CLASSES = 3
TINY_DINOV2 = tiny_vit_config()
HEAD_ARGS = TINY_HEAD_ARGS
METHOD_ARGS = TINY_METHOD_ARGS
CASES = [("fpn", "frozen"), ("fpn", "rein"), ("mask2former", "frozen"), ("mask2former", "rein")]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    build_dinov2(config=TINY_DINOV2).save_pretrained(folder)
    return folder


def make_config(head, method, backbone_dir) -> SegmenterConfig:
    return SegmenterConfig(
        num_classes=NUM_CLASSES,
        backbone="dinov2",
        backbone_source=None if backbone_dir is None else str(backbone_dir),
        backbone_config=dict(TINY_DINOV2) if backbone_dir is None else {},
        method=method,
        method_args=METHOD_ARGS[method],
        head=head,
        head_args=HEAD_ARGS[head],
    )


def make_segmenter(head, method, backbone_dir):
    return build_segmenter(make_config(head, method, backbone_dir))


def toy_batch(size=(32, 48)):
    """Two images whose left/middle/right thirds are three flat colours = classes 0/1/2."""
    h, w = size
    labels = torch.zeros(2, h, w, dtype=torch.long)
    labels[:, :, w // 3 : 2 * w // 3] = 1
    labels[:, :, 2 * w // 3 :] = 2
    colours = torch.tensor([[200.0, 30, 30], [30, 200, 30], [30, 30, 200]])
    images = colours[labels].permute(0, 3, 1, 2) + 10 * torch.randn(2, 3, h, w)
    labels[1, :4] = 255
    return images.clamp(0, 255), labels


# ----- shapes, normalisation and padding -------------------------------------------------------
@pytest.mark.parametrize(("head", "method"), CASES)
def test_logits_at_input_size_for_two_sizes(head, method, backbone_dir):
    seg = make_segmenter(head, method, backbone_dir).eval()
    with torch.no_grad():
        assert seg(torch.rand(2, 3, 32, 48) * 255).shape == (2, NUM_CLASSES, 32, 48)
        assert seg(torch.rand(1, 3, 27, 41) * 255).shape == (1, NUM_CLASSES, 27, 41)


@torch.no_grad()
def test_normalises_pads_with_mean_colour_and_crops(backbone_dir):
    seg = make_segmenter("fpn", "frozen", backbone_dir).eval()
    seen = []
    seg.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.rand(1, 3, 27, 41) * 255
    logits = seg(images)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert seen[0].shape == (1, 3, 32, 48)
    torch.testing.assert_close(seen[0][..., :27, :41], (images - mean) / std)
    assert seen[0][..., 27:, :].abs().max() == 0 and seen[0][..., 41:].abs().max() == 0
    padded = mean.expand(1, 3, 32, 48).clone()
    padded[..., :27, :41] = images
    torch.testing.assert_close(logits, seg(padded)[..., :27, :41])


def test_train_mode_keeps_frozen_backbone_in_eval(backbone_dir):
    seg = make_segmenter("fpn", "rein", backbone_dir).train()
    assert seg.training and seg.head.training and seg.tuning.training
    assert not any(m.training for m in seg.backbone.modules() if m is not seg.backbone)


# ----- training --------------------------------------------------------------------------------
def test_dpft_warm_up_pads_labels_sets_pivots_and_keeps_the_mode(backbone_dir):
    cfg = make_config("fpn", "dpft", backbone_dir)
    assert build_segmenter(cfg).warmup_images == 0  # DPFT's default: no warm-up pass
    cfg.method_args = {**cfg.method_args, "warmup_images": 500, "presence_calibration": True}
    seg = build_segmenter(cfg).train()
    assert seg.warmup_images == 500  # methods.md: one pass over 500 source images
    assert make_segmenter("fpn", "rein", backbone_dir).warmup_images == 0
    images, labels = toy_batch(size=(27, 41))  # padded to 32 x 48 inside
    trained = {n: p.clone() for n, p in seg.named_parameters() if p.requires_grad}
    seg.warm_up(images, labels)
    bank = seg.tuning.pivot_banks["32"]
    assert bank.valid.all()
    assert seg.training and seg.tuning.training
    for name, p in seg.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
    # A second batch calibrates the presence of the blocks that separate the classes.
    two = labels.clamp(max=1)  # class 2's third painted as class 1: class 2 is absent
    colours = torch.tensor([[200.0, 30, 30], [30, 200, 30]])
    seg.warm_up(colours[two.clamp(max=1)].permute(0, 3, 1, 2), two)
    assert seg.tuning.presence_seen.any()
    # Training steps use the calibration and update it in place before their backward pass.
    for _ in range(2):
        loss, parts = seg.compute_loss(images, labels)
        loss.backward()
    assert "loss_pivot" in parts


@pytest.mark.parametrize(("head", "method"), CASES)
def test_loss_falls_on_a_fixed_batch(head, method, backbone_dir):
    torch.manual_seed(0)
    seg = make_segmenter(head, method, backbone_dir).train()
    images, labels = toy_batch()
    # Rein's queries start nearly equal (tiny tokens), so the matching needs a brisk rate.
    opt = torch.optim.AdamW(seg.param_groups(lr=5e-3, weight_decay=0.01))
    losses = []
    for _ in range(30):
        loss, _ = seg.compute_loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses


def test_rein_queries_drive_mask2former(backbone_dir):
    seg = make_segmenter("mask2former", "rein", backbone_dir)
    assert seg.head.uses_queries and seg.tuning.queries().shape == (6, 64)
    assert not any("queries_embedder" in n for n, _ in seg.named_parameters())
    images, labels = toy_batch((27, 41))  # also exercises label padding
    loss, parts = seg.train().compute_loss(images, labels)
    assert set(parts) == {"loss_cls", "loss_mask", "loss_dice"}
    loss.backward()
    assert seg.tuning.merge.weight.grad.abs().sum() > 0
    seg.eval()
    with torch.no_grad():
        ref = seg(images)
        seg.tuning.merge.bias.add_(0.5)  # only the query link changes
        assert not torch.allclose(seg(images), ref)


def test_rein_with_fpn_builds_no_query_link(backbone_dir):
    seg = make_segmenter("fpn", "rein", backbone_dir)
    assert not seg.head.uses_queries and seg.tuning.queries() is None
    assert seg.config.method_args == METHOD_ARGS["rein"]  # derived settings are not saved


def test_extra_loss_only_in_training(backbone_dir):
    seg = make_segmenter("fpn", "dpft", backbone_dir).train()
    images, labels = toy_batch()
    for _ in range(2):  # the first step initialises the pivots the loss compares with
        _, parts = seg.compute_loss(images, labels)
    assert "loss_pivot" in parts and parts["loss_pivot"] > 0
    _, parts = seg.eval().compute_loss(images, labels)
    assert set(parts) == {"loss_ce"}


# ----- parameters, groups, checkpoints ---------------------------------------------------------
@pytest.mark.parametrize(("head", "method"), [*CASES, ("fpn", "full")])
def test_param_groups_cover_trainable_parameters_once(head, method, backbone_dir):
    seg = make_segmenter(head, method, backbone_dir)
    groups = seg.param_groups(lr=1e-4, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in seg.parameters() if p.requires_grad}
    decay_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    for mod_name, module in seg.head.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            name = f"head.{mod_name}.{p_name}"
            if isinstance(module, NORM_TYPES) or p_name == "bias":
                assert decay_of[name] == 0.0, name
            elif isinstance(module, nn.Conv2d) and p_name == "weight":
                assert decay_of[name] == 0.05 and lr_of[name] == 1e-4, name
    backbone_names = {n for n in decay_of if n.startswith("backbone.")}
    if method == "full":
        assert backbone_names and all(lr_of[n] < 1e-4 for n in backbone_names)
    else:
        assert not backbone_names
    if method == "rein":
        assert decay_of["tuning.tokens_a.0"] == 0.0 and decay_of["tuning.scale"] == 0.0
        assert decay_of["tuning.mlp_delta_f.32.weight"] == 0.05


@pytest.mark.parametrize(("head", "method"), [("fpn", "frozen"), ("mask2former", "rein")])
def test_trainable_state_dict_holds_only_trained_tensors(head, method, backbone_dir):
    seg = make_segmenter(head, method, backbone_dir)
    state = seg.trainable_state_dict()
    trained = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert set(state) == trained
    assert not any(k.startswith("backbone.") for k in state)
    assert {f"head.{n}" for n, _ in seg.head.named_parameters()} <= trained
    assert any(k.startswith("tuning.") for k in state) == (method == "rein")


def test_trainable_state_dict_keeps_method_buffers(backbone_dir):
    seg = make_segmenter("fpn", "dpft", backbone_dir)
    persistent = {f"tuning.{k}" for k, _ in seg.tuning.named_buffers()} & set(seg.state_dict())
    assert persistent and persistent <= set(seg.trainable_state_dict())
    assert "pixel_mean" not in seg.trainable_state_dict()


@pytest.mark.parametrize(
    ("head", "method"), [("fpn", "frozen"), ("mask2former", "rein"), ("fpn", "dpft")]
)
def test_save_then_load_gives_identical_logits(head, method, backbone_dir, tmp_path):
    torch.manual_seed(0)
    seg = make_segmenter(head, method, backbone_dir).train()
    images, labels = toy_batch((27, 41))
    opt = torch.optim.SGD(seg.param_groups(lr=0.1, weight_decay=0.0))
    for _ in range(2):  # move weights (and DPFT's pivots) away from their initial values
        loss, _ = seg.compute_loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seg.eval()
    with torch.no_grad():
        ref = seg(images)
    seg.save(tmp_path / "ckpt")
    torch.manual_seed(1)  # another random init must not matter
    again = load_segmenter(tmp_path / "ckpt")
    assert not again.training
    # The file holds every method argument, defaults included, and nothing else differs.
    assert again.config.method_args == seg.tuning.config()
    assert replace(again.config, method_args=seg.config.method_args) == seg.config
    with torch.no_grad():
        torch.testing.assert_close(again(images), ref, rtol=0, atol=0)


def test_random_backbone_is_saved_and_source_can_be_overridden(backbone_dir, tmp_path):
    seg = make_segmenter("fpn", "frozen", None).eval()
    images = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        ref = seg(images)
    seg.save(tmp_path / "random")
    with torch.no_grad():
        torch.testing.assert_close(load_segmenter(tmp_path / "random")(images), ref)
    # A checkpoint over a pretrained backbone holds no backbone tensors; the source may move.
    seg = make_segmenter("fpn", "frozen", backbone_dir).eval()
    seg.save(tmp_path / "pretrained")
    moved = shutil.copytree(backbone_dir, tmp_path / "moved_backbone")
    again = load_segmenter(tmp_path / "pretrained", backbone_source=moved)
    assert again.config.backbone_source == str(moved)
    with torch.no_grad():
        torch.testing.assert_close(again(images), seg(images))


def test_checkpoint_of_another_model_is_refused(backbone_dir, tmp_path):
    make_segmenter("fpn", "frozen", backbone_dir).save(tmp_path / "fpn")
    make_segmenter("mask2former", "rein", backbone_dir).save(tmp_path / "m2f")
    shutil.copy(tmp_path / "fpn" / "model.safetensors", tmp_path / "m2f" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. (head|tuning)\.") as err:
        load_segmenter(tmp_path / "m2f")
    assert "unexpected (e.g. head.classifier" in str(err.value)
    assert "fpn/frozen" not in str(err.value) and "rein/mask2former" in str(err.value)
    wide = build_segmenter(
        {**make_config("fpn", "frozen", backbone_dir).to_dict(), "head_args": {"channels": 32}}
    )
    with pytest.raises(CheckpointError, match="of another shape"):
        wide.load_trained(tmp_path / "fpn")
    with pytest.raises(CheckpointError, match="no segmenter.json"):
        load_segmenter(tmp_path)


# ----- config ----------------------------------------------------------------------------------
def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'head_args'"):
        SegmenterConfig.from_dict({"num_classes": 3, "head_arg": {}})
    with pytest.raises(ConfigError, match="num_classes is required"):
        SegmenterConfig.from_dict({"head": "fpn"})
    with pytest.raises(ConfigError, match="one name per class"):
        SegmenterConfig(num_classes=3, class_names=["a"])
    with pytest.raises(ConfigError, match="model.head='uper' is unknown"):
        SegmenterConfig(num_classes=3, head="uper")
    cfg = SegmenterConfig.from_dict({"num_classes": 3, "backbone_source": None})
    assert SegmenterConfig.from_dict(cfg.to_dict()) == cfg
