"""Text encoding, a model component beside the backbones: the CLIP text tower (transformers'
``CLIPModel`` or an OpenAI-layout checkpoint in ``CLIPTextModelWithProjection``), its tokenizer,
prompt templates and prompt-ensemble embeddings.

Used by the open-vocabulary segmentation task (``pivotseg ovseg``) and by FAMix's style mining
(:mod:`pivotseg.tuning.famix.mining`). It imports neither, so both depend on it and not on each
other. The OpenAI text-tower weight conversion stays with the other checkpoint layouts in
:mod:`pivotseg.backbones.convert.openai_clip_text`.
"""
