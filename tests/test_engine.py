"""Engine pieces on a toy model: schedules, batch arithmetic, sampler, checkpoints, the loop."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pivotseg.engine import NonFiniteLoss, Trainer, TrainingStopped, read_metrics
from pivotseg.engine import checkpoint as ckpt
from pivotseg.engine.optim import accumulation_steps, build_optimizer, default_param_groups
from pivotseg.engine.sampler import InfiniteSampler, SeededItems, shard_indices
from pivotseg.engine.schedule import build_scheduler, warmup_poly_factor
from pivotseg.errors import ConfigError


# ----- a toy model and dataset --------------------------------------------------------------------
class ToySegmenter(nn.Module):
    """1x1 conv classifier behind a frozen 1x1 conv; ``nan_at`` / ``signal_at`` inject faults."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.frozen = nn.Conv2d(3, 3, 1)
        self.frozen.requires_grad_(False)
        self.classifier = nn.Conv2d(3, num_classes, 1)
        self.norm = nn.GroupNorm(1, 3)
        self.calls = 0
        self.nan_at: int | None = None
        self.signal_at: int | None = None

    def forward(self, images):
        return self.classifier(self.norm(self.frozen(images / 255.0)))

    def compute_loss(self, images, labels):
        self.calls += 1
        if self.signal_at is not None and self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        loss = F.cross_entropy(self(images), labels, ignore_index=255)
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"ce": loss.detach()}


class ToyData(Dataset):
    """Images whose label is the brightest channel; a random flip draws from NumPy's generator."""

    def __init__(self, n: int = 6, size: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=gen) * 255
        self.labels = self.images.argmax(1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, label = self.images[i], self.labels[i]
        if np.random.rand() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label}


def train_cfg(**overrides):
    base = dict(
        iterations=6,
        global_batch_size=2,
        per_device_batch_size=None,
        lr=0.05,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        warmup_iters=0,
        warmup_ratio=1e-6,
        poly_power=0.9,
        min_lr=0.0,
        grad_clip=None,
        mixed_precision="no",
        eval_every=0,
        checkpoint_every=0,
        log_every=1,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def toy_eval(model, iteration):
    data = ToyData()
    with torch.no_grad():
        pred = model(data.images).argmax(1)
    return {"acc": (pred == data.labels).float().mean().item() * 100}


def make_trainer(tmp_path, name="run", seed=0, data=None, **cfg):
    torch.manual_seed(seed)
    model = ToySegmenter()
    trainer = Trainer(
        model, train_cfg(**cfg), data or ToyData(), tmp_path / name, seed=seed, evaluate=toy_eval
    )
    return model, trainer


def losses(run_dir):
    return [(r["iter"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


# ----- schedule ----------------------------------------------------------------------------------
def test_warmup_poly_factor_hand_computed():
    f = warmup_poly_factor(10, warmup_iters=2, warmup_ratio=0.1, power=0.9)
    assert f(0) == pytest.approx(0.1)
    assert f(1) == pytest.approx(0.55)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5**0.9)
    assert f(10) == pytest.approx(0.0)
    g = warmup_poly_factor(10, power=1.0, min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(5) == pytest.approx(0.55) and g(10) == 0.1 + 0.0


def test_scheduler_keeps_group_ratios():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    sched = build_scheduler(opt, iterations=4, power=1.0)
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [[1.0, 0.1], [0.75, 0.075], [0.5, 0.05], [0.25, 0.025]]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


# ----- batch arithmetic and parameter groups -------------------------------------------------------
def test_accumulation_steps_honour_global_batch():
    assert accumulation_steps(2, 1, 1) == (1, 2)
    assert accumulation_steps(8, 4, None) == (2, 1)
    assert accumulation_steps(8, 2, 2) == (2, 2)
    assert accumulation_steps(16, 2, 1) == (1, 8)
    with pytest.raises(ConfigError, match="global_batch_size=4 does not split over 3"):
        accumulation_steps(4, 3, None)
    with pytest.raises(ConfigError, match=r"use one of \[1, 2, 4\]"):
        accumulation_steps(8, 2, 3)


def test_default_param_groups_skip_frozen_and_decay_only_matrices():
    model = ToySegmenter()
    groups = default_param_groups(model, lr=0.1, weight_decay=0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(model.classifier.weight)}
    assert no_decay == {id(model.classifier.bias), id(model.norm.weight), id(model.norm.bias)}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


def test_sgd_with_momentum_matches_hand_computed_steps():
    # Two groups as a tuning method's rules give them: own lr and weight decay each.
    a, b = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([3.0]))
    groups = [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.01}]
    opt = build_optimizer(groups, lr=1.0, weight_decay=0.0, name="sgd", momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] is False
    for _ in range(2):  # loss = sum(a^2) + 2b: grads 2a and 2
        opt.zero_grad()
        ((a**2).sum() + 2 * b.sum()).backward()
        opt.step()
    # a: g0 = 2a0 + 0.5a0 = [2.5, -5], buf1 = g0, a1 = a0 - 0.1 buf1 = [0.75, -1.5];
    #    g1 = 2.5a1 = [1.875, -3.75], buf2 = 0.9 buf1 + g1 = [4.125, -8.25], a2 = a1 - 0.1 buf2.
    torch.testing.assert_close(a.detach(), torch.tensor([0.3375, -0.675]), rtol=0, atol=1e-6)
    # b: no decay, g = 2 twice: buf = 2 then 3.8; b = 3 - 0.02 - 0.038.
    torch.testing.assert_close(b.detach(), torch.tensor([2.942]), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], torch.tensor([4.125, -8.25]))


def test_unknown_optimizer_is_a_one_line_config_error():
    with pytest.raises(
        ConfigError, match="train.optimizer='adam' is unknown; use one of adamw, sgd"
    ):
        build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], 0.1, 0.0, name="adam")
    from pivotseg.config import config_from_dict

    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"num_classes": 2}, "train": {"optimizer": "adam"}})
    assert str(err.value) == "train.optimizer='adam': use one of adamw, sgd"
    cfg = config_from_dict({"model": {"num_classes": 2}}, ["train.optimizer=sgd"])
    assert (cfg.train.optimizer, cfg.train.momentum) == ("sgd", 0.9)
    assert config_from_dict({"model": {"num_classes": 2}}).train.optimizer == "adamw"


# ----- data order --------------------------------------------------------------------------------
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_global_stream_is_independent_of_world_size():
    one = _take(InfiniteSampler(5, seed=3), 12)
    r0 = _take(InfiniteSampler(5, seed=3, rank=0, world_size=2), 6)
    r1 = _take(InfiniteSampler(5, seed=3, rank=1, world_size=2), 6)
    assert [x for pair in zip(r0, r1) for x in pair] == one
    # every epoch is a permutation, epochs differ
    assert sorted(i for i, _, _ in one[:5]) == list(range(5))
    assert [i for i, _, _ in one[:5]] != [i for i, _, _ in one[5:10]]
    assert [e for _, e, _ in one] == [0] * 5 + [1] * 5 + [2] * 2
    # resuming at a position continues the same stream
    assert _take(InfiniteSampler(5, seed=3, start=7), 5) == one[7:12]


def test_shard_indices_cover_each_index_once():
    shards = [shard_indices(7, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))


def test_seeded_items_repeat_and_leave_global_state():
    data = SeededItems(ToyData())
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    flips = [data[(0, 0, s)]["image"] for s in range(8)]
    assert np.array_equal(np.random.get_state()[1], before)
    again = [data[(0, 0, s)]["image"] for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(flips, again))
    assert len({round(float(x[0, 0, 0]), 4) for x in flips}) == 2  # both flips occur


# ----- checkpoint state --------------------------------------------------------------------------
def test_optimizer_and_rng_state_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    ckpt.save_nested(opt.state_dict(), tmp_path, "optimizer")
    loaded = ckpt.load_nested(tmp_path, "optimizer")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    tensors: dict = {}
    skeleton = json.loads(json.dumps(ckpt.split_tensors(ckpt.capture_rng(), tensors)))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(ckpt.join_tensors(skeleton, tensors))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ----- the loop ----------------------------------------------------------------------------------
def test_training_lowers_loss_and_leaves_frozen_weights(tmp_path):
    model, trainer = make_trainer(tmp_path, iterations=30, lr=0.1, global_batch_size=2)
    frozen = model.frozen.weight.clone()
    head = model.classifier.weight.clone()
    trainer.fit()
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5])
    assert torch.equal(model.frozen.weight, frozen)
    assert not torch.equal(model.classifier.weight, head)
    run = tmp_path / "run"
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    assert (run / "checkpoints" / "last" / "model.safetensors").exists()
    evals = [r for r in read_metrics(run) if "eval" in r]
    assert evals[-1]["iter"] == 30 and evals[-1]["eval"]["acc"] > 80


def test_global_batch_by_accumulation_matches_one_pass(tmp_path):
    m1, t1 = make_trainer(tmp_path, "one", iterations=3, global_batch_size=2)
    m2, t2 = make_trainer(
        tmp_path, "acc", iterations=3, global_batch_size=2, per_device_batch_size=1
    )
    assert (t1.per_device_batch, t1.accumulation) == (2, 1)
    assert (t2.per_device_batch, t2.accumulation) == (1, 2)
    t1.fit()
    t2.fit()
    assert m2.calls == 2 * m1.calls == 6
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "one")), torch.tensor(losses(tmp_path / "acc"))
    )


def test_resume_after_stop_repeats_the_uninterrupted_run(tmp_path):
    cfg = dict(
        iterations=8, eval_every=2, warmup_iters=2, global_batch_size=2, per_device_batch_size=1
    )
    full_model, full = make_trainer(tmp_path, "full", **cfg)
    full.fit()
    _, part = make_trainer(tmp_path, "part", **cfg)
    part.fit(stop_at=3)
    assert (tmp_path / "part" / "checkpoints" / "iter_0000003").is_dir()
    resumed_model, again = make_trainer(tmp_path, "part", **cfg)
    again.fit(resume=tmp_path / "part" / "checkpoints" / "last")
    assert_same_run(tmp_path / "part", tmp_path / "full", resumed_model, full_model)


def test_resume_with_sgd_restores_momentum_and_repeats_the_run(tmp_path):
    cfg = dict(
        iterations=8,
        eval_every=4,
        global_batch_size=2,
        optimizer="sgd",
        momentum=0.9,
        lr=0.5,
        weight_decay=1e-4,
    )
    full_model, full = make_trainer(tmp_path, "full", **cfg)
    full.fit()
    _, part = make_trainer(tmp_path, "part", **cfg)
    part.fit(stop_at=3)
    _, optim_state, _ = ckpt.load_checkpoint_state(tmp_path / "part" / "checkpoints" / "last")
    buffers = [s["momentum_buffer"] for s in optim_state["state"].values()]
    assert buffers and all(torch.count_nonzero(b) > 0 for b in buffers)
    assert optim_state["param_groups"][0]["momentum"] == 0.9
    resumed_model, again = make_trainer(tmp_path, "part", **cfg)
    again.fit(resume=tmp_path / "part")
    assert_same_run(tmp_path / "part", tmp_path / "full", resumed_model, full_model)
    # Without the saved buffers the continuation differs: the equality above needs them.
    _, lost = make_trainer(tmp_path, "lost", **cfg)
    lost.fit(stop_at=3)
    folder = tmp_path / "lost" / "checkpoints" / "last"
    state = ckpt.load_nested(folder, "optimizer")
    state["state"] = {}
    ckpt.save_nested(state, folder, "optimizer")
    lost_model, lost = make_trainer(tmp_path, "lost", **cfg)
    lost.fit(resume=folder)
    assert not torch.equal(lost_model.classifier.weight, full_model.classifier.weight)


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in records]


def assert_same_run(run, reference, model, reference_model):
    """The run logged what the reference run logged (timings aside) and ended on its weights."""
    assert _strip_time(read_metrics(run)) == _strip_time(read_metrics(reference))
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_signal_saves_checkpoint_and_resume_matches(tmp_path):
    cfg = dict(iterations=6, global_batch_size=2)
    full_model, full = make_trainer(tmp_path, "full", **cfg)
    full.fit()
    model, stopped = make_trainer(tmp_path, "stopped", **cfg)
    model.signal_at = 3  # SIGINT during the third iteration: it completes, then the run stops
    with pytest.raises(TrainingStopped) as err:
        stopped.fit()
    message = str(err.value)
    assert "iteration 3 of 6" in message and "--resume" in message and "\n" not in message
    resumed_model, again = make_trainer(tmp_path, "stopped", **cfg)
    again.fit(resume=tmp_path / "stopped")
    assert_same_run(tmp_path / "stopped", tmp_path / "full", resumed_model, full_model)


def test_nan_loss_stops_naming_iteration_and_checkpoint(tmp_path):
    model, trainer = make_trainer(tmp_path, iterations=10, checkpoint_every=2)
    model.nan_at = 5  # the fifth forward pass, i.e. iteration 5 with one pass per step
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    message = str(err.value)
    assert "iteration 5" in message and "iter_0000004" in message and "\n" not in message


def test_infinite_lr_is_caught(tmp_path):
    _, trainer = make_trainer(tmp_path, iterations=5, lr=math.inf)
    with pytest.raises(NonFiniteLoss, match="at iteration 2; last good checkpoint: none"):
        trainer.fit()


def test_checkpoints_never_hold_non_finite_weights(tmp_path):
    _, trainer = make_trainer(tmp_path, iterations=5, lr=math.inf, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss, match="weights became non-finite at iteration 1"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()
