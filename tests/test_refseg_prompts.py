"""PerSAM's prompt points: several positives from the similarity peaks, negatives from the
background, and k-shot runs from the command line."""

from __future__ import annotations

import json

import numpy as np
import torch

from pivotseg.cli.main import main
from pivotseg.tasks.refseg import PerSAM
from pivotseg.tasks.refseg.features import rescaled_view
from pivotseg.tasks.refseg.persam import spread_peaks
from pivotseg.tasks.refseg.predictor import build_sam_predictor
from tests.test_refseg_cli import save_image, save_mask
from tests.test_refseg_models import box_mask, random_image, sam_folder  # noqa: F401


def test_spread_peaks_by_hand():
    values = torch.zeros(10, 10)
    values[2, 2], values[2, 3] = 1.0, 0.95  # one peak and its shoulder (not a local maximum)
    values[7, 7] = 0.9
    values[3, 8] = 0.8
    values[8, 1] = 0.3  # a local maximum below the threshold
    assert spread_peaks(values, 5, apart=2.0, above=0.5) == [(2, 2), (7, 7), (3, 8)]
    # Too close to an earlier peak: skipped; the count caps the list.
    values[4, 2] = 0.85
    assert spread_peaks(values, 5, apart=3.0, above=0.5) == [(2, 2), (7, 7), (3, 8)]
    assert spread_peaks(values, 2, apart=1.0, above=0.5) == [(2, 2), (7, 7)]
    # The global maximum is always kept, whatever the threshold.
    assert spread_peaks(values, 3, apart=1.0, above=5.0) == [(2, 2)]


def test_persam_with_several_positive_and_negative_points(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    method = PerSAM(p, min_match=0, positive_points=3, negative_points=3)
    method.fit([random_image(64, 64, seed=1)], [box_mask(64, 64, 10, 40, 10, 40)])
    image = random_image(64, 64, seed=2)
    mask, score = method.segment(image)
    assert mask.shape == (64, 64) and 0.0 <= score <= 1.0
    points = method.last_points
    assert 2 <= len(points) <= 6
    assert ((points >= 0) & (points < 64)).all()
    # The first positive is the similarity's maximum, the first negative its minimum.
    _, sim = method.similarity()
    flat = sim.flatten()
    assert np.allclose(points[0], [int(flat.argmax()) % 64, int(flat.argmax()) // 64])


def test_cli_run_with_two_references(tmp_path, sam_folder):  # noqa: F811
    refs = []
    for k in range(2):
        image = save_image(tmp_path / f"ref{k}.jpg", random_image(40, 48, seed=k))
        mask = save_mask(tmp_path / f"ref{k}_mask.png", box_mask(40, 48, 5 + k, 30, 10, 40))
        refs += ["--ref", str(image), "--ref-mask", str(mask)]
    target = save_image(tmp_path / "t.jpg", random_image(36, 50, seed=9))
    out = tmp_path / "out"
    argv = ["refseg", "run", *refs, str(target), "--out", str(out), "--sam", sam_folder]
    assert main(argv + ["--min-match", "0"]) == 0
    assert json.loads((out / "scores.json").read_text())[str(target)]["mask"] == "t.png"


def test_rescaled_view_changes_the_object_scale_only():
    image = np.zeros((80, 120, 3), np.uint8)
    image[20:60, 40:80] = 200  # a 40x40 object
    mask = np.zeros((80, 120), bool)
    mask[20:60, 40:80] = True
    small, small_mask = rescaled_view(image, mask, 0.5)
    assert small.shape == image.shape and small_mask.shape == mask.shape
    assert abs(int(small_mask.sum()) - 20 * 20) <= 40  # half the side
    ys, xs = np.nonzero(small_mask)
    # Shrunk to 40x60 and centred at offset (20, 30): the object at rows 30-49, cols 50-69.
    assert abs(ys.min() - 30) <= 1 and abs(xs.min() - 50) <= 1
    assert small[40, 60].tolist() == [200] * 3 and small[0, 0].tolist() == [small[0, 0, 0]] * 3
    big, big_mask = rescaled_view(image, mask, 2.0)
    assert big.shape == image.shape
    assert abs(int(big_mask.sum()) - 80 * 80) <= 320  # twice the side
    assert big[40, 60].tolist() == [200] * 3
    same, same_mask = rescaled_view(image, mask, 1.0)
    assert same is image and same_mask is mask


def test_persam_multi_scale_reference_averages_the_scales(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    ref, ref_mask = random_image(64, 64, seed=1), box_mask(64, 64, 16, 48, 16, 48)
    one = PerSAM(p, min_match=0).fit([ref], [ref_mask]).target_embedding
    embeddings = [one]
    for scale in (0.5, 2.0):
        view, view_mask = rescaled_view(ref, ref_mask, scale)
        embeddings.append(PerSAM(p, min_match=0).fit([view], [view_mask]).target_embedding)
    multi = PerSAM(p, min_match=0, reference_scales=(1.0, 0.5, 2.0)).fit([ref], [ref_mask])
    assert torch.allclose(multi.target_embedding, torch.stack(embeddings).mean(0), atol=1e-6)
    assert multi.segment(random_image(50, 70, seed=3))[0].shape == (50, 70)
