"""Converters from checkpoint layouts the field has released into layouts pivotseg loads.

* :mod:`~pivotseg.backbones.convert.dinov2_pth`: facebookresearch/dinov2 ``.pth`` backbones ->
  a transformers ``Dinov2Model`` folder (``pivotseg weights import-dinov2``).
* :mod:`~pivotseg.backbones.convert.rein`: Rein's mmseg checkpoints (DINOv2 + Rein +
  Mask2Former) -> a pivotseg run folder (``pivotseg weights import-rein``), with the
  Mask2Former part in :mod:`~pivotseg.backbones.convert.mmdet_mask2former`.

Files are read by :mod:`~pivotseg.backbones.convert.read`: ``torch.load(weights_only=True)``
for ``.pth`` (never a full unpickle) or safetensors.
"""
