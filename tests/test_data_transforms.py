"""Transforms: mmseg recipe semantics, determinism, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.data import build_dataset, collate, eval_transforms, train_transforms
from pivotseg.data.transforms import (
    Compose,
    Normalize,
    Pad,
    PhotoMetricDistortion,
    RandomChoiceResize,
    RandomCrop,
    RandomFlip,
    ToTensor,
    adjust_saturation_hue,
    default_scales,
    resize_label,
    scaled_size,
)


def make_item(h=40, w=60, seed=0, index=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "label": rng.integers(0, 5, (h, w)).astype(np.int64),
        "meta": {"index": index, "epoch": 0},
    }


def test_default_scales_are_reins():
    assert default_scales(512) == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768,
                                   819, 870, 921, 972, 1024]  # fmt: skip
    assert default_scales((512, 1024))[0] == 512


def test_scaled_size_short_edge_and_cap():
    assert scaled_size(1024, 2048, 512) == (512, 1024)
    assert scaled_size(1024, 2048, 1024, max_long=2048) == (1024, 2048)
    # a very wide image: the long edge cap wins (factor 2048/1000)
    assert scaled_size(100, 1000, 512, max_long=2048) == (205, 2048)


def test_random_choice_resize_picks_a_listed_short_edge():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        item = RandomChoiceResize([20, 30, 50])(make_item(40, 60), rng)
        h, w = item["image"].shape[:2]
        assert item["label"].shape == (h, w)
        assert round(w / h, 1) == 1.5
        seen.add(min(h, w))
    assert seen == {20, 30, 50}


def test_resize_label_is_nearest():
    label = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(
        resize_label(label, (4, 4)), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    )
    assert resize_label(np.full((7, 9), 255), (3, 4)).max() == 255


def _half_half_item():
    label = np.zeros((100, 100), np.int64)
    label[:, 50:] = 1
    return {"image": np.zeros((100, 100, 3), np.uint8), "label": label}


def _max_share(label):
    _, counts = np.unique(label[label != 255], return_counts=True)
    return counts.max() / counts.sum()


def test_cat_max_ratio_keeps_no_class_above_75_percent():
    crop = RandomCrop(50, cat_max_ratio=0.75)
    shares = [
        _max_share(crop(_half_half_item(), np.random.default_rng(s))["label"]) for s in range(30)
    ]
    assert max(shares) < 0.75
    # without the check, crops dominated by one class are common: the test above can fail
    plain = RandomCrop(50, cat_max_ratio=1.0)
    shares = [
        _max_share(plain(_half_half_item(), np.random.default_rng(s))["label"]) for s in range(30)
    ]
    assert sum(share >= 0.75 for share in shares) >= 5


def test_cat_max_ratio_ignores_255_and_gives_up_after_10_redraws():
    item = {"image": np.zeros((10, 10, 3), np.uint8), "label": np.zeros((10, 10), np.int64)}

    class CountingRng:
        def __init__(self):
            self.calls = 0
            self.inner = np.random.default_rng(0)

        def integers(self, *args):
            self.calls += 1
            return self.inner.integers(*args)

    rng = CountingRng()
    out = RandomCrop(5, cat_max_ratio=0.75)(item, rng)
    assert out["label"].shape == (5, 5)
    assert rng.calls == 2 * 11  # first window + 10 redraws, two draws (top, left) each
    label = np.full((10, 10), 255, np.int64)
    label[0, 0], label[0, 1] = 0, 1  # two classes 50/50 among the labelled pixels
    ok = RandomCrop(10, cat_max_ratio=0.75)._balanced(label, (0, 10, 0, 10))
    assert ok


def test_crop_smaller_image_then_pad_fills_with_0_and_255():
    item = make_item(20, 30)
    item = RandomCrop((32, 40))(item, np.random.default_rng(0))
    assert item["image"].shape == (20, 30, 3)
    item = Pad((32, 40))(item)
    assert item["image"].shape == (32, 40, 3) and item["label"].shape == (32, 40)
    assert (item["image"][20:] == 0).all() and (item["image"][:, 30:] == 0).all()
    assert (item["label"][20:] == 255).all() and (item["label"][:, 30:] == 255).all()


def test_flip_moves_image_and_label_together():
    item = make_item()
    image, label = item["image"].copy(), item["label"].copy()
    out = RandomFlip(1.0)(item, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_array_equal(out["label"], label[:, ::-1])
    kept = RandomFlip(0.0)(make_item(), np.random.default_rng(0))
    np.testing.assert_array_equal(kept["image"], image)


def test_saturation_and_hue_adjustment():
    colours = np.array([[[255, 0, 0], [0, 0, 255], [200, 100, 50], [90, 90, 90]]], np.uint8)
    # no change: only the 8-bit HSV rounding
    same = adjust_saturation_hue(colours, 1.0, 0).astype(int)
    assert np.abs(same - colours).max() <= 3
    # saturation 0 -> grey at the value (max channel)
    grey = adjust_saturation_hue(colours, 0.0).astype(int)
    np.testing.assert_array_equal(grey, [[[255] * 3, [255] * 3, [200] * 3, [90] * 3]])
    # 60 OpenCV units = 120 degrees: red -> green, blue -> red
    turned = adjust_saturation_hue(colours[:, :2], hue=60).astype(int)
    np.testing.assert_allclose(turned, [[[0, 255, 0], [255, 0, 0]]], atol=3)
    # doubling saturation of (200, 100, 50) (S = 0.75) clips S at 1: min channel -> 0
    vivid = adjust_saturation_hue(colours[:, 2:3], 2.0).astype(int)
    assert vivid[0, 0, 0] == 200 and vivid[0, 0, 2] <= 1


def test_photometric_distortion_changes_image_only_and_reproduces():
    distort = PhotoMetricDistortion()
    item = make_item()
    label = item["label"].copy()
    out = distort(item, np.random.default_rng(5))
    assert out["image"].dtype == np.uint8 and out["image"].shape == (40, 60, 3)
    np.testing.assert_array_equal(out["label"], label)
    again = distort(make_item(), np.random.default_rng(5))
    np.testing.assert_array_equal(out["image"], again["image"])
    changed = [
        not np.array_equal(
            distort(make_item(), np.random.default_rng(s))["image"], make_item()["image"]
        )
        for s in range(10)
    ]
    assert any(changed)


def test_photometric_brightness_step_is_mmsegs_convert():
    # Force brightness only: a generator whose coin flips are 1, then 0 for every other step.
    class Script:
        def __init__(self):
            self.flips = iter([1, 0, 0, 0, 0])

        def integers(self, *args):
            return next(self.flips)

        def uniform(self, low, high):
            return 20.5

    item = {"image": np.array([[[0, 100, 250]]], np.uint8)}
    out = PhotoMetricDistortion()(item, Script())
    # float(x) + 20.5, clipped to 255, truncated to uint8
    np.testing.assert_array_equal(out["image"], [[[20, 120, 255]]])


def test_to_tensor_and_normalize():
    item = ToTensor()(make_item(4, 6))
    assert item["image"].shape == (3, 4, 6) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["image"].max() > 1  # 0-255 scale
    pixel = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1) + torch.tensor(
        [58.395, 57.12, 57.375]
    ).view(3, 1, 1)
    out = Normalize()({"image": pixel})
    torch.testing.assert_close(out["image"].flatten(), torch.ones(3))
    arr = Normalize(mean=(10, 10, 10), std=(2, 2, 2))({"image": np.full((1, 1, 3), 14, np.uint8)})
    np.testing.assert_allclose(arr["image"], 2.0)


def test_train_transforms_shape_and_determinism():
    pipeline = train_transforms((48, 64), scales=[40, 60, 90], seed=7)
    a = pipeline(make_item(80, 120, index=3))
    b = pipeline(make_item(80, 120, index=3))
    c = pipeline(make_item(80, 120, index=4))
    assert a["image"].shape == (3, 48, 64) and a["label"].shape == (48, 64)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    other_epoch = make_item(80, 120, index=3)
    other_epoch["meta"]["epoch"] = 1
    assert not torch.equal(a["image"], pipeline(other_epoch)["image"])
    unseeded = train_transforms(32, scales=[40])
    assert unseeded(make_item())["image"].shape == (3, 32, 32)


def test_compose_passes_rng_only_to_random_steps():
    seen = []

    def plain(item):
        seen.append("plain")
        return item

    assert Compose([plain], seed=0)(make_item()) is not None and seen == ["plain"]


def test_eval_transforms_resize_image_only():
    item = eval_transforms(resize_short=20)(make_item(40, 60))
    assert item["image"].shape == (3, 20, 30)
    assert item["label"].shape == (40, 60)  # scored at the original size
    assert eval_transforms()(make_item(40, 60))["image"].shape == (3, 40, 60)


def test_collate_pads_to_the_largest_and_keeps_metas():
    small = ToTensor()(make_item(4, 6))
    large = ToTensor()(make_item(5, 8))
    batch = collate([small, large])
    assert batch["image"].shape == (2, 3, 5, 8) and batch["label"].shape == (2, 5, 8)
    assert (batch["label"][0, 4:] == 255).all() and (batch["image"][0, :, :, 6:] == 0).all()
    assert [m["input_size"] for m in batch["meta"]] == [(4, 6), (5, 8)]
    numpy_batch = collate([make_item(4, 6), make_item(4, 6)])
    assert numpy_batch["image"].dtype == torch.float32


def _write_tiny_camvid(root, n=4):
    for i in range(n):
        rng = np.random.default_rng(i)
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "trainannot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            root / f"train/f{i}.png"
        )
        Image.fromarray(rng.integers(0, 12, (40, 50)).astype(np.uint8)).save(
            root / f"trainannot/f{i}.png"
        )


@pytest.mark.parametrize("workers", [0, 1])
def test_same_seed_same_batches_with_and_without_workers(tmp_path, workers):
    from pivotseg.data import seed_worker

    _write_tiny_camvid(tmp_path)
    ds = build_dataset(
        tmp_path, "camvid", "train", transform=train_transforms(32, [32, 48], seed=1)
    )
    reference = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=workers, collate_fn=collate, worker_init_fn=seed_worker
    )
    batches = list(loader)
    for i, item in enumerate(reference):
        assert torch.equal(batches[i // 2]["image"][i % 2], item["image"])
        assert torch.equal(batches[i // 2]["label"][i % 2], item["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], reference[0]["image"])
