"""PerSAM and PerSAM-F (Zhang et al., "Personalize Segment Anything Model with One Shot").

PerSAM is training-free: a target embedding from the reference's masked SAM features, a
positive and a negative point from its similarity to the target, target-guided attention and
target-semantic prompting in SAM's mask decoder, then cascaded refinement. PerSAM-F keeps SAM
frozen and learns two weights mixing SAM's three mask outputs on the reference itself. Both
score a target with a match calibrated on the references
(:class:`~pivotseg.tasks.refseg.calibration.MatchCalibration`) and return an empty mask below
``min_match`` (pivotseg's addition).

What each step does, where it follows or departs from the reference code, and the
measurements behind ``min_match``: docs/refseg.md, section "PerSAM and PerSAM-F".
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pivotseg.tasks.refseg.base import (
    ReferenceSegmenter,
    check_references,
    empty_mask,
    mask_box,
    object_cells,
    otsu_threshold,
)
from pivotseg.tasks.refseg.calibration import MatchCalibration
from pivotseg.tasks.refseg.features import PredictorFeatures, rescaled_view
from pivotseg.tasks.refseg.predictor import PromptMaskPredictor

PERSAM_ATTENTION = "pivotseg_persam"
# Calibrated match below which a target is "no match" (0: the reference's own background, 1:
# its mirrored view); see pivotseg.tasks.refseg.calibration for how it was set.
MIN_MATCH = 0.7
# Multi-crop target (``zoom``): the window around the first mask grows by this share of the
# mask's box on every side (context for SAM), and is segmented again only when it covers at
# most this share of the image (below that the encoder sees the object at least 2x larger).
ZOOM_MARGIN = 0.5
ZOOM_MAX_AREA = 0.25


def persam_attention_forward(
    module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs
):
    """Softmax attention; with a mask, PerSAM's ``softmax(softmax(qk) + bias)`` re-weighting.

    Same signature and output layout ``(B, N, heads, d)`` as transformers' attention functions.
    """
    weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling, dim=-1)
    if attention_mask is not None:
        weights = torch.softmax(weights + attention_mask, dim=-1)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), weights


@contextmanager
def persam_guidance(model, final_query_embedding: torch.Tensor | None = None):
    """Run ``model``'s mask decoder with PerSAM's attention and target embedding (see module doc).

    Args:
        model: transformers ``SamModel`` or ``Sam2Model``.
        final_query_embedding: added to the query of the final token-to-image attention.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(PERSAM_ATTENTION, persam_attention_forward)
    config = model.mask_decoder.config
    previous = config._attn_implementation
    config._attn_implementation = PERSAM_ATTENTION
    handle = None
    if final_query_embedding is not None:

        def add_target(module, args, kwargs):
            kwargs["query"] = kwargs["query"] + final_query_embedding
            return args, kwargs

        final = model.mask_decoder.transformer.final_attn_token_to_image
        handle = final.register_forward_pre_hook(add_target, with_kwargs=True)
    try:
        yield
    finally:
        config._attn_implementation = previous
        if handle is not None:
            handle.remove()


def cosine_map(features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(h, w)`` between ``(C, h, w)`` features and a ``(C,)`` embedding."""
    return torch.einsum("chw,c->hw", F.normalize(features, dim=0), F.normalize(embedding, dim=0))


def argmax_xy(values: torch.Tensor, largest: bool = True) -> np.ndarray:
    """(x, y) pixel of the maximum (or minimum) of an ``(H, W)`` map."""
    flat = values.flatten()
    index = int(flat.argmax() if largest else flat.argmin())
    width = values.shape[1]
    return np.array([index % width, index // width], dtype=np.float32)


class PerSAM(ReferenceSegmenter):
    """Training-free PerSAM on any :class:`PromptMaskPredictor` (see the module docstring).

    Args:
        predictor: the SAM predictor (its embedding cache makes repeated targets cheap).
        target_guided_attention: bias the decoder's cross-attention with the similarity map.
        semantic_prompting: add the target embedding to the decoder's prompt tokens.
        refinement: run the two cascaded refinement passes.
        min_match: targets whose calibrated match (see the module docstring) is below this
            get an empty mask and score 0; ``None`` or 0 disables the check.
        positive_points, negative_points: prompt points (the paper: one of each). Beyond the
            global maximum (minimum), further positives (negatives) are the next local maxima
            (minima) of the similarity grid above (below) its Otsu threshold, spread at least
            an eighth of the grid apart (:func:`spread_peaks`).
        reference_scales: multi-scale matching: the target embedding averages the reference
            object's features seen at these scales (:func:`rescaled_view`: shrunk onto a
            canvas below 1, a window around the object enlarged above 1); one encoder pass
            per reference and scale in ``fit``, none more per target.
        zoom: multi-crop target: when the first mask's window (:func:`zoom_window`) covers at
            most ``ZOOM_MAX_AREA`` of the target, the window is encoded at the encoder's full
            resolution and segmented again, and that mask replaces the first (one more encoder
            pass per such target; small and thin objects get more cells). The match and the
            no-match decision stay the whole image's.
    """

    name = "persam"

    def __init__(
        self,
        predictor: PromptMaskPredictor,
        target_guided_attention: bool = True,
        semantic_prompting: bool = True,
        refinement: bool = True,
        min_match: float | None = MIN_MATCH,
        positive_points: int = 1,
        negative_points: int = 1,
        reference_scales: Sequence[float] = (1.0,),
        zoom: bool = False,
    ):
        self.predictor = predictor
        self.zoom = zoom
        self.target_guided_attention = target_guided_attention
        self.semantic_prompting = semantic_prompting
        self.refinement = refinement
        self.min_match = min_match
        self.positive_points = positive_points
        self.negative_points = negative_points
        self.reference_scales = tuple(reference_scales)
        self.target_embedding: torch.Tensor | None = None
        self.calibration: MatchCalibration | None = None
        self.last_match: float | None = None  # match of the last segment()'s target
        self.last_points: np.ndarray | None = None  # prompts of the last segment(), for display

    # ----- reference ------------------------------------------------------------------------
    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """``(C, N)`` masked features -> ``(C,)`` embedding (PerSAM: their mean)."""
        return features.mean(1)

    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]) -> PerSAM:
        pairs = check_references(ref_images, ref_masks)
        embeddings = []
        for image, mask in pairs:
            per_scale = []
            for scale in self.reference_scales:
                view, view_mask = rescaled_view(image, mask, scale)
                if not view_mask.any():
                    continue  # the object shrank below a pixel
                self.predictor.set_image(view)
                cells = object_cells(self.predictor.mask_to_grid(view_mask))
                per_scale.append(self.pool(self.predictor.features[0][:, cells]))
            embeddings.append(torch.stack(per_scale).mean(0))
        self.target_embedding = torch.stack(embeddings).mean(0)
        self.calibration = MatchCalibration.from_references(
            PredictorFeatures(self.predictor), pairs
        )
        self.references = pairs
        return self

    def _require_fit(self) -> torch.Tensor:
        if self.target_embedding is None:
            raise RuntimeError(f"{self.name}: call fit(ref_images, ref_masks) before segment")
        return self.target_embedding

    # ----- target ---------------------------------------------------------------------------
    def similarity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity of the current image: on the feature grid and at image size."""
        grid = cosine_map(self.predictor.features[0], self._require_fit())
        return grid, self.predictor.grid_to_image(grid)

    def attention_bias(self, grid_sim: torch.Tensor) -> torch.Tensor:
        """``sigmoid`` of the standardised similarity over the image's cells, ``(1,1,1,h*w)``."""
        vh, vw = self.predictor.valid_grid()
        valid = grid_sim[:vh, :vw]
        z = (grid_sim - valid.mean()) / valid.std().clamp(min=1e-6)
        padded = torch.ones_like(z, dtype=torch.bool)
        padded[:vh, :vw] = False
        z = torch.where(padded, z[:vh, :vw].min(), z)
        return torch.sigmoid(z).flatten()[None, None, None]

    def prompt_points(self, grid_sim: torch.Tensor, sim: torch.Tensor):
        """Positive and negative points ``(N, 2)`` x/y with labels ``(N,)``."""
        positives = [argmax_xy(sim)]
        negatives = [argmax_xy(sim, largest=False)]
        if self.positive_points > 1 or self.negative_points > 1:
            vh, vw = self.predictor.valid_grid()
            valid = grid_sim[:vh, :vw]
            split = otsu_threshold(valid)
            apart = max(1.0, max(vh, vw) / 8)
            cells = spread_peaks(valid, self.positive_points, apart, above=split)[1:]
            positives += [self.cell_xy(c) for c in cells]
            cells = spread_peaks(-valid, self.negative_points, apart, above=-split)[1:]
            negatives += [self.cell_xy(c) for c in cells]
        points = np.stack(positives + negatives)
        return points, np.array([1] * len(positives) + [0] * len(negatives))

    def cell_xy(self, cell: tuple[int, int]) -> np.ndarray:
        """Pixel x/y (original image) of an embedding cell's centre."""
        p = self.predictor
        (height, width), (h, w) = p.original_size, p.input_size
        stride = p.image_size / p.features.shape[-1]
        x = min((cell[1] + 0.5) * stride * width / w, width - 1)
        y = min((cell[0] + 0.5) * stride * height / h, height - 1)
        return np.array([x, y], dtype=np.float32)

    def match(self) -> float:
        """Calibrated match of the current image (see the module docstring); kept as
        :attr:`last_match`."""
        p = self.predictor
        vh, vw = p.valid_grid()
        self.last_match = self.calibration.score(p.match_features[0][:, :vh, :vw])
        return self.last_match

    def rejects(self, match: float) -> bool:
        return self.min_match is not None and self.min_match > 0 and match < self.min_match

    def result(self, image, mask, iou: float, match: float) -> tuple[np.ndarray, float]:
        """``(mask, score)``, or an empty mask and 0 when it is empty or does not match."""
        if not mask.any() or self.rejects(match):
            return empty_mask(image), 0.0
        return mask, float(np.clip(iou, 0.0, 1.0) * np.clip(match, 0.0, 1.0))

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        self._require_fit()
        self.predictor.set_image(image)
        match = self.match()
        if self.rejects(match):
            self.last_points = None
            return empty_mask(image), 0.0
        mask, iou = self.decode(image)
        if self.zoom and mask.any():
            mask, iou = self.zoom_in(image, mask, iou)
        return self.result(image, mask, iou, match)

    def zoom_in(self, image: np.ndarray, mask: np.ndarray, iou: float) -> tuple[np.ndarray, float]:
        """The multi-crop pass (see ``zoom``): ``(mask, IoU prediction)`` of the window pasted
        into the image, or the first ones when the window is too large or comes back empty."""
        x0, y0, x1, y1 = zoom_window(mask, ZOOM_MARGIN)
        if (x1 - x0) * (y1 - y0) > ZOOM_MAX_AREA * mask.size:
            return mask, iou
        first_points = self.last_points
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        self.predictor.set_image(crop)
        crop_mask, crop_iou = self.decode(crop)
        if not crop_mask.any():
            self.last_points = first_points
            return mask, iou
        full = np.zeros_like(mask)
        full[y0:y1, x0:x1] = crop_mask
        self.last_points = self.last_points + np.array([x0, y0], dtype=np.float32)
        return full, crop_iou

    def decode(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """PerSAM's prompts, guided decoding and refinement on the predictor's current image:
        ``(mask, SAM's IoU prediction)``; an empty mask and 0 when refinement loses it."""
        embedding, p = self._require_fit(), self.predictor
        grid_sim, sim = self.similarity()
        points, labels = self.prompt_points(grid_sim, sim)
        self.last_points = points

        bias = self.attention_bias(grid_sim) if self.target_guided_attention else None
        target = embedding.view(1, 1, 1, -1) if self.semantic_prompting else None
        if bias is None and target is None:
            masks, scores, logits = p.predict(points, labels, multimask_output=False)
        else:
            with persam_guidance(p.model, target):
                masks, scores, logits = p.predict(
                    points,
                    labels,
                    multimask_output=False,
                    attention_similarity=bias,
                    target_embedding=target,
                )
        best = 0
        if self.refinement:
            masks, scores, logits = p.predict(
                points, labels, mask_input=logits[best : best + 1], multimask_output=True
            )
            best = int(np.argmax(scores))
            box = mask_box(masks[best])
            if box is None:
                return empty_mask(image), 0.0
            masks, scores, logits = p.predict(
                points,
                labels,
                boxes=box,
                mask_input=logits[best : best + 1],
                multimask_output=True,
            )
            best = int(np.argmax(scores))
        return masks[best], float(scores[best])


class PerSAMF(PerSAM):
    """PerSAM-F: PerSAM with two learned mask-scale weights (see the module docstring).

    Args:
        predictor: the SAM predictor.
        iterations: training iterations of the two weights (1000 in the paper).
        lr: AdamW learning rate (cosine-annealed to 0).
        train_size: longest side the loss is computed at (``None``: the reference's size).
        min_match: targets whose match is below this get an empty mask (see PerSAM).
        show_progress: tqdm bar over the iterations.
        zoom: the multi-crop target pass of PerSAM.
    """

    name = "persam-f"

    def __init__(
        self,
        predictor: PromptMaskPredictor,
        iterations: int = 1000,
        lr: float = 1e-3,
        train_size: int | None = 256,
        min_match: float | None = MIN_MATCH,
        show_progress: bool = True,
        zoom: bool = False,
    ):
        super().__init__(
            predictor,
            target_guided_attention=False,
            semantic_prompting=False,
            refinement=True,
            min_match=min_match,
            zoom=zoom,
        )
        self.iterations = iterations
        self.lr = lr
        self.train_size = train_size
        self.show_progress = show_progress
        self.mask_weights = torch.full((3,), 1 / 3)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        # PerSAM-F's embedding: the average of the masked features' mean and maximum.
        return features.mean(1) / 2 + features.max(1).values / 2

    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]) -> PerSAMF:
        super().fit(ref_images, ref_masks)
        samples = []
        for image, mask in self.references:
            p = self.predictor.set_image(image)
            _, sim = self.similarity()
            low_res, _ = p.predict_torch(argmax_xy(sim)[None], np.array([1]), multimask_output=True)
            target = torch.from_numpy(mask).float().to(low_res.device)
            samples.append(self.training_pair(p.upscale(low_res), target))
        self.mask_weights = self.train_weights(samples)
        return self

    def training_pair(self, logits: torch.Tensor, target: torch.Tensor):
        """Logits ``(3, H, W)`` and target ``(H, W)``, area-resized to ``train_size``."""
        h, w = target.shape
        if self.train_size is None or max(h, w) <= self.train_size:
            return logits, target
        scale = self.train_size / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        logits = F.interpolate(logits[None], size=size, mode="area")[0]
        return logits, F.interpolate(target[None, None], size=size, mode="area")[0, 0]

    def train_weights(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Fit ``w1, w2`` on ``(logits (3, H, W), target (H, W))`` pairs; return all 3 weights."""
        free = torch.nn.Parameter(torch.full((2,), 1 / 3))
        optimizer = torch.optim.AdamW([free], lr=self.lr, eps=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.iterations))
        steps = tqdm(
            range(self.iterations), desc="persam-f weights", disable=not self.show_progress
        )
        for _ in steps:
            weights = torch.cat([1 - free.sum(0, keepdim=True), free])
            loss = sum(
                dice_loss(combine(weights, logits), target)
                + focal_loss(combine(weights, logits), target)
                for logits, target in samples
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        return torch.cat([1 - free.sum(0, keepdim=True), free]).detach()

    def decode(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """PerSAM-F's decoding (one positive point, the learned mix of the three masks, two
        box refinements) on the predictor's current image: ``(mask, IoU prediction)``."""
        p = self.predictor
        _, sim = self.similarity()
        points, labels = argmax_xy(sim)[None], np.array([1])
        self.last_points = points
        low_res, _ = p.predict_torch(points, labels, multimask_output=True)
        weights = self.mask_weights.to(low_res.device)
        mask = (combine(weights, p.upscale(low_res)) > 0).cpu().numpy()
        logits = combine(weights, low_res)[None].cpu().numpy()
        for _ in range(2):  # refinement with the box of the current mask and its logits
            box = mask_box(mask)
            if box is None:
                return empty_mask(image), 0.0
            masks, scores, low = p.predict(
                points, labels, boxes=box, mask_input=logits, multimask_output=True
            )
            best = int(np.argmax(scores))
            mask, logits = masks[best], low[best : best + 1]
        return mask, float(scores[best])


def zoom_window(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (end exclusive) of the mask's box grown by ``margin`` times its
    width and height on each side, clipped to the image."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    x0 = max(0, int(np.floor(xs.min() - margin * bw)))
    y0 = max(0, int(np.floor(ys.min() - margin * bh)))
    x1 = min(width, int(np.ceil(xs.max() + 1 + margin * bw)))
    y1 = min(height, int(np.ceil(ys.max() + 1 + margin * bh)))
    return x0, y0, x1, y1


def spread_peaks(
    values: torch.Tensor, count: int, apart: float, above: float
) -> list[tuple[int, int]]:
    """Up to ``count`` local maxima (3x3) of a grid, best first, each at least ``apart`` cells
    from those before it; after the global maximum only those above ``above``."""
    peaks = values == F.max_pool2d(values[None, None], 3, stride=1, padding=1)[0, 0]
    order = torch.argsort(values.flatten(), descending=True)
    order = order[peaks.flatten()[order]]
    chosen: list[tuple[int, int]] = []
    width = values.shape[1]
    for index in order.tolist():
        if len(chosen) == count:
            break
        r, c = divmod(index, width)
        if chosen and float(values[r, c]) <= above:
            break
        if all((r - r0) ** 2 + (c - c0) ** 2 >= apart**2 for r0, c0 in chosen):
            chosen.append((r, c))
    return chosen


def combine(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the first axis: ``(3,)`` x ``(3, H, W)`` -> ``(H, W)``."""
    return torch.einsum("k,khw->hw", weights, logits)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - smoothed Dice coefficient of ``sigmoid(logits)`` against a binary target."""
    prob = logits.sigmoid().flatten()
    target = target.flatten()
    return 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet), averaged over pixels."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()
