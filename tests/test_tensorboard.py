"""A training run writes TensorBoard scalars that TensorBoard itself reads back (issue #14,
item 5): loss, learning rate and mIoU, at the iterations and values of metrics.jsonl."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pivotseg.config import config_from_dict
from pivotseg.engine import read_metrics
from pivotseg.tasks.dgss import train
from tests.test_dgss import config_dict, make_folder_dataset


def test_training_writes_loss_lr_and_miou_readable_by_tensorboard(tmp_path):
    data = tmp_path / "data"
    make_folder_dataset(data / "src", {"train": 4, "val": 2})
    make_folder_dataset(data / "tgt", {"val": 2}, seed=1, shift=25)
    cfg = config_dict(data, tmp_path / "run")
    cfg["train"].update(iterations=4, eval_every=2, checkpoint_every=0, log_every=1)
    cfg["eval"] = {"mode": "whole"}
    run = train(config_from_dict(cfg))

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "eval/mean_miou", "eval/targets/tgt/miou", "eval/val/miou"} <= tags

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    records = read_metrics(run)
    logged = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in logged] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [2, 4]
    # TensorBoard stores float32: equal to metrics.jsonl up to that rounding
    assert scalars("loss") == [(r["iter"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]
    assert scalars("lr") == [(r["iter"], pytest.approx(r["lr"], rel=1e-6)) for r in logged]
    miou = [(r["iter"], pytest.approx(r["eval"]["mean_miou"], rel=1e-6)) for r in evals]
    assert scalars("eval/mean_miou") == miou
    assert all(0 <= value <= 100 for _, value in scalars("eval/targets/tgt/miou"))
