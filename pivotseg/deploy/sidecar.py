"""The JSON sidecar of an exported segmenter: what a runtime needs besides the graph.

``FILE.onnx`` holds the graph and its weights; ``FILE.json`` beside it holds the classes and
their colours, the pixel normalisation (applied inside the graph, listed for padding and for
other runtimes), the input size policy (one fixed ``[H, W]``, or any multiple of
``size_multiple``), the run's evaluation resize and inference section, the segmenter config and
the SHA-256 of the ONNX file, so that a sidecar is never read for another export. Layout::

    {"format": "pivotseg-onnx", "version": 1, "onnx_sha256": ...,
     "classes": [...] or null, "num_classes": K, "palette": [[r, g, b], ...],
     "input": {"name", "layout", "size": [H, W] or null, "dynamic", "size_multiple",
               "min_side", "max_batch"},
     "normalisation": {"mean": [3], "std": [3], "scale": "0-255", "in_graph": true},
     "output": {"name", "kind": "logits" | "argmax"},
     "resize": {"eval_resize_short", "max_size"} (the run's data section),
     "eval": {mode, crop, stride, batch_size, tta_scales, tta_flip} (the run's eval section;
              the last two absent in older sidecars: no test-time augmentation),
     "segmenter": {segmenter.json}, "export": {source, exporter, versions, opset, check}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pivotseg.errors import CheckpointError

FORMAT = "pivotseg-onnx"
VERSION = 1
REQUIRED = ("onnx_sha256", "num_classes", "palette", "input", "normalisation", "output")
REQUIRED += ("resize", "eval", "segmenter")


def sidecar_path(onnx_path: str | Path) -> Path:
    """``FILE.json`` beside ``FILE.onnx``."""
    return Path(onnx_path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar of ``onnx_path``, checked against the file.

    Raises:
        CheckpointError: the ONNX file or its sidecar is missing, the sidecar is not one of
            ours (or of a newer version), lacks a key, or was written for another ONNX file.
    """
    onnx_path = Path(onnx_path)
    side = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"{onnx_path}: no such ONNX file; check the path")
    if not side.is_file():
        raise CheckpointError(
            f"{onnx_path}: no sidecar {side.name} beside it, so its classes, normalisation and "
            "input size are unknown; export with `pivotseg export RUN --format onnx --out "
            f"{onnx_path.name}` (it writes both) or put the .json it came with next to it"
        )
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{side}: unreadable sidecar ({err}); export again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f'{side}: not a pivotseg ONNX sidecar (no "format": "{FORMAT}"); export with '
            "`pivotseg export`"
        )
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise CheckpointError(
            f"{side}: sidecar version {data.get('version')!r}, this pivotseg reads up to "
            f"{VERSION}; upgrade pivotseg or export again with this one"
        )
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise CheckpointError(f"{side}: lacks {', '.join(missing)}; export again")
    if file_sha256(onnx_path) != data["onnx_sha256"]:
        raise CheckpointError(
            f"{side}: written for another ONNX file than {onnx_path.name} (SHA-256 differs); "
            "keep each export's .onnx and .json together, or export again"
        )
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
