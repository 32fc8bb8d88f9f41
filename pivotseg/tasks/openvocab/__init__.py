"""Language-driven segmentation with CLIP: training-free open-vocabulary segmentation
(MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP; see docs/openvocab.md). The CLIP text side lives
in :mod:`pivotseg.text` (FAMix uses it too); its public names are re-exported here."""

from pivotseg.tasks.openvocab.classes import parse_class_names
from pivotseg.tasks.openvocab.dense import VARIANTS, DenseClip, dense_last_block
from pivotseg.tasks.openvocab.pamr import PAMR
from pivotseg.tasks.openvocab.run import evaluate_dataset, predict_images
from pivotseg.tasks.openvocab.segmenter import OpenVocabSegmenter, load_clip
from pivotseg.text.encoder import ClipTextEncoder, load_openai_text_encoder, prompt_embeddings
from pivotseg.text.templates import FAMIX_STYLES, OPENAI_IMAGENET_TEMPLATES

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
