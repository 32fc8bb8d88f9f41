"""Open-vocabulary semantic segmentation with a frozen CLIP ViT, no training.

:class:`OpenVocabSegmenter` turns class names into text embeddings (OpenAI's 80 ImageNet
templates, averaged) and an image into dense CLIP patch embeddings with one of the
training-free last-block variants of :mod:`.dense`; the cosine similarity of the two, upsampled
to the image, scores every pixel. Sliding windows, optional keep-ratio resizing, PAMR refinement
(NACLIP) and a background rule (extra background prompts and/or a probability threshold) are
options.

Scores: ``query_scores`` are cosine similarities for every prompt (each class may have synonyms,
``"person; pedestrian"``, plus the background prompts); ``logits`` are
``logit_scale * cos`` reduced to one channel per class by the max over its synonyms (argmax =
the predicted class when no background rule applies); ``probabilities`` are the softmax over all
prompts (temperature ``1 / logit_scale``) reduced the same way, with the background as an extra
last channel when background prompts are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.errors import ConfigError
from pivotseg.tasks.openvocab.classes import parse_class_names
from pivotseg.tasks.openvocab.dense import DenseClip, check_variant, gaussian_sigma_ok
from pivotseg.tasks.openvocab.pamr import PAMR
from pivotseg.text.encoder import prompt_embeddings, text_encoder_from_backbone
from pivotseg.text.templates import resolve_templates

IGNORE_INDEX = 255
MODES = ("whole", "slide")


def load_clip(source) -> nn.Module:
    """A CLIP ViT backbone with its text tower from a hub id, a folder, or a built backbone.

    Raises:
        ConfigError: the source holds no text tower (one line naming the source).
    """
    from pivotseg.backbones import build_backbone
    from pivotseg.backbones.base import is_saved_folder

    if isinstance(source, nn.Module):
        backbone = source
    elif is_saved_folder(source):
        backbone = build_backbone(source=source)
    else:
        backbone = build_backbone("clip", source=source, with_text=True)
    if getattr(backbone, "name", None) != "clip":
        raise ConfigError(
            f"{source}: open-vocabulary segmentation needs a CLIP ViT, not a "
            f"{getattr(backbone, 'name', type(backbone).__name__)!r} backbone"
        )
    if not backbone.has_text:
        raise ConfigError(
            f"{source}: this CLIP holds only the vision tower; use a full CLIPModel source "
            "(e.g. openai/clip-vit-base-patch16) that includes the text tower"
        )
    return backbone.freeze().eval()


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


class OpenVocabSegmenter(nn.Module):
    """Training-free open-vocabulary segmenter (MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP).

    Args:
        clip: hub id / local folder of a full CLIP ViT (``CLIPModel`` with tokenizer files), a
            pivotseg ``clip`` backbone folder, or a built :class:`ClipBackbone` with text.
        variant: ``clip`` (unchanged CLIP), ``maskclip``, ``sclip``, ``clearclip``, ``naclip`` or
            ``proxyclip``.
        class_names: one entry per class; ``"a; b"`` gives a class two synonyms.
        background: prompts whose pixels become ``background_label`` (e.g. ``["background"]``).
        threshold: pixels whose highest probability is below this become ``background_label``.
        background_label: the label of background pixels (255 = ignore).
        templates: ``"imagenet"`` (OpenAI's 80), ``"single"`` or a list of ``{}`` templates.
        logit_scale: softmax temperature inverse; default: the variant's.
        mode: ``slide`` (windows of ``crop`` every ``stride`` pixels, overlaps averaged) or
            ``whole``.
        crop, stride: window size and step; default: the variant's (224/112; ProxyCLIP 336/112).
        batch_size: windows per forward.
        resize_short: resize images to this short side before inference (labels keep their
            size: scores are resized back).
        pamr: PAMR refinement (default: on for naclip only); ``pamr_iterations`` and
            ``pamr_dilations`` as NACLIP (10; 8 and 16).
        sigma: NACLIP's Gaussian width in patches.
        vfm: ProxyCLIP's second vision model: a backbone name (``dinov2``) built from
            ``vfm_source``, or a built pivotseg backbone.
        beta, gamma: ProxyCLIP's constants.
        text_embeddings: precomputed ``(num_prompts, D)`` embeddings in prompt order (class
            synonyms, then background); skips the text tower.
    """

    def __init__(
        self,
        clip,
        variant: str = "naclip",
        class_names: Sequence[str] = (),
        *,
        background: Sequence[str] = (),
        threshold: float = 0.0,
        background_label: int = IGNORE_INDEX,
        templates: str | Sequence[str] = "imagenet",
        logit_scale: float | None = None,
        mode: str = "slide",
        crop: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        batch_size: int = 4,
        resize_short: int | None = None,
        pamr: bool | None = None,
        pamr_iterations: int = 10,
        pamr_dilations: Sequence[int] = (8, 16),
        sigma: float = 5.0,
        vfm=None,
        vfm_source: str | None = None,
        beta: float = 1.2,
        gamma: float = 3.0,
        text_embeddings: torch.Tensor | None = None,
    ):
        super().__init__()
        spec = check_variant(variant)
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"threshold={threshold}: give a probability between 0 and 1")
        self.classes = parse_class_names(list(class_names), "classes")
        self.background = parse_class_names(list(background), "background") if background else []
        taken = {n.lower() for names in self.classes for n in names}
        clash = [n for names in self.background for n in names if n.lower() in taken]
        if clash:
            raise ConfigError(
                f"background: {clash[0]!r} is also a class name; a prompt may be either"
            )
        self.variant = variant
        self.threshold = float(threshold)
        self.background_label = int(background_label)
        self.logit_scale = float(logit_scale if logit_scale is not None else spec.logit_scale)
        self.mode = mode
        self.crop = _pair(crop if crop is not None else spec.crop)
        self.stride = _pair(stride if stride is not None else spec.stride)
        self.batch_size = int(batch_size)
        self.resize_short = resize_short
        self.pamr = (
            PAMR(pamr_iterations, pamr_dilations) if (spec.pamr if pamr is None else pamr) else None
        )

        backbone = load_clip(clip)
        vfm_model = None
        if variant == "proxyclip":
            vfm_model = self._load_vfm(vfm, vfm_source)
        self.dense = DenseClip(
            backbone, variant, gaussian_sigma_ok(sigma), vfm_model, beta=beta, gamma=gamma
        )
        prompts = [n for names in self.classes for n in names] + [
            n for names in self.background for n in names
        ]
        owner = [i for i, names in enumerate(self.classes) for _ in names]
        owner += [len(self.classes)] * sum(len(names) for names in self.background)
        if text_embeddings is None:
            encoder = text_encoder_from_backbone(backbone)
            text_embeddings = prompt_embeddings(
                encoder, prompts, resolve_templates(templates), normalize_each=True
            )
        elif tuple(text_embeddings.shape) != (len(prompts), self.dense.clip.model.projection_dim):
            raise ConfigError(
                f"text_embeddings: expected shape ({len(prompts)}, "
                f"{self.dense.clip.model.projection_dim}), got {tuple(text_embeddings.shape)}"
            )
        self.prompts = prompts
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1), persistent=False)
        self.register_buffer("prompt_owner", torch.tensor(owner), persistent=False)
        self.eval()

    @staticmethod
    def _load_vfm(vfm, vfm_source):
        from pivotseg.backbones import build_backbone

        if vfm is None:
            raise ConfigError(
                "proxyclip: give a second vision model (vfm='dinov2' with vfm_source, or a "
                "built backbone)"
            )
        model = build_backbone(vfm, source=vfm_source) if isinstance(vfm, str) else vfm
        if not model.blocks:
            raise ConfigError(f"proxyclip: vfm {model.name!r} has no transformer blocks")
        return model.freeze().eval()

    # ----- properties ---------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """The first name of each class."""
        return [names[0] for names in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_background_rule(self) -> bool:
        return bool(self.background) or self.threshold > 0.0

    # ----- scores -------------------------------------------------------------------------------
    def _window_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine maps ``(N, Q, h, w)`` of 0-255 crops, at the crop size."""
        p = self.dense.patch_size
        h, w = images.shape[-2:]
        mean = self.dense.clip_mean
        # Pad with the mean colour (zero after normalisation) to whole patches, as the
        # segmenter's padding does.
        x = F.pad(images - mean, (0, -w % p, 0, -h % p)) + mean
        emb = self.dense(x)
        cos = torch.einsum("bdhw,qd->bqhw", emb, self.text.to(emb))
        cos = F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return cos[..., :h, :w]

    @torch.no_grad()
    def query_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every pixel to every prompt, ``(B, Q, H, W)``.

        Args:
            images: float ``(B, 3, H, W)`` RGB on the 0-255 scale.
        """
        from pivotseg.evaluation import slide_inference

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"open-vocab: expected images (B, 3, H, W), got {tuple(images.shape)}")
        images = images.float().to(self.text.device)
        size = tuple(images.shape[-2:])
        x = images
        if self.resize_short is not None:
            scale = self.resize_short / min(size)
            new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            x = F.interpolate(images, size=new, mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        if self.mode == "slide" and (h > self.crop[0] or w > self.crop[1]):
            crop = (min(self.crop[0], h), min(self.crop[1], w))
            scores = slide_inference(
                self._window_scores, x, len(self.prompts), crop, self.stride, self.batch_size
            )
        else:
            scores = self._window_scores(x)
        if tuple(scores.shape[-2:]) != size:
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        if self.pamr is not None:
            mean, std = self.dense.clip_mean, self.dense.clip_std
            scores = self.pamr((images - mean) / std, scores)
        return scores

    def _per_class(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """Max over the prompts of each of ``count`` owners: ``(B, Q, ...) -> (B, count, ...)``."""
        out = values.new_full((values.shape[0], count, *values.shape[2:]), float("-inf"))
        index = self.prompt_owner.to(values.device).view(1, -1, *([1] * (values.ndim - 2)))
        index = index.expand(values.shape[0], -1, *values.shape[2:])
        owned = index < count
        return out.scatter_reduce(
            1, index.clamp(max=count - 1), values.masked_fill(~owned, float("-inf")), "amax"
        )

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``logit_scale * cos``, max over each class's synonyms: ``(B, K, H, W)``."""
        return self._per_class(self.query_scores(images) * self.logit_scale, self.num_classes)

    @torch.no_grad()
    def probabilities(
        self, images: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax over all prompts, max per class: ``(B, K, H, W)``, or ``(B, K + 1, H, W)``
        with the background as the last channel when background prompts are given."""
        if scores is None:
            scores = self.query_scores(images)
        probs = (scores * self.logit_scale).softmax(dim=1)
        count = self.num_classes + (1 if self.background else 0)
        return self._per_class(probs, count)

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """Label maps ``(B, H, W)`` int64: class indices, ``background_label`` for background."""
        probs = self.probabilities(images)
        top, labels = probs.max(dim=1)
        background = labels >= self.num_classes
        if self.threshold > 0:
            background |= top < self.threshold
        return labels.masked_fill(background, self.background_label)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map ``(H, W)`` int64 of one ``uint8`` RGB image ``(H, W, 3)``."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"open-vocab: expected an RGB image (H, W, 3), got {image.shape}")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float()
        return self.predict_labels(pixels)[0].cpu().numpy()

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, classes={self.num_classes}, mode={self.mode!r}, "
            f"crop={self.crop}, stride={self.stride}, logit_scale={self.logit_scale}, "
            f"pamr={self.pamr is not None}"
        )
