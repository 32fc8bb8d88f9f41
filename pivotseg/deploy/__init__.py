"""Deployment: export a trained segmenter to ONNX (:func:`export_onnx`, ``pivotseg export``) and
run it on ONNX Runtime (:class:`OnnxSegmenter`, ``--engine onnxruntime``); docs/deploy.md."""

from pivotseg.deploy.export import export_onnx, export_run
from pivotseg.deploy.onnx_runtime import OnnxSegmenter
from pivotseg.deploy.sidecar import read_sidecar, sidecar_path

__all__ = ["OnnxSegmenter", "export_onnx", "export_run", "read_sidecar", "sidecar_path"]
