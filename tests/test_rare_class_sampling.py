"""Rare classes: DAFormer's rare-class sampling (counts, probabilities, class-aware crops, data
order, exact resume, its setting) and class-weighted cross-entropy (median-frequency weights,
the fpn head's ``ce_class_weights``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.config import config_from_dict
from pivotseg.data import build_dataset
from pivotseg.data.rare_classes import (
    STATS_FILE,
    RareClassSampling,
    class_pixel_counts,
    class_probabilities,
    load_or_count,
    median_frequency_weights,
)
from pivotseg.data.transforms import train_transforms
from pivotseg.engine import read_metrics
from pivotseg.engine.sampler import ClassBalancedSampler, SeededItems
from pivotseg.errors import ConfigError
from pivotseg.heads.fpn import FPNHead
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.dgss import train
from tests.test_dgss import make_config, make_folder_dataset, no_time

SKY, POLE, ROAD, BICYCLIST, VOID = 0, 2, 3, 10, 11


def _labels() -> list[np.ndarray]:
    """Three 40x50 CamVid labels, counted by hand below."""
    a = np.full((40, 50), SKY, np.uint8)
    a[36:40, 46:50] = POLE  # 16 pole pixels in the bottom-right corner
    b = np.full((40, 50), ROAD, np.uint8)
    b[:20] = VOID  # 1000 road, 1000 ignored
    c = np.full((40, 50), SKY, np.uint8)
    c[0:2, 0:3] = BICYCLIST  # 6 bicyclist pixels in the top-left corner
    c[10:12, 0:2] = POLE  # 4 pole pixels
    return [a, b, c]


# images x CamVid's 11 classes; 255 (void) not counted
HAND_COUNTS = np.zeros((3, 11), np.int64)
HAND_COUNTS[0, [SKY, POLE]] = [1984, 16]
HAND_COUNTS[1, ROAD] = 1000
HAND_COUNTS[2, [SKY, POLE, BICYCLIST]] = [1990, 4, 6]


@pytest.fixture
def camvid(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    for i, label in enumerate(_labels()):
        image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"train/f{i}.png")
        Image.fromarray(label).save(tmp_path / f"trainannot/f{i}.png")
    return tmp_path


def test_pixel_counts_and_class_probabilities_by_hand(camvid, tmp_path):
    dataset = build_dataset(camvid, "camvid", "train")
    assert np.array_equal(class_pixel_counts(dataset), HAND_COUNTS)
    # cached in the given file and read back from it (a second count would give the same)
    cache = tmp_path / "run" / STATS_FILE
    assert np.array_equal(load_or_count(dataset, cache), HAND_COUNTS)
    saved = json.loads(cache.read_text())
    saved["counts"][0][SKY] = 7  # the file, not a recount, is what a second call returns
    cache.write_text(json.dumps(saved))
    assert load_or_count(dataset, cache)[0, SKY] == 7

    # 5000 labelled pixels: sky 3974, pole 20, road 1000, bicyclist 6 -> P ~ exp((1 - f) / T)
    probs = class_probabilities(HAND_COUNTS, temperature=0.5)
    f = {SKY: 0.7948, POLE: 0.004, ROAD: 0.2, BICYCLIST: 0.0012}
    weights = {c: math.exp((1 - share) / 0.5) for c, share in f.items()}
    total = sum(weights.values())
    expected = np.zeros(11)
    for c, w in weights.items():
        expected[c] = w / total
    assert probs == pytest.approx(expected, abs=1e-12)
    # T = 0.01 would overflow exp((1 - f) / T) without care; absent classes stay at 0
    sharp = class_probabilities(HAND_COUNTS, temperature=0.001)
    assert np.isfinite(sharp).all() and sharp[BICYCLIST] > 0.5 and sharp[1] == 0.0


def test_draws_follow_the_class_distribution_and_min_pixels():
    sampling = RareClassSampling(HAND_COUNTS, temperature=0.5, min_pixels=5)
    rng = np.random.default_rng(0)
    draws = [sampling.draw(rng) for _ in range(20000)]
    classes = np.array([c for _, c in draws])
    seen = np.bincount(classes, minlength=11) / len(draws)
    assert seen == pytest.approx(sampling.probs, abs=0.01)
    images = {c: {i for i, k in draws if k == c} for c in (SKY, POLE, ROAD, BICYCLIST)}
    # more than 5 pixels: pole only in image 0 (16; image 2 has 4), sky in 0 and 2, road in 1;
    # bicyclist has 6 > 5 in image 2
    assert images == {SKY: {0, 2}, POLE: {0}, ROAD: {1}, BICYCLIST: {2}}
    # a class that never reaches min_pixels is drawn among the images holding it at all
    strict = RareClassSampling(HAND_COUNTS, temperature=0.5, min_pixels=100)
    assert set(strict.images[POLE]) == {0, 2} and set(strict.images[BICYCLIST]) == {2}


def _sampled_items(camvid, seed=3, n=60, class_sampling=True, start=0):
    dataset = build_dataset(
        camvid, "camvid", "train", transform=train_transforms(16, scales=[40], seed=seed)
    )
    sampling = RareClassSampling(HAND_COUNTS, temperature=0.5, min_pixels=0)
    items = SeededItems(dataset)
    stream = iter(ClassBalancedSampler(sampling, seed=seed, start=start))
    keys = [next(stream) for _ in range(n)]
    if not class_sampling:  # the same images, crops chosen without the class
        keys = [key[:3] for key in keys]
    return keys, [items[key] for key in keys]


def test_crops_contain_the_sampled_class(camvid):
    keys, items = _sampled_items(camvid)
    assert {c for *_, c in keys} >= {POLE, BICYCLIST}
    for (_, _, _, c), item in zip(keys, items):
        assert item["label"].shape == (16, 16)
        assert (item["label"] == c).any(), c
    # without the class the corner objects are mostly cropped away: the test above can fail
    _, blind = _sampled_items(camvid, class_sampling=False)
    rare = [(i, c) for i, (*_, c) in enumerate(keys) if c != SKY]
    missed = [i for i, c in rare if not (blind[i]["label"] == c).any()]
    assert len(missed) > len(rare) // 2


def test_same_seed_same_stream_shards_and_restart(camvid):
    sampling = RareClassSampling(HAND_COUNTS, temperature=0.5, min_pixels=0)

    def take(n, **kw):
        stream = iter(ClassBalancedSampler(sampling, **kw))
        return [next(stream) for _ in range(n)]

    one = take(12, seed=3)
    assert one == take(12, seed=3) and one != take(12, seed=4)
    r0, r1 = take(6, seed=3, rank=0, world_size=2), take(6, seed=3, rank=1, world_size=2)
    assert [x for pair in zip(r0, r1) for x in pair] == one
    assert take(5, seed=3, start=7) == one[7:12]
    # positions are unique, so an image drawn twice gets two different augmentations
    assert [p for _, p, _, _ in one] == list(range(12))
    keys, items = _sampled_items(camvid, n=8)
    again_keys, again = _sampled_items(camvid, n=8)
    assert keys == again_keys
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, again))
    later_keys, later = _sampled_items(camvid, n=4, start=4)
    assert later_keys == keys[4:]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(later, items[4:]))


@pytest.fixture(scope="module")
def bands(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcs_data")
    make_folder_dataset(root / "src", {"train": 4, "val": 2})
    make_folder_dataset(root / "tgt", {"val": 2}, seed=1, shift=25)
    return root


RCS = ["data.rare_class_sampling={temperature: 0.3, min_pixels: 10}"]


def test_training_with_rcs_resumes_exactly(bands, tmp_path):
    full = train(make_config(bands, tmp_path / "full", overrides=RCS))
    counts = json.loads((full / STATS_FILE).read_text())["counts"]
    assert np.asarray(counts).shape == (4, 3)
    part = tmp_path / "part"
    train(make_config(bands, part, overrides=RCS), stop_at=3)
    train(make_config(bands, part, overrides=RCS), resume=part)
    assert no_time(read_metrics(part)) == no_time(read_metrics(full))
    a = load_segmenter(full / "checkpoints" / "last").trainable_state_dict()
    b = load_segmenter(part / "checkpoints" / "last").trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the sampler is wired: the same run without RCS sees other crops, so it logs other losses
    plain = train(make_config(bands, tmp_path / "plain"))
    assert not (plain / STATS_FILE).exists()
    loss = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (full, plain)]
    assert loss[0] != loss[1]


@pytest.mark.parametrize(
    "value, words",
    [
        ("{temperature: 0}", "temperature=0.0: must be above 0"),
        ("{temperature: -1}", "temperature=-1.0: must be above 0"),
        ("{min_pixels: -5}", "min_pixels=-5: must be at least 0"),
        ("{temprature: 0.1}", "did you mean data.rare_class_sampling.temperature"),
    ],
)
def test_bad_settings_are_one_line_errors(value, words):
    data = {"model": {"num_classes": 3}, "data": {}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, [f"data.rare_class_sampling={value}"])
    assert words in str(err.value) and "\n" not in str(err.value)
    cfg = config_from_dict(data, ["data.rare_class_sampling={}"])
    assert (cfg.data.rare_class_sampling.temperature, cfg.data.rare_class_sampling.min_pixels) == (
        0.01,
        3000,
    )


def test_median_frequency_weights_by_hand():
    # shares: sky 0.7948, pole 0.004, road 0.2, bicyclist 0.0012; median of the four 0.102
    weights = median_frequency_weights(HAND_COUNTS)
    expected = [1.0] * 11
    for c, share in {SKY: 0.7948, POLE: 0.004, ROAD: 0.2, BICYCLIST: 0.0012}.items():
        expected[c] = round(0.102 / share, 3)
    assert weights == expected
    assert median_frequency_weights(HAND_COUNTS, power=0.5)[POLE] == round(
        (0.102 / 0.004) ** 0.5, 3
    )


def test_fpn_class_weighted_cross_entropy_by_hand():
    head = FPNHead([8], [16], 3, channels=8, ce_class_weights=[0.5, 2.0, 0.0])
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    # pixel 0: class 0, -log softmax(2, 0, 1)[0]; pixel 1: class 1, -log softmax(0, 1, 3)[1]
    nll0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))
    nll1 = -math.log(math.exp(1) / (1 + math.exp(1) + math.exp(3)))
    expected = (0.5 * nll0 + 2.0 * nll1) / (0.5 + 2.0)
    assert head.loss(logits, labels)["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    plain = FPNHead([8], [16], 3, channels=8)
    assert plain.loss(logits, labels)["loss_ce"].item() == pytest.approx((nll0 + nll1) / 2)
    assert "ce_class_weights" not in head.state_dict()  # rebuilt from head_args, never saved
    for bad in ([1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ConfigError, match="ce_class_weights has .* give 3 non-negative"):
            FPNHead([8], [16], 3, channels=8, ce_class_weights=bad)
