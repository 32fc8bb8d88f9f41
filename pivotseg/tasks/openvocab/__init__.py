"""Language-driven segmentation with CLIP: training-free open-vocabulary segmentation
(MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP) and FAMix style mining (see docs/openvocab.md
and docs/famix.md)."""

from pivotseg.tasks.openvocab.dense import VARIANTS, DenseClip, dense_last_block
from pivotseg.tasks.openvocab.pamr import PAMR
from pivotseg.tasks.openvocab.run import evaluate_dataset, predict_images
from pivotseg.tasks.openvocab.segmenter import OpenVocabSegmenter, load_clip
from pivotseg.tasks.openvocab.templates import FAMIX_STYLES, OPENAI_IMAGENET_TEMPLATES
from pivotseg.tasks.openvocab.text import (
    ClipTextEncoder,
    load_openai_text_encoder,
    parse_class_names,
    prompt_embeddings,
)

__all__ = [
    "FAMIX_STYLES",
    "OPENAI_IMAGENET_TEMPLATES",
    "PAMR",
    "VARIANTS",
    "ClipTextEncoder",
    "DenseClip",
    "OpenVocabSegmenter",
    "dense_last_block",
    "evaluate_dataset",
    "load_clip",
    "load_openai_text_encoder",
    "parse_class_names",
    "predict_images",
    "prompt_embeddings",
]
