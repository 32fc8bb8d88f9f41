"""Metrics against hand-computed confusion matrices; slide vs whole inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from pivotseg.evaluation import (
    ConfusionMatrix,
    mean_over_targets,
    slide_inference,
    whole_inference,
    window_starts,
)

# 4 classes; class 3 appears in neither labels nor predictions.
LABEL = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
# scored pixels (255 skipped): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0)
#   label\pred  0  1  2  3
#   0           2  1  0  0
#   1           0  2  0  0
#   2           1  0  1  0
#   3           0  0  0  0
EXPECTED = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(4)
    cm.update(PRED, LABEL)
    assert torch.equal(cm.matrix, EXPECTED)
    res = cm.compute()
    # IoU: 0: 2/(3+3-2)=0.5, 1: 2/(2+3-2)=2/3, 2: 1/(2+1-1)=0.5, 3: absent -> NaN
    assert res["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(res["iou"][3])
    assert res["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert res["acc"] == pytest.approx(5 / 7)
    # class accuracy: 2/3, 2/2, 1/2 -> mean over present classes
    assert res["macc"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert math.isnan(res["class_acc"][3])


def test_predicted_but_absent_class_scores_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    res = cm.compute()
    assert res["iou"][0] == pytest.approx(0.5) and res["iou"][2] == 0.0
    assert math.isnan(res["iou"][1])
    assert res["miou"] == pytest.approx(0.25)


def test_batches_accumulate_like_one_update():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 8, 8), generator=gen)
    label = torch.randint(0, 5, (3, 8, 8), generator=gen)
    label[0, 0] = 255
    whole, parts = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, label)
    for i in range(3):
        parts.update(pred[i], label[i].numpy())
    assert torch.equal(whole.matrix, parts.matrix)
    assert whole.matrix.sum() == 3 * 64 - 8


def test_update_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="label values"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="predicted"):
        cm.update(torch.tensor([0, 7]), torch.tensor([0, 1]))


def test_all_reduce_sums_over_a_gloo_group(tmp_path):
    cm = ConfusionMatrix(4)
    cm.update(PRED, LABEL)
    assert torch.equal(cm.all_reduce().matrix, EXPECTED)  # no group: unchanged
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert torch.equal(cm.all_reduce().matrix, EXPECTED)
    finally:
        dist.destroy_process_group()


def test_mean_over_targets():
    assert mean_over_targets({"a": {"miou": 0.5}, "b": {"miou": 0.7}}) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mean_over_targets({})


def test_window_starts_follow_mmseg_grid():
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(300, 512, 341) == [0]
    assert window_starts(6, 4, 2) == [0, 2]


def pointwise(images: torch.Tensor) -> torch.Tensor:
    """A per-pixel function (1x1 conv), so windows must reproduce whole-image logits."""
    weight = torch.arange(15, dtype=torch.float32).view(5, 3, 1, 1) / 100
    return torch.nn.functional.conv2d(images, weight)


def test_slide_equals_whole_for_a_pointwise_fn():
    images = torch.rand(2, 3, 37, 53) * 255
    whole = whole_inference(pointwise, images)
    slid = slide_inference(pointwise, images, 5, crop=(16, 20), stride=(10, 13), batch_size=3)
    torch.testing.assert_close(slid, whole)


def test_slide_pads_an_image_smaller_than_the_crop():
    sizes = []

    def fn(x):
        sizes.append(tuple(x.shape[-2:]))
        return pointwise(x)

    images = torch.rand(1, 3, 10, 12) * 255
    out = slide_inference(fn, images, 5, crop=16, stride=8)
    assert sizes == [(16, 16)]
    torch.testing.assert_close(out, pointwise(images))


def test_slide_averages_overlaps_with_a_count_map():
    def column_in_window(x):  # logit = x position inside the window
        n, _, h, w = x.shape
        return torch.arange(w, dtype=torch.float32).expand(n, 1, h, w).clone()

    out = slide_inference(column_in_window, torch.zeros(1, 3, 2, 6), 1, crop=(2, 4), stride=(2, 2))
    # windows at x=0 and x=2: columns 2,3 are averaged over both
    expected = torch.tensor([0, 1, (2 + 0) / 2, (3 + 1) / 2, 2, 3], dtype=torch.float32)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_inference_resizes_to_the_label_size_and_checks_fn():
    images = torch.rand(1, 3, 8, 8)
    assert whole_inference(pointwise, images, out_size=(16, 16)).shape == (1, 5, 16, 16)
    assert slide_inference(pointwise, images, 5, 4, 4, out_size=(4, 4)).shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="expected"):
        slide_inference(lambda x: x[:, :2], images, 5, 4, 4)
