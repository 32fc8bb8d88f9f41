"""Export a trained segmenter (backbone + tuning method + head) to ONNX, with its sidecar.

The graph comes from ``torch.export.export`` (non-strict) handed to ``torch.onnx.export``
(the dynamo exporter, onnxscript's ATen-to-ONNX translation); nothing is written by hand. We
call ``torch.export`` ourselves rather than let ``torch.onnx.export`` do it because, when the
input sizes cannot stay free, the latter falls back to a draft export that silently fixes them
at the example's size.

What the graph takes: float32 ``(B, 3, H, W)`` RGB on the 0-255 scale; normalisation is inside.

* ``size=(H, W)``: exactly that size (any ``B`` up to :data:`MAX_BATCH`); the eager model's own
  bottom/right padding to the backbone's size divisor is part of the graph.
* ``size=None`` (dynamic, the default): any ``H`` and ``W`` that are multiples of the backbone's
  size divisor ``d`` (at least the model's minimum side). Free sizes with the eager model's ``-h % d``
  padding inside leave guards the exporter cannot prove for every size, so that padding moves
  to the runtime (:class:`~pivotseg.deploy.onnx_runtime.OnnxSegmenter` pads with the mean
  colour, which normalises to the eager model's zero padding, and crops the logits).

LoRA is merged into the projections it adapts for the export (``W + B A * alpha / r``), so the
graph has the frozen model's operators; the model passed in is left as it was. Every export is
checked: ONNX Runtime's output on seeded random images must equal the eager model's within
:data:`TOLERANCE` (max absolute logit difference), or nothing is written.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pivotseg.deploy.sidecar import FORMAT, VERSION, file_sha256, sidecar_path, write_json
from pivotseg.errors import CheckpointError, ConfigError

OUTPUTS = ("logits", "argmax")
INPUT_NAME = "images"
MAX_BATCH = 64
MAX_SIDE = 8192
TOLERANCE = 1e-3
# Above this many bytes of weights the graph keeps them in FILE.onnx.data (protobuf's 2 GB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000


class _Graph(nn.Module):
    """The exported function: logits, or their arg-max over classes."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return logits if self.output == "logits" else logits.argmax(1)


def require_export_packages() -> None:
    """onnx, onnxscript and onnxruntime, or a ConfigError naming the extra to install."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}; install them with "
            "`pip install pivotseg[export]`"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` (or ``"512"``) -> ``(512, 1024)``."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--size {text!r}: give HxW in pixels, e.g. 512x1024 (or 512)")
    return size  # type: ignore[return-value]


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Within the block, each peft LoRA Linear is replaced by one ``nn.Linear`` holding
    ``W + delta`` of its active adapters; afterwards the LoRA modules are put back untouched.
    Yields how many layers were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no LoRA layers either
        yield 0
        return
    swaps = []
    try:
        for name, module in list(model.named_modules()):
            base = module.get_base_layer() if isinstance(module, LoraLayer) else None
            if not isinstance(base, nn.Linear):
                continue
            merged = nn.Linear(
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
            with torch.no_grad():
                weight = base.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter).to(weight.dtype)
                merged.weight.copy_(weight)
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, merged)
            swaps.append((parent, leaf, module))
        yield len(swaps)
    finally:
        for parent, leaf, module in reversed(swaps):
            setattr(parent, leaf, module)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Without the exporter's notes that need no action here (torchvision's operators are not
    registered, a pytree deprecation inside torch.export, tensors cached during tracing)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            # DPFT's loss caches, emptied after tracing (_clear_trace_caches)
            warnings.filterwarnings("ignore", message="The tensor attributes .* during export")
            yield
    finally:
        registration.setLevel(level)


def _clear_trace_caches(model: nn.Module) -> None:
    # Tuning methods cache block tokens for their losses (DPFT's pivot and presence caches);
    # after tracing those would hold the tracer's fake tensors.
    for module in model.modules():
        for key, value in vars(module).items():
            if key.endswith("_cache") and isinstance(value, dict):
                value.clear()


def _seeded_images(batch: int, size: Sequence[int], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, size=(batch, 3, *size)).astype(np.float32)
    return torch.from_numpy(pixels)


def _dynamic_shapes(multiple: int, min_side: int) -> tuple[dict[int, Any], ...]:
    dim = torch.export.Dim
    low = max(2, math.ceil(min_side / multiple))
    high = MAX_SIDE // multiple
    # Sides as multiples of d: the divisibility guards of the backbone then hold by construction.
    return (
        {
            0: dim("batch", min=1, max=MAX_BATCH),
            2: multiple * dim("height_blocks", min=low, max=high),
            3: multiple * dim("width_blocks", min=low, max=high),
        },
    )


def _example_size(multiple: int, min_side: int) -> tuple[int, int]:
    """An unremarkable example size for a dynamic export: a few blocks over the minimum, two
    different odd counts, so no branch of the model is taken because a side is 1, even or
    square."""
    low = max(2, math.ceil(min_side / multiple))
    return multiple * (low + 3 + (low % 2)), multiple * (low + 5 + (low % 2))


def _trace(graph: _Graph, example: torch.Tensor, shapes, label: str, dynamic: bool):
    try:
        return torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as err:  # torch raises several kinds for shapes it cannot keep free
        if not dynamic:
            raise
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ConfigError(
            f"--dynamic: {label} cannot be exported with free input sizes ({first[:200]}); "
            "export at a fixed --size HxW instead"
        ) from None


def _onnx_symbols(path: Path) -> list[str | int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _check(model: nn.Module, path: Path, output: str, inputs: list[torch.Tensor]) -> dict:
    """Run ``path`` on ONNX Runtime and the eager ``model`` (the exported :class:`_Graph`) on
    ``inputs``; the largest difference.

    Raises:
        CheckpointError: logits differ by more than :data:`TOLERANCE` (labels: more than that
            share of pixels differ).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_name = session.get_outputs()[0].name
    worst = 0.0
    for images in inputs:
        with torch.no_grad():
            eager = model(images)
        got = session.run([out_name], {INPUT_NAME: images.numpy()})[0]
        if output == "logits":
            worst = max(worst, float(np.abs(got - eager.numpy()).max()))
        else:
            worst = max(worst, float((got != eager.numpy()).mean()))
    if worst > TOLERANCE:
        what = "max |logit difference|" if output == "logits" else "share of labels differing"
        raise CheckpointError(
            f"the ONNX graph does not reproduce the eager model ({what} {worst:.2e} > "
            f"{TOLERANCE}); nothing was written; report it with the run's segmenter.json"
        )
    shapes = [list(t.shape) for t in inputs]
    key = "max_abs_logit_diff" if output == "logits" else "share_labels_differing"
    return {key: worst, "inputs": shapes, "tolerance": TOLERANCE, "runtime": ort.__version__}


def _targets(out: Path, external: bool) -> list[Path]:
    return [out, sidecar_path(out)] + ([out.with_name(out.name + ".data")] if external else [])


def _refuse_existing(targets: list[Path], overwrite: bool) -> None:
    from pivotseg.outputs import check_output_file

    for target in targets:
        check_output_file(target, "--out")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{', '.join(str(t) for t in existing)}: exists already; pass --overwrite to replace "
            "it or choose another --out"
        )


def export_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    size: Sequence[int] | None = None,
    output: str = "logits",
    run_config=None,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (a :class:`~pivotseg.segmenter.Segmenter`) to ``out`` + its sidecar.

    Args:
        model: the segmenter; put in eval mode, left otherwise as it was.
        out: the ``.onnx`` file; the sidecar is ``out`` with ``.json``.
        size: fixed ``(H, W)`` input size; ``None``: any size that is a multiple of the
            backbone's size divisor (the runtime pads others).
        output: ``logits`` (``(B, K, H, W)`` float32) or ``argmax`` (``(B, H, W)`` int64).
        run_config: the training run's config, for the evaluation resize and inference
            section the sidecar records (default: ``model.run_config`` when set).
        source: what was exported (a checkpoint folder), recorded in the sidecar.
        overwrite: replace existing files (otherwise an existing one stops the export).

    Returns:
        The ONNX file.

    Raises:
        ConfigError: bad settings, existing files, a model that cannot take free sizes.
        CheckpointError: the graph does not reproduce the eager model (nothing is written).
    """
    from pivotseg.config import DataConfig
    from pivotseg.tasks.dgss.evaluate import eval_config_for
    from pivotseg.tasks.dgss.predict import min_input_side, palette_for

    require_export_packages()
    if output not in OUTPUTS:
        raise ConfigError(f"--output {output!r}: use one of {', '.join(OUTPUTS)}")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out}: give a file name ending in .onnx")
    if run_config is None:
        run_config = getattr(model, "run_config", None)
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = params > EXTERNAL_DATA_BYTES
    _refuse_existing(_targets(out, external), overwrite)

    multiple = int(model.backbone.size_divisor)
    min_side = min_input_side(model)
    dynamic = size is None
    if size is not None:
        size = [int(s) for s in size]
        if min(size) < min_side:
            raise ConfigError(
                f"--size {size[0]}x{size[1]}: this model needs sides of at least {min_side} "
                "pixels; give a larger size"
            )
    c = model.config
    label = f"{c.backbone}/{c.method}/{c.head}"

    was_training = model.training
    model.eval()
    try:
        with merged_lora(model) as merged:
            graph = _Graph(model, output).eval()
            if dynamic:
                example = _seeded_images(2, _example_size(multiple, min_side), seed=1)
                shapes = _dynamic_shapes(multiple, min_side)
            else:
                example = _seeded_images(2, size, seed=1)
                shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
            with torch.no_grad(), _quiet_exporter():
                program = _trace(graph, example, shapes, label, dynamic)
                _clear_trace_caches(model)
                onnx_program = torch.onnx.export(
                    program,
                    (example,),
                    dynamo=True,
                    verbose=False,
                    input_names=[INPUT_NAME],
                    output_names=[output if output == "logits" else "labels"],
                )
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pivotseg-export-") as tmp:
                staged = Path(tmp) / out.name
                onnx_program.save(str(staged), external_data=external)
                symbols = _onnx_symbols(staged)
                if dynamic and any(isinstance(s, int) for s in symbols[2:]):
                    raise ConfigError(
                        f"--dynamic: {label} was exported with a fixed input size {symbols}; "
                        "export at a fixed --size HxW instead"
                    )
                if dynamic:
                    low = _example_size(multiple, min_side)
                    checks = [
                        _seeded_images(1, low, seed=2),
                        _seeded_images(2, (low[1] + multiple, low[0]), seed=3),
                    ]
                else:
                    checks = [_seeded_images(1, size, seed=2)]
                check = _check(graph, staged, output, checks)
                _clear_trace_caches(model)
                eval_cfg = eval_config_for(run_config)
                data_cfg = run_config.data if run_config is not None else DataConfig()
                palette = palette_for(c.class_names, c.num_classes)
                data = {
                    "format": FORMAT,
                    "version": VERSION,
                    "onnx_sha256": file_sha256(staged),
                    "classes": list(c.class_names) if c.class_names else None,
                    "num_classes": c.num_classes,
                    "palette": palette.tolist(),
                    "input": {
                        "name": INPUT_NAME,
                        "layout": "NCHW float32 RGB, 0-255",
                        "size": size,
                        "dynamic": bool(dynamic),
                        "size_multiple": multiple,
                        "min_side": min_side,
                        "max_batch": MAX_BATCH,
                    },
                    "normalisation": {
                        "mean": model.pixel_mean.flatten().tolist(),
                        "std": model.pixel_std.flatten().tolist(),
                        "scale": "0-255",
                        "in_graph": True,
                    },
                    "output": {"name": _output_name(staged), "kind": output},
                    "resize": {
                        "eval_resize_short": data_cfg.eval_resize_short,
                        "max_size": data_cfg.max_size,
                    },
                    "eval": {
                        "mode": eval_cfg.mode,
                        "crop": list(eval_cfg.crop),
                        "stride": list(eval_cfg.stride),
                        "batch_size": eval_cfg.batch_size,
                        "tta_scales": list(eval_cfg.tta_scales),
                        "tta_flip": eval_cfg.tta_flip,
                    },
                    "segmenter": _segmenter_dict(model),
                    "export": {
                        "source": source,
                        "exporter": "torch.export.export(strict=False) + "
                        "torch.onnx.export(dynamo=True)",
                        "torch": torch.__version__,
                        "onnxscript": _version("onnxscript"),
                        "onnx": _version("onnx"),
                        "opset": _opset(staged),
                        "lora_layers_merged": merged,
                        "check": check,
                    },
                }
                staged_json = Path(tmp) / sidecar_path(out).name
                write_json(staged_json, data)
                for path in Path(tmp).iterdir():
                    os.replace(path, out.parent / path.name)
    finally:
        _clear_trace_caches(model)
        model.train(was_training)
    return out


def _output_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.output[0].name


def _segmenter_dict(model: nn.Module) -> dict:
    data = model.config.to_dict()
    data["method_args"] = {**model.tuning.config(), **data["method_args"]}
    return data


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def export_run(
    checkpoint: str | Path,
    out: str | Path,
    *,
    size: Sequence[int] | None = None,
    output: str = "logits",
    backbone_source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """``pivotseg export``: load a run or checkpoint folder and :func:`export_onnx` it.

    Raises:
        CheckpointError: the checkpoint does not fit its config (the keys are named), or is
            missing; see :func:`pivotseg.segmenter.load_segmenter`.
    """
    from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
    from pivotseg.segmenter import load_segmenter

    require_export_packages()
    folder = resolve_model_folder(checkpoint)
    model = load_segmenter(folder, backbone_source=backbone_source)
    run_config = getattr(model, "run_config", None) or find_run_config(folder)
    return export_onnx(
        model,
        out,
        size=size,
        output=output,
        run_config=run_config,
        source=str(folder),
        overwrite=overwrite,
    )
