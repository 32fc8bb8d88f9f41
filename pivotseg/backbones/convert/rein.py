"""Rein's released checkpoints (mmseg) -> a pivotseg run folder that ``eval``/``predict`` open.

Rein (w1oves/Rein) saves an mmseg ``EncoderDecoder``: ``{"meta": ..., "state_dict": ...}`` with

* ``backbone.reins.*``: ``learnable_tokens_a (L, m, r)`` and ``learnable_tokens_b (L, r, c)``
  (``LoRAReins``, the released variant) or ``learnable_tokens (L, m, c)`` (plain ``Reins``),
  ``scale`` (absent when ``zero_mlp_delta_f`` fixed it to 1), ``mlp_token2feat``,
  ``mlp_delta_f``, ``transform`` (c -> q) and ``merge`` (3q -> q);
* ``backbone.*`` otherwise: DINOv2 in facebookresearch's layout, already at patch 16. Rein's
  own ``state_dict`` drops these, so the released ``*_rein_and_head.pth`` files lack them and
  Rein rebuilds them from ``dinov2_vitl14_pretrain.pth`` (``--backbone`` here);
* ``decode_head.*``: mmdet's Mask2Former with Rein's ``querys2feat``
  (:mod:`~pivotseg.backbones.convert.mmdet_mask2former`).

pivotseg's ``rein`` method holds the same tensors per block (``tuning.tokens_a.i``,
``tuning.tokens_b.i``) and per width (``tuning.mlp_token2feat.<c>``, ...). Plain ``Reins``
tokens become ``A = I (m x m)``, ``B = tokens``, which gives the same ``T = A B``.
The released DINOv2 at patch 14 is brought to Rein's patch 16 and 512 crop by
:func:`pivotseg.backbones.dinov2.convert_patch_size`, which resizes the kernel and the position
grid bicubically as Rein's conversion script does.

The run folder::

    RUN/config.yaml                 model (backbone weights inside the checkpoint), Rein's test
                                    settings (slide 512/341) and Rein's targets
    RUN/checkpoints/last/           segmenter.json + model.safetensors (backbone included)
    RUN/import.json                 source, what was mapped, what was not
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pivotseg.backbones.base import describe_key_mismatch, state_mismatch
from pivotseg.backbones.convert import mmdet_mask2former as m2f
from pivotseg.backbones.convert.dinov2_pth import backbone_name, describe, dinov2_from_state
from pivotseg.backbones.convert.read import load_released, tensor_dict
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.outputs import check_new_dir, staged_dir

REIN_PREFIX, BACKBONE_PREFIX, HEAD_PREFIX = "backbone.reins.", "backbone.", "decode_head."
LORA_TOKENS = ("learnable_tokens_a", "learnable_tokens_b")
LINEARS = ("mlp_token2feat", "mlp_delta_f", "transform", "merge")
REIN_OUT_INDICES = (7, 11, 15, 23)
REIN_SCALE_INIT = 1e-3
IMPORT_FILE = "import.json"


def split_checkpoint(state: dict[str, torch.Tensor], where) -> tuple[dict, dict, dict]:
    """``(reins, backbone, decode_head)`` tensors, each without its prefix.

    Raises:
        CheckpointError: no Rein tensors, or keys outside the three parts (named).
    """
    parts: tuple[dict, dict, dict] = ({}, {}, {})
    other = []
    for key, value in state.items():
        for part, prefix in zip(parts, (REIN_PREFIX, BACKBONE_PREFIX, HEAD_PREFIX)):
            if key.startswith(prefix):
                part[key[len(prefix) :]] = value
                break
        else:
            other.append(key)
    if not parts[0] or other:
        missing = [] if parts[0] else [REIN_PREFIX + k for k in (*LORA_TOKENS, "scale")]
        raise CheckpointError(
            f"{where}: not a Rein checkpoint (mmseg backbone.reins.* / backbone.* / "
            f"decode_head.*): {describe_key_mismatch(missing, other, [])}"
        )
    return parts


def rein_tensors(reins: dict[str, torch.Tensor], where) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(facts, tensors under pivotseg's tuning.* names)`` of Rein's parameters; ``facts``
    holds the method arguments plus ``layers``, ``width`` and ``lora`` (the token variant).

    Raises:
        CheckpointError: keys missing or unexpected, or shapes that do not fit together.
    """
    lora = all(k in reins for k in LORA_TOKENS)
    tokens = list(LORA_TOKENS) if lora else ["learnable_tokens"]
    expected = tokens + [f"{n}.{p}" for n in LINEARS for p in ("weight", "bias")] + ["scale"]
    missing = [REIN_PREFIX + k for k in expected if k not in reins and k != "scale"]
    unexpected = [REIN_PREFIX + k for k in reins if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: Rein tensors do not fit LoRAReins or Reins: "
            f"{describe_key_mismatch(missing, unexpected, [])}"
        )
    if lora:
        a, b = reins["learnable_tokens_a"], reins["learnable_tokens_b"]
    else:
        b = reins["learnable_tokens"]
        a = torch.eye(b.shape[1], dtype=b.dtype).expand(b.shape[0], -1, -1)
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise CheckpointError(
            f"{where}: Rein tokens of shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
            "multiply per layer ((L, m, r) @ (L, r, c))"
        )
    layers, num_tokens, rank = a.shape
    width = b.shape[2]
    query_dim = reins["transform.weight"].shape[0]
    out = {}
    for i in range(layers):
        out[f"tuning.tokens_a.{i}"] = a[i].clone()
        out[f"tuning.tokens_b.{i}"] = b[i].clone()
    for name in LINEARS:
        key = name if name == "merge" else f"{name}.{width}"
        for part in ("weight", "bias"):
            out[f"tuning.{key}.{part}"] = reins[f"{name}.{part}"]
    # zero_mlp_delta_f replaces the learnable scale by the constant 1.
    out["tuning.scale"] = reins.get("scale", torch.tensor(1.0)).reshape(())
    args = dict(
        num_tokens=num_tokens,
        rank=rank,
        query_dim=query_dim,
        scale_init=REIN_SCALE_INIT,
        link_queries=True,
    )
    return {"layers": layers, "width": width, "lora": lora, **args}, out


def _backbone(backbone_state, backbone_file, where, num_heads, patch_size, image_size):
    """The DINOv2 model and its config: from the checkpoint's ``backbone.*`` or ``--backbone``."""
    from pivotseg.backbones.dinov2 import convert_patch_size

    if backbone_state:
        if backbone_file is not None:
            raise ConfigError(
                f"{where}: holds the DINOv2 backbone already (backbone.*); drop --backbone"
            )
        return dinov2_from_state(backbone_state, f"{where} (backbone.*)", num_heads)
    if backbone_file is None:
        raise CheckpointError(
            f"{where}: holds Rein's tokens and head but no backbone.* (Rein's released "
            "*_rein_and_head.pth files leave it out); pass --backbone dinov2_vitl14_pretrain.pth"
        )
    state, _ = tensor_dict(load_released(backbone_file), backbone_file)
    model, config = dinov2_from_state(state, backbone_file, num_heads)
    if config["patch_size"] != patch_size:
        convert_patch_size(model, patch_size, image_size=image_size)
        config.update(patch_size=patch_size, image_size=image_size)
    return model, config


def _class_names(meta: dict, num_classes: int) -> list[str] | None:
    from pivotseg.data.taxonomy import CITYSCAPES_CLASSES

    classes = (meta.get("dataset_meta") or {}).get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return list(CITYSCAPES_CLASSES) if num_classes == len(CITYSCAPES_CLASSES) else None


def map_head(model, head_state: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """``(tensors to load under head.*, one-line report)``; no tensors when the head does not
    map completely (then the report names what did not)."""
    if not head_state:
        return {}, "decode_head: none in the checkpoint; the head is freshly initialised"
    renamed, unknown = m2f.rename(head_state)
    placed = {f"head.mask2former.{k}": v for k, v in renamed.items()}
    own = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith("head.") and not k.startswith("head.criterion.")
    }
    leftover = [HEAD_PREFIX + k for k in unknown] + [k for k in placed if k not in own]
    unfilled = [k for k in own if k not in placed]
    reshaped = [
        (k, v.shape, own[k].shape)
        for k, v in placed.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if not (leftover or unfilled or reshaped):
        return placed, f"decode_head: all {len(head_state)} tensors mapped"
    parts = []
    if leftover:
        shown = ", ".join(leftover[:4])
        parts.append(f"{len(leftover)} with no place in pivotseg's head ({shown})")
    if unfilled:
        shown = ", ".join(unfilled[:4])
        parts.append(f"{len(unfilled)} of pivotseg's head left unfilled ({shown})")
    if reshaped:
        key, got, want = reshaped[0]
        heads = any("sampling_offsets" in k or "attention_weights" in k for k, _, _ in reshaped)
        hint = " (check --num-heads)" if heads else ""
        parts.append(
            f"{len(reshaped)} of another shape ({key}: {tuple(got)} vs {tuple(want)}){hint}"
        )
    return {}, (
        "decode_head NOT imported, the head is freshly initialised (train it before "
        "evaluating): " + "; ".join(parts)
    )


def import_rein(
    path: str | Path,
    out: str | Path,
    backbone: str | Path | None = None,
    num_heads: int = 8,
    backbone_heads: int | None = None,
    out_indices: tuple[int, ...] | list[int] = REIN_OUT_INDICES,
    patch_size: int = 16,
    image_size: int = 512,
) -> dict:
    """Convert one of Rein's checkpoints into a run folder ``out``.

    Args:
        path: the Rein checkpoint (``.pth`` read with ``torch.load(weights_only=True)``, or
            ``.safetensors`` with the same keys).
        out: a new or empty folder (written under a temporary name, renamed at the end).
        backbone: the DINOv2 ``.pth`` when ``path`` holds no ``backbone.*`` tensors.
        num_heads: attention heads of the Mask2Former decoders (Rein: 8; not in the tensors).
        backbone_heads: DINOv2 heads (default: width / 64).
        out_indices: the DINOv2 blocks fed to the head (Rein: 7, 11, 15, 23).
        patch_size, image_size: what ``--backbone`` is converted to (Rein: 16 and its crop).

    Returns:
        The import report written to ``import.json``.

    Raises:
        CheckpointError: a file is refused or its keys do not fit (named).
        ConfigError: ``out`` holds files already, or the settings contradict the file.
    """
    from pivotseg.backbones.dinov2 import Dinov2ViTBackbone
    from pivotseg.config import DataConfig, EvalConfig, RunConfig, save_config
    from pivotseg.segmenter import SegmenterConfig, build_segmenter

    out = Path(out)
    check_new_dir(out, "--out")
    state, meta = tensor_dict(load_released(path), path)
    reins, backbone_state, head_state = split_checkpoint(state, path)
    rein, tuning = rein_tensors(reins, path)
    model, bconfig = _backbone(
        backbone_state, backbone, path, backbone_heads, patch_size, image_size
    )
    depth, width = bconfig["num_hidden_layers"], bconfig["hidden_size"]
    if (rein["layers"], rein["width"]) != (depth, width):
        raise CheckpointError(
            f"{path}: Rein tokens are for {rein['layers']} blocks of width {rein['width']}, the "
            f"backbone has {depth} of width {width}; give the DINOv2 the run was trained on"
        )
    out_indices = list(out_indices)
    if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
        raise ConfigError(
            f"--out-indices {out_indices}: give 4 block indices below the depth {depth}"
        )
    head_args, num_classes = m2f.head_settings(head_state)
    num_classes = num_classes or 19
    head_width = head_args.get("hidden_dim", rein["query_dim"])
    width_clash = head_width != rein["query_dim"]
    if width_clash:  # Rein's queries feed the decoder: a consistent run has one width
        head_args["hidden_dim"] = rein["query_dim"]
    if num_heads < 1 or rein["query_dim"] % num_heads:
        raise ConfigError(
            f"--num-heads {num_heads}: must divide the decoder width {rein['query_dim']}"
        )
    fields = {k: v for k, v in bconfig.items() if k != "layerscale"}
    cfg = SegmenterConfig(
        num_classes=num_classes,
        class_names=_class_names(meta, num_classes),
        backbone=backbone_name(bconfig),
        backbone_source=None,
        backbone_config=fields,
        out_indices=out_indices,
        method="rein",
        method_args={k: rein[k] for k in ("num_tokens", "rank", "query_dim", "scale_init")},
        head="mask2former",
        head_args={
            **head_args,
            "num_queries": rein["num_tokens"],
            "num_heads": num_heads,
            "pyramid": "interpolate",
        },
    )
    segmenter = build_segmenter(cfg, backbone=Dinov2ViTBackbone(model, out_indices), seed=0)
    own_tuning = {k: v for k, v in segmenter.state_dict().items() if k.startswith("tuning.")}
    mismatch = state_mismatch(own_tuning, tuning)
    if mismatch:
        raise CheckpointError(f"{path}: Rein tensors do not fit pivotseg's rein: {mismatch}")
    head_tensors, head_report = map_head(segmenter, head_state)
    if width_clash:
        head_tensors, head_report = (
            {},
            (
                f"decode_head NOT imported: its width {head_width} differs from "
                f"Rein's query width {rein['query_dim']}; the head is freshly initialised"
            ),
        )
    with torch.no_grad():
        segmenter.load_state_dict({**tuning, **head_tensors}, strict=False)

    report = {
        "source": str(Path(path).resolve()),
        "backbone_source": str(Path(backbone).resolve()) if backbone else "the checkpoint",
        "backbone": f"DINOv2 {describe(bconfig)}, image {bconfig['image_size']}",
        "rein": f"{'LoRAReins' if rein['lora'] else 'Reins'}: {rein['layers']} blocks, "
        f"{rein['num_tokens']} tokens, rank {rein['rank']}, queries {rein['query_dim']}",
        "head": head_report,
        "head_imported": bool(head_tensors),
        "num_classes": num_classes,
        "note": "settings not held in the tensors: decoder heads "
        f"{num_heads}, out_indices {out_indices}",
    }
    run = RunConfig(
        model=cfg,
        data=DataConfig(targets=_rein_targets(image_size)),
        # Rein's test_cfg: slide with 2/3 overlap (512/341, 1024/683).
        eval=EvalConfig(mode="slide", crop=image_size, stride=round(image_size * 2 / 3)),
        run_dir=str(out),
    )
    with staged_dir(out, "importing") as tmp:
        segmenter.save(tmp / "checkpoints" / "last")
        save_config(run, tmp / "config.yaml")
        (tmp / IMPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _rein_targets(short_side: int):
    """Rein's test sets at its test resolutions (Cityscapes' and Mapillary's short side at the
    crop size), at the paths the shipped recipes use."""
    from pivotseg.config import DatasetSpec

    return [
        DatasetSpec(
            "data/cityscapes", "cityscapes", "val", name="cityscapes", resize_short=short_side
        ),
        DatasetSpec("data/bdd100k", "bdd100k", "val", name="bdd100k"),
        DatasetSpec(
            "data/mapillary",
            "mapillary_v1.2",
            "validation",
            name="mapillary",
            resize_short=short_side,
        ),
    ]
