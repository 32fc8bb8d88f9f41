"""CAV-SAM ("Correspondence as Video", Wang et al., ICCV 2025) on transformers' SAM2 video model.

Reference segmentation as video object segmentation: the reference ``I_r`` (with mask ``M_r``),
transition frames and the target ``I_t`` form a pseudo-video that SAM2 tracks the object
through::

    frame 0            frames 1..n                       frame n+1
    reference (box)    transitions (first 4: pseudo-     target: the output
                       label mask prompts from TTGA)

* **Transitions** come from a pluggable generator (:mod:`pivotseg.tasks.refseg.transitions`):
  ``concat`` (default: no transition frame), ``crossfade`` (no model), or ``dbst`` (diffusion,
  needs ``diffusers`` + Stable Diffusion). The paper uses DBST with 7 frames at alpha
  0.2..0.8; among what runs without Stable Diffusion it found plain concatenation best (1-shot
  average over four cross-domain datasets: concat 60.68, affine video 56.84, mixup video
  52.21; crossfade is a mixup video), hence the default. With ``concat`` there is no
  transition frame, so no pseudo-label prompt either.
* **Frame 0** is prompted with the box of ``M_r`` (the paper's choice) or, with
  ``reference_prompt="mask"``, with ``M_r`` itself (SAM2 then takes the mask as that frame's
  output). transformers' session holds either points/box *or* a mask per frame, not both.
* **TTGA** (test-time geometric alignment): only the image encoder's FPN neck is fine-tuned
  (the Hiera trunk frozen), ``ttga_steps`` of Adam (lr 1e-3, cosine) on the augmentation-
  consistency loss, on the reference(s) alone: with ``p`` the prototype (mask-weighted mean of
  the reference's neck features ``F_r``) and ``S = cos(F, p)``,
  ``L = BCE(S(aug(I_r)) / tau, aug(M_r)) + BCE(cos(F_r, p') / tau, M_r)`` where ``p'`` is the
  prototype of ``aug(I_r)`` under its own Otsu-thresholded prediction. Geometric
  augmentations are random affine maps (flip, +-15 deg, scale 0.8-1.2, shift +-10%) drawn
  once into a pool of ``ttga_augmentations`` whose trunk features are computed once, so a step
  costs only neck passes. The loss acts on the stride-16 FPN level the mask decoder attends
  to. The temperature ``tau`` (0.1) is not given by the paper notes; it is ours.
* **Pseudo-labels**: the first ``pseudo_label_frames`` transition frames get the mask
  ``cos(F, p) > otsu`` (on the feature grid, upsampled) as mask prompts.
* **Multi-shot** (``k`` references): ``multi_shot="separate"`` (default) runs one pseudo-video
  per reference and averages the target's mask logits and object scores; ``"joint"`` puts all
  references, each prompted, at the start of one video followed by the transitions from the
  last reference and the target.

The output is the target frame's mask; the score is SAM2's object-presence probability
(``sigmoid`` of its object score logit). When SAM2 judges the object absent the mask is empty
and the score below 0.5.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tasks.refseg.base import (
    ReferenceSegmenter,
    check_references,
    empty_mask,
    mask_box,
    object_cells,
    otsu_threshold,
)
from pivotseg.tasks.refseg.predictor import SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_model_type
from pivotseg.tasks.refseg.transitions import (
    TransitionGenerator,
    build_transition,
    resize_to,
    transition_alphas,
)

OBJECT_ID = 1


def load_sam2_video(source: str, device: str = "cpu"):
    """``Sam2VideoModel`` from a SAM2 hub id or folder, all memory modules included."""
    from pathlib import Path

    from transformers import Sam2VideoModel

    from pivotseg.tasks.refseg.predictor import MOBILESAM_FILE, is_mobilesam_checkpoint

    path = Path(source)
    if is_mobilesam_checkpoint(path) or (path / MOBILESAM_FILE).is_file():
        raise ConfigError(
            f"{source}: is a SAM (v1) model; cav-sam needs a SAM2 video checkpoint "
            "(--sam facebook/sam2.1-hiera-tiny or a local copy)"
        )
    kind = sam_model_type(str(source))
    if kind not in ("sam2", "sam2_video"):
        raise ConfigError(f"{source}: holds a {kind!r} model; cav-sam needs a SAM2 checkpoint")
    from pivotseg.backbones.hub import safe_from_pretrained

    model, info = safe_from_pretrained(Sam2VideoModel, source, output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise CheckpointError(
            f"{source}: lacks {len(missing)} SAM2 video weights (e.g. {missing[0]}); "
            "an image-only SAM2 checkpoint cannot track; use a sam2_video checkpoint"
        )
    return model.to(device).eval()


def neck_embedding(model, trunk_states) -> torch.Tensor:
    """The FPN level the mask decoder attends to (stride 16), from the trunk's outputs."""
    fpn, _ = model.vision_encoder.neck(trunk_states)
    levels = fpn[-model.vision_encoder.num_feature_levels :][::-1]
    return levels[-1]


def weighted_mean(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(C, h, w)`` features averaged with ``(h, w)`` weights -> ``(C,)``."""
    return (features * weights).sum((1, 2)) / weights.sum().clamp(min=1e-6)


def cosine_map(features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    return torch.einsum("chw,c->hw", F.normalize(features, dim=0), F.normalize(prototype, dim=0))


def random_affine(
    gen: torch.Generator, max_angle=15.0, scale=(0.8, 1.2), shift=0.1
) -> torch.Tensor:
    """A ``(2, 3)`` matrix for ``affine_grid``: flip, rotation, scale, translation."""
    u = torch.rand(5, generator=gen)
    angle = math.radians((2 * u[0].item() - 1) * max_angle)
    s = scale[0] + (scale[1] - scale[0]) * u[1].item()
    flip = -1.0 if u[2].item() < 0.5 else 1.0
    tx, ty = (2 * u[3].item() - 1) * shift * 2, (2 * u[4].item() - 1) * shift * 2
    c, n = math.cos(angle) / s, math.sin(angle) / s
    return torch.tensor([[c * flip, -n, tx], [n * flip, c, ty]], dtype=torch.float32)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply an affine map to ``(1, C, H, W)`` (zeros outside)."""
    grid = F.affine_grid(theta[None].to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def acc_loss(f_ref, m_ref, f_aug, m_aug, tau: float) -> torch.Tensor:
    """TTGA's augmentation-consistency loss on neck features ``(C, h, w)`` and coverages."""
    prototype = weighted_mean(f_ref, m_ref)
    s_aug = cosine_map(f_aug, prototype)
    loss = F.binary_cross_entropy_with_logits(s_aug / tau, m_aug)
    predicted = (s_aug > otsu_threshold(s_aug)).float()
    if predicted.sum() > 0:
        cycle = cosine_map(f_ref, weighted_mean(f_aug, predicted))
        loss = loss + F.binary_cross_entropy_with_logits(cycle / tau, m_ref)
    return loss


class CAVSAM(ReferenceSegmenter):
    """CAV-SAM with transformers' ``Sam2VideoModel`` (see the module docstring).

    Args:
        model: a ``Sam2VideoModel`` (e.g. from :func:`load_sam2_video`).
        transition: a name from :data:`~pivotseg.tasks.refseg.transitions.TRANSITIONS` or a
            generator callable (default ``concat``, the paper's best without DBST).
        num_transition_frames: frames between reference and target (7 in the paper).
        pseudo_label_frames: how many of the first transition frames get TTGA pseudo-labels.
        ttga_steps: neck fine-tuning steps (100 in the paper; 0 disables TTGA).
        ttga_lr: Adam learning rate, cosine-annealed.
        ttga_augmentations: size of the pool of augmented references.
        ttga_temperature: ``tau`` dividing the cosine similarities in the BCE losses.
        reference_prompt: ``"box"`` (paper) or ``"mask"`` for the reference frame(s).
        multi_shot: ``"separate"`` or ``"joint"`` (see the module docstring).
        seed: seeds the augmentations.
        show_progress: tqdm bars for TTGA.
    """

    name = "cav-sam"

    def __init__(
        self,
        model,
        transition: str | TransitionGenerator = "concat",
        num_transition_frames: int = 7,
        pseudo_label_frames: int = 4,
        ttga_steps: int = 100,
        ttga_lr: float = 1e-3,
        ttga_augmentations: int = 8,
        ttga_temperature: float = 0.1,
        reference_prompt: str = "box",
        multi_shot: str = "separate",
        seed: int = 0,
        show_progress: bool = False,
    ):
        from transformers import Sam2VideoModel

        if not isinstance(model, Sam2VideoModel):
            raise ConfigError(f"cav-sam needs a Sam2VideoModel, got {type(model).__name__}")
        if reference_prompt not in ("box", "mask"):
            raise ConfigError(f"reference_prompt must be 'box' or 'mask', not {reference_prompt!r}")
        if multi_shot not in ("separate", "joint"):
            raise ConfigError(f"multi_shot must be 'separate' or 'joint', not {multi_shot!r}")
        self.model = model.eval()
        self.transition = (
            build_transition(transition) if isinstance(transition, str) else transition
        )
        self.num_transition_frames = num_transition_frames
        self.pseudo_label_frames = pseudo_label_frames
        self.ttga_steps = ttga_steps
        self.ttga_lr = ttga_lr
        self.ttga_augmentations = ttga_augmentations
        self.ttga_temperature = ttga_temperature
        self.reference_prompt = reference_prompt
        self.multi_shot = multi_shot
        self.seed = seed
        self.show_progress = show_progress
        self.image_size = int(model.config.image_size)
        # TTGA tunes a copy of the neck, installed only while this method runs the model, so
        # the model itself (possibly shared) is never left modified.
        self.original_neck = model.vision_encoder.neck
        self.tuned_neck = self.original_neck
        self.references: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.prototypes: list[torch.Tensor] = []
        self.last_frames: list[np.ndarray] = []
        self.ttga_history: list[float] = []  # loss per TTGA step of the last fit

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----- pixels and features --------------------------------------------------------------
    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """SAM2 input ``(3, S, S)``: square resize, ImageNet normalisation."""
        s = self.image_size
        x = torch.from_numpy(resize_to(image, (s, s))).permute(2, 0, 1).float()
        mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def square_mask(self, mask: np.ndarray) -> torch.Tensor:
        """A bool mask resized like its image, ``(1, 1, S, S)`` float in [0, 1]."""
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None].to(self.device)
        return F.interpolate(m, (self.image_size,) * 2, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def trunk(self, pixels: torch.Tensor):
        return self.model.vision_encoder.backbone(pixels).intermediate_hidden_states

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Neck features ``(C, h, w)`` of one image's pixels ``(3, S, S)``."""
        return neck_embedding(self.model, self.trunk(pixels[None]))[0]

    def grid(self, square: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(1, 1, S, S)`` coverage -> ``(h, w)`` on the grid of ``like`` ``(C, h, w)``."""
        return F.adaptive_avg_pool2d(square, like.shape[-2:])[0, 0]

    @contextmanager
    def tuned(self) -> Iterator[None]:
        """Run the model with this method's (TTGA-tuned) neck."""
        encoder = self.model.vision_encoder
        encoder.neck = self.tuned_neck
        try:
            yield
        finally:
            encoder.neck = self.original_neck

    # ----- fit: TTGA and prototypes ---------------------------------------------------------
    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]) -> CAVSAM:
        pairs = check_references(ref_images, ref_masks)
        self.tuned_neck = self.original_neck
        if self.ttga_steps > 0:
            self.tuned_neck = copy.deepcopy(self.original_neck)
            with self.tuned():
                self.test_time_alignment(pairs)
        with torch.no_grad(), self.tuned():
            self.prototypes = []
            for image, mask in pairs:
                f = self.features(self.pixels(image))
                cells = object_cells(self.grid(self.square_mask(mask), f)).float()
                self.prototypes.append(weighted_mean(f, cells))
        self.references = pairs
        return self

    def test_time_alignment(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fine-tune the FPN neck on the references (TTGA, see the module docstring)."""
        gen = torch.Generator().manual_seed(self.seed)
        data = []
        for image, mask in pairs:
            pix, sq = self.pixels(image)[None], self.square_mask(mask)
            pool = []
            for _ in range(max(1, self.ttga_augmentations)):
                theta = random_affine(gen)
                pool.append((self.trunk(warp(pix, theta)), warp(sq, theta)))
            data.append((self.trunk(pix), sq, pool))
        neck = self.model.vision_encoder.neck
        params = list(neck.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.ttga_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.ttga_steps)
        steps = tqdm(range(self.ttga_steps), desc="cav-sam ttga", disable=not self.show_progress)
        self.ttga_history = []
        with torch.enable_grad():
            for _ in steps:
                loss = 0.0
                for trunk_ref, sq_ref, pool in data:
                    trunk_aug, sq_aug = pool[int(torch.randint(len(pool), (1,), generator=gen))]
                    f_ref = neck_embedding(self.model, trunk_ref)[0]
                    f_aug = neck_embedding(self.model, trunk_aug)[0]
                    loss = loss + acc_loss(
                        f_ref,
                        self.grid(sq_ref, f_ref),
                        f_aug,
                        self.grid(sq_aug, f_aug),
                        self.ttga_temperature,
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                self.ttga_history.append(float(loss.detach()))
        for p in params:
            p.requires_grad_(False)

    @torch.no_grad()
    def pseudo_label(self, frame: np.ndarray, prototype: torch.Tensor) -> np.ndarray | None:
        """``cos(F, p) > otsu`` on the grid, resized to the frame; None when degenerate."""
        sim = cosine_map(self.features(self.pixels(frame)), prototype)
        fg = (sim > otsu_threshold(sim)).float()[None, None]
        mask = F.interpolate(fg, frame.shape[:2], mode="bilinear", align_corners=False)[0, 0] > 0.5
        mask = mask.cpu().numpy()
        if not mask.any() or mask.all():
            return None
        return mask

    # ----- segment --------------------------------------------------------------------------
    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        if self.references is None:
            raise RuntimeError("cav-sam: call fit(ref_images, ref_masks) before segment")
        from pivotseg.tasks.refseg.predictor import check_image

        image = check_image(image)
        with self.tuned():
            if self.multi_shot == "joint" or len(self.references) == 1:
                prototype = torch.stack(self.prototypes).mean(0)
                logits, score = self.track(self.references, image, prototype)
            else:
                runs = [
                    self.track([ref], image, proto)
                    for ref, proto in zip(self.references, self.prototypes)
                ]
                logits = torch.stack([r[0] for r in runs]).mean(0)
                score = float(np.mean([r[1] for r in runs]))
        mask = F.interpolate(logits, image.shape[:2], mode="bilinear", align_corners=False) > 0
        mask = mask[0, 0].cpu().numpy()
        if score < 0.5 or not mask.any():
            return empty_mask(image), score
        return mask, score

    def build_video(self, references, target, prototype):
        """Frames and prompts: ``(frames, {frame_idx: ("box", box) | ("mask", mask)})``."""
        frames = [image for image, _ in references]
        prompts = {}
        for i, (_, mask) in enumerate(references):
            prompts[i] = (
                ("box", mask_box(mask)) if self.reference_prompt == "box" else ("mask", mask)
            )
        last_image, last_mask = references[-1]
        alphas = transition_alphas(self.num_transition_frames)
        transitions = list(self.transition(last_image, last_mask, target, alphas))
        for j, frame in enumerate(transitions[: self.pseudo_label_frames]):
            label = self.pseudo_label(frame, prototype)
            if label is not None:
                prompts[len(frames) + j] = ("mask", label)
        frames += transitions + [target]
        return frames, prompts

    @torch.no_grad()
    def track(self, references, target, prototype) -> tuple[torch.Tensor, float]:
        """Run SAM2 over the pseudo-video; the target frame's low-res logits and score."""
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        frames, prompts = self.build_video(references, target, prototype)
        self.last_frames = frames
        video = torch.stack([self.pixels(f) for f in frames])
        session = Sam2VideoInferenceSession(
            video=video,
            video_height=target.shape[0],
            video_width=target.shape[1],
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
        )
        obj = session.obj_id_to_idx(OBJECT_ID)
        s = self.image_size
        for idx in sorted(prompts):
            kind, value = prompts[idx]
            h, w = frames[idx].shape[:2]
            if kind == "box":
                corners = torch.tensor(value, dtype=torch.float32).view(1, 1, 2, 2)
                corners = corners * torch.tensor([s / w, s / h])
                # A box is two points labelled 2 and 3, as the transformers processor sends it.
                labels = torch.tensor([[[2, 3]]], dtype=torch.int32)
                session.add_point_inputs(
                    obj, idx, {"point_coords": corners.to(self.device), "point_labels": labels}
                )
            else:
                session.add_mask_inputs(obj, idx, (self.square_mask(value) > 0.5).float())
            session.obj_with_new_inputs = [OBJECT_ID]
            self.model(inference_session=session, frame_idx=idx)
        last = len(frames) - 1
        output = None
        for out in self.model.propagate_in_video_iterator(session, start_frame_idx=0):
            if out.frame_idx == last:
                output = out
        logits = output.pred_masks.float()[:1, :1].clone()
        score = float(torch.sigmoid(output.object_score_logits.float().flatten()[0]))
        return logits, score
