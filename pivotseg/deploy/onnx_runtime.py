"""Run an exported segmenter on ONNX Runtime with the eager segmenter's inference interface.

:class:`OnnxSegmenter` is called like :class:`~pivotseg.segmenter.Segmenter` (0-255 images
``(B, 3, H, W)`` in, logits ``(B, K, H, W)`` out), has its ``config`` and ``predict(image)``,
so whole and sliding-window inference, ``pivotseg predict`` and ``pivotseg eval`` take either.
Everything besides the graph comes from the sidecar (:mod:`pivotseg.deploy.sidecar`); a file
without one is refused.

Input sizes: a ``--dynamic`` export takes multiples of the backbone's size divisor, so other
sizes are padded bottom/right with the normalisation mean (which the graph normalises to the
eager model's zero padding) and the logits cropped back: the eager model's arithmetic. A
fixed-size export takes its size only; its default inference is sliding windows of that size.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pivotseg.deploy.sidecar import read_sidecar
from pivotseg.errors import ConfigError

ENGINES = ("torch", "onnxruntime")


class OnnxSegmenter:
    """An exported segmenter (``FILE.onnx`` + ``FILE.json``) on ONNX Runtime.

    Args:
        path: the ``.onnx`` file; its sidecar must be beside it.
        threads: ONNX Runtime's intra-op threads (default: its own choice, the cores).
        providers: execution providers (default: CPU).

    Attributes:
        config: the :class:`~pivotseg.segmenter.SegmenterConfig` it was exported from.
        sidecar: the sidecar's content.
        size: the fixed ``(H, W)``, or ``None`` for a dynamic export.

    Raises:
        CheckpointError: the file or its sidecar is missing or they do not belong together.
        ConfigError: an ``--output argmax`` export (it gives labels, not the logits that
            inference here averages and resizes), or onnxruntime is not installed.
    """

    training = False

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        from pivotseg.segmenter import SegmenterConfig

        self.path = Path(path)
        self.sidecar = read_sidecar(self.path)
        if self.sidecar["output"]["kind"] != "logits":
            raise ConfigError(
                f"{self.path}: exported with --output {self.sidecar['output']['kind']}, which "
                "gives class indices for other runtimes; pivotseg's inference needs logits: "
                "export with --output logits"
            )
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "the onnxruntime engine needs onnxruntime; `pip install pivotseg[export]`"
            ) from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        spec = self.sidecar["input"]
        self.input_name = spec["name"]
        self.output_name = self.sidecar["output"]["name"]
        self.size = tuple(spec["size"]) if spec["size"] is not None else None
        self.size_multiple = int(spec["size_multiple"])
        self.min_side = int(spec["min_side"])
        self.max_batch = int(spec["max_batch"])
        norm = self.sidecar["normalisation"]
        self.pixel_mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.config = SegmenterConfig.from_dict(self.sidecar["segmenter"], where=str(self.path))

    # ----- as a module ----------------------------------------------------------------------
    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.sidecar["palette"], dtype=np.uint8)

    def eval(self) -> OnnxSegmenter:
        return self

    def train(self, mode: bool = True) -> OnnxSegmenter:
        if mode:
            raise ConfigError(f"{self.path}: an ONNX export does not train; use the run folder")
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` (float32, on the images' device) of ``(B, 3, H, W)``
        images on the 0-255 scale."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"segmenter: expected images (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        pixels = images.detach().to("cpu", torch.float32)
        if self.size is not None:
            if (h, w) != self.size:
                raise ConfigError(
                    f"{self.path}: takes {self.size[0]}x{self.size[1]} images (exported with "
                    f"--size), got {h}x{w}; segment in slide mode with --crop {self.size[0]} "
                    f"{self.size[1]}, or export with --dynamic"
                )
        else:
            pixels = self._pad(pixels)
        out = [
            self.session.run([self.output_name], {self.input_name: chunk.numpy()})[0]
            for chunk in pixels.split(self.max_batch)
        ]
        logits = torch.from_numpy(np.concatenate(out))[..., :h, :w]
        return logits.to(images.device)

    forward = __call__

    def _pad(self, pixels: torch.Tensor) -> torch.Tensor:
        """Bottom/right to multiples of the size divisor, with the mean colour."""
        b, _, h, w = pixels.shape
        d = self.size_multiple
        full_h, full_w = h + (-h % d), w + (-w % d)
        if min(full_h, full_w) < max(self.min_side, 2 * d):
            raise ConfigError(
                f"{self.path}: images of at least {max(self.min_side, 2 * d)} pixels a side, "
                f"got {h}x{w}; enlarge them (predict does so for small images)"
            )
        if (full_h, full_w) == (h, w):
            return pixels
        # Filled, not added and subtracted: x - mean + mean is not always x in float32.
        padded = self.pixel_mean.expand(b, 3, full_h, full_w).clone()
        padded[..., :h, :w] = pixels
        return padded

    # ----- inference settings and one image -------------------------------------------------
    def inference_settings(
        self,
        mode: str | None = None,
        crop: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        resize_short: int | None = None,
        max_long: int | None = None,
        batch_size: int | None = None,
        limit: int | str | None = None,
    ):
        """``(EvalConfig, ResizePolicy)``: the run's inference and evaluation resize from the
        sidecar, with the given overrides, as
        :func:`pivotseg.tasks.dgss.predict.inference_settings` gives the eager model.

        A fixed-size export runs in sliding windows of its size unless ``mode`` says
        otherwise (the run's stride when its windows had that size, else two thirds of it).

        Raises:
            ConfigError: slide windows of another size than a fixed export's, or smaller
                than the model's minimum side.
        """
        from pivotseg.config import EvalConfig
        from pivotseg.tasks.dgss.evaluate import eval_config_for
        from pivotseg.tasks.dgss.predict import ResizePolicy

        stored = EvalConfig(**self.sidecar["eval"])
        if self.size is not None and mode is None:
            if stored.mode != "slide" or tuple(stored.crop) != self.size:
                stored.stride = [math.ceil(2 * s / 3) for s in self.size]
            stored.mode, stored.crop = "slide", list(self.size)
        eval_cfg = eval_config_for(
            SimpleNamespace(eval=stored), mode, crop, stride, batch_size, limit
        )
        if eval_cfg.mode == "slide":
            if self.size is not None and tuple(eval_cfg.crop) != self.size:
                raise ConfigError(
                    f"slide window {eval_cfg.crop[0]}x{eval_cfg.crop[1]}: {self.path.name} "
                    f"takes {self.size[0]}x{self.size[1]} images; pass --crop {self.size[0]} "
                    f"{self.size[1]}"
                )
            if min(eval_cfg.crop) < self.min_side:
                raise ConfigError(
                    f"slide window {eval_cfg.crop[0]}x{eval_cfg.crop[1]} (--crop, else the "
                    f"run's eval.crop): this model needs windows of at least {self.min_side} "
                    f"pixels; pass --crop {self.min_side} or larger"
                )
        # The run's data.eval_resize_short and data.max_size, overridden as resize_policy_for.
        resize = self.sidecar["resize"]
        short = resize["eval_resize_short"] if resize_short is None else resize_short or None
        if max_long is None:
            max_long = resize["max_size"] if short is None else None
        return eval_cfg, ResizePolicy(short, max_long or None, self.min_side)

    def predict(
        self,
        image,
        *,
        probabilities: bool = True,
        mode: str | None = None,
        crop: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        resize_short: int | None = None,
        max_long: int | None = None,
    ):
        """Segment one image as :meth:`pivotseg.segmenter.Segmenter.predict` does (same
        arguments, same :class:`~pivotseg.tasks.dgss.predict.Prediction`)."""
        from pivotseg.tasks.dgss.predict import Prediction, image_array, segment

        pixels = image_array(image)
        eval_cfg, policy = self.inference_settings(mode, crop, stride, resize_short, max_long)
        result = segment(self, pixels, eval_cfg, policy, "cpu", probabilities)
        return Prediction(result.labels.astype(np.int64), result.probabilities)


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def check_engine(checkpoint: str | Path, engine: str | None) -> str:
    """The engine to run ``checkpoint`` on: ``onnxruntime`` for an ``.onnx`` file, else
    ``torch``, unless given.

    Raises:
        ConfigError: an unknown engine, or an ``.onnx`` file with ``--engine torch``.
    """
    if engine is None:
        return "onnxruntime" if is_onnx_file(checkpoint) else "torch"
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "torch" and is_onnx_file(checkpoint):
        raise ConfigError(
            f"{checkpoint}: an ONNX export runs on --engine onnxruntime; for torch give the run "
            "folder it was exported from"
        )
    return engine


def open_onnx_model(
    checkpoint: str | Path, backbone_source: str | None = None, threads: int | None = None
) -> OnnxSegmenter:
    """An :class:`OnnxSegmenter` of an ``.onnx`` file, or of a run / checkpoint folder
    exported first (dynamic sizes, so every image size runs) into a temporary folder."""
    if is_onnx_file(checkpoint):
        return OnnxSegmenter(checkpoint, threads=threads)
    from pivotseg.deploy.export import export_run

    with tempfile.TemporaryDirectory(prefix="pivotseg-onnx-") as tmp:
        out = export_run(checkpoint, Path(tmp) / "segmenter.onnx", backbone_source=backbone_source)
        # The session holds the graph in memory: the file may go with the folder.
        return OnnxSegmenter(out, threads=threads)
