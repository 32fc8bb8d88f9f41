"""facebookresearch/dinov2 backbone checkpoints -> transformers ``Dinov2Model`` folders.

The released ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` files hold::

    cls_token (1, 1, C)   pos_embed (1, 1 + g*g, C)   mask_token (1, C)   [register_tokens (1, R, C)]
    patch_embed.proj.{weight (C, 3, p, p), bias}
    blocks.N.norm1.*  blocks.N.attn.qkv.{weight (3C, C), bias}  blocks.N.attn.proj.*
    blocks.N.ls1.gamma (C)  blocks.N.norm2.*  blocks.N.ls2.gamma
    blocks.N.mlp.fc1.*, blocks.N.mlp.fc2.*       (ViT-S/B/L: GELU MLP)
    blocks.N.mlp.w12.* (2h, C), blocks.N.mlp.w3.*  (ViT-g: SwiGLU, x1, x2 = w12(x).chunk(2))
    norm.*

(``blocks.K.N.*`` when saved with block chunks). Everything the config needs is read from the
shapes: width ``C``, depth, patch ``p``, image size ``g * p`` (518 for the released files), the
MLP ratio, registers ``R``, layer scale. Only the number of heads is not in the tensors; every
released DINOv2 has 64-wide heads, so it defaults to ``C / 64``.

The fused ``qkv`` rows are query, key, value in that order (DINOv2 reshapes the output to
``(3, heads, head_dim)``), so they split into three ``C``-row blocks; SwiGLU's ``w12`` splits
into the gate (first half, through SiLU) and the up projection (second half).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from pivotseg.backbones.base import describe_key_mismatch, state_mismatch
from pivotseg.backbones.convert.read import load_released, tensor_dict
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.outputs import check_new_dir, staged_dir

TOP_KEYS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
)
OPTIONAL_TOP_KEYS = ("mask_token", "register_tokens")
MLP_KEYS = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
SWIGLU_KEYS = ("mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias")
BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
)
SIZE_NAMES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}
HEAD_WIDTH = 64
LAYER_NORM_EPS = 1e-6  # DINOv2's norm_layer = partial(nn.LayerNorm, eps=1e-6)

# transformers has renamed DINOv2's submodules between versions: the first naming the built
# model has is used.
ATTENTION_NAMES = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    (
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
    ),
)
SWIGLU_NAMES = (
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ("mlp.weights_in", None, "mlp.weights_out"),
)
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def unchunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.K.N.x`` (FSDP block chunks) -> ``blocks.N.x``; other keys unchanged."""
    out = {}
    for key, value in state.items():
        match = _CHUNKED.match(key)
        out[f"blocks.{match[1]}.{match[2]}" if match else key] = value
    return out


def infer_config(state: dict[str, torch.Tensor], where, num_heads: int | None = None) -> dict:
    """The transformers config fields of the backbone in ``state`` (original DINOv2 keys).

    Returns:
        ``Dinov2Config`` keyword arguments, plus ``num_register_tokens`` when there are
        registers and ``layerscale`` (whether the file has ``ls1``/``ls2``).

    Raises:
        CheckpointError: the keys are not DINOv2's (missing and unexpected ones named) or the
            shapes contradict each other.
        ConfigError: ``num_heads`` is needed (width not a multiple of 64) or does not divide it.
    """
    missing = [k for k in TOP_KEYS if k not in state]
    if missing or not any(_BLOCK.match(k) for k in state):
        known = (*TOP_KEYS, *OPTIONAL_TOP_KEYS)
        unexpected = [k for k in state if k not in known and not _BLOCK.match(k)]
        missing = missing or ["blocks.0.norm1.weight"]
        raise CheckpointError(
            f"{where}: not a facebookresearch/dinov2 backbone: "
            f"{describe_key_mismatch(missing, unexpected, [])}; give a dinov2_vit*14*.pth file"
        )
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape
    if len(patch) != 4 or patch[-1] != patch[-2] or patch[0] != width:
        raise CheckpointError(
            f"{where}: patch_embed.proj.weight has shape {tuple(patch)}; expected "
            f"({width}, 3, p, p) for a {width}-wide DINOv2"
        )
    positions = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(
            f"{where}: pos_embed holds {positions} patch positions, not a square grid"
        )
    depth = 1 + max(int(_BLOCK.match(k)[1]) for k in state if _BLOCK.match(k))
    first = {m[2]: v for k, v in state.items() if (m := _BLOCK.match(k)) and m[1] == "0"}
    swiglu = "mlp.w12.weight" in first
    config = dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=_heads(width, num_heads, where),
        mlp_ratio=_mlp_ratio(first, width, swiglu, where),
        patch_size=patch[-1],
        image_size=grid * patch[-1],
        use_swiglu_ffn=swiglu,
        qkv_bias="attn.qkv.bias" in first,
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_act="gelu",
        layerscale_value=1.0,
    )
    if "register_tokens" in state:
        config["num_register_tokens"] = state["register_tokens"].shape[1]
    config["layerscale"] = "ls1.gamma" in first
    return config


def _heads(width: int, num_heads: int | None, where) -> int:
    if num_heads is None:
        if width % HEAD_WIDTH:
            raise ConfigError(
                f"{where}: width {width} is not a multiple of {HEAD_WIDTH} (the head width of "
                "every released DINOv2); give the number of heads (--num-heads)"
            )
        return width // HEAD_WIDTH
    if num_heads < 1 or width % num_heads:
        raise ConfigError(f"--num-heads {num_heads}: must divide the width {width}")
    return num_heads


def _mlp_ratio(first: dict, width: int, swiglu: bool, where) -> int:
    # transformers' Dinov2Config takes an integer mlp_ratio (every released DINOv2 has 4).
    if not swiglu:
        if "mlp.fc1.weight" not in first:
            raise CheckpointError(
                f"{where}: blocks.0 has neither mlp.fc1 (MLP) nor mlp.w12 (SwiGLU) weights"
            )
        hidden = first["mlp.fc1.weight"].shape[0]
        if hidden % width:
            raise CheckpointError(
                f"{where}: MLP width {hidden} is not a whole multiple of width {width}"
            )
        return hidden // width
    hidden = first["mlp.w12.weight"].shape[0] // 2
    # SwiGLU keeps 2/3 of width * ratio, rounded up to a multiple of 8 (DINOv2, transformers).
    for ratio in range(1, 17):
        if (int(width * ratio * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise CheckpointError(f"{where}: SwiGLU width {hidden} follows from no MLP ratio")


def expected_keys(config: dict) -> list[str]:
    """Every key the original layout has for ``config`` (from :func:`infer_config`)."""
    keys = [*TOP_KEYS, "mask_token"]
    if config.get("num_register_tokens"):
        keys.append("register_tokens")
    per_block = list(BLOCK_KEYS) + (["attn.qkv.bias"] if config["qkv_bias"] else [])
    per_block += SWIGLU_KEYS if config["use_swiglu_ffn"] else MLP_KEYS
    if config["layerscale"]:
        per_block += ["ls1.gamma", "ls2.gamma"]
    keys += [f"blocks.{i}.{k}" for i in range(config["num_hidden_layers"]) for k in per_block]
    return keys


def build_model(config: dict):
    """An empty ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) for ``config``."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    fields = {k: v for k, v in config.items() if k != "layerscale"}
    if fields.get("num_register_tokens"):
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**fields))
    fields.pop("num_register_tokens", None)
    return Dinov2Model(Dinov2Config(**fields))


def _names(model_keys, options, where):
    for names in options:
        if f"encoder.layer.0.{names[0]}.weight" in model_keys:
            return names
    raise CheckpointError(
        f"{where}: this transformers version names DINOv2's layers in a way pivotseg does not "
        f"know (none of {', '.join(n[0] for n in options)}); use transformers 5.x"
    )


def to_transformers(state: dict[str, torch.Tensor], config: dict, model_keys, where):
    """Original tensors -> the state dict of :func:`build_model`'s model (its key names)."""
    width = config["hidden_size"]
    q, k, v, o = _names(model_keys, ATTENTION_NAMES, where)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state.get("mask_token", torch.zeros(1, width)),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if "register_tokens" in state:
        out["embeddings.register_tokens"] = state["register_tokens"]
    swiglu = _names(model_keys, SWIGLU_NAMES, where) if config["use_swiglu_ffn"] else None
    for i in range(config["num_hidden_layers"]):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.{part}"] = state[f"{src}{norm}.{part}"]
            if f"{src}attn.qkv.{part}" in state:
                rows = state[f"{src}attn.qkv.{part}"].split(width, dim=0)
                for name, value in zip((q, k, v), rows):
                    out[f"{dst}{name}.{part}"] = value
            out[f"{dst}{o}.{part}"] = state[f"{src}attn.proj.{part}"]
            if swiglu is None:
                for fc in ("fc1", "fc2"):
                    out[f"{dst}mlp.{fc}.{part}"] = state[f"{src}mlp.{fc}.{part}"]
            else:
                gate, up, down = swiglu
                w12 = state[f"{src}mlp.w12.{part}"]
                if up is None:  # older transformers keep w12 fused
                    out[f"{dst}{gate}.{part}"] = w12
                else:
                    out[f"{dst}{gate}.{part}"], out[f"{dst}{up}.{part}"] = w12.chunk(2, dim=0)
                out[f"{dst}{down}.{part}"] = state[f"{src}mlp.w3.{part}"]
        for n in (1, 2):
            gamma = state.get(f"{src}ls{n}.gamma")
            out[f"{dst}layer_scale{n}.lambda1"] = torch.ones(width) if gamma is None else gamma
    return out


def dinov2_from_state(state: dict[str, torch.Tensor], where, num_heads: int | None = None):
    """``(model, config)``: a transformers DINOv2 holding the original-layout ``state``.

    Raises:
        CheckpointError: keys missing or unexpected (named, in the original layout), or shapes
            that do not fit the inferred config.
    """
    state = unchunk(state)
    config = infer_config(state, where, num_heads)
    expected = expected_keys(config)
    optional = {"mask_token"}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in set(expected)]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: does not fit the DINOv2 {describe(config)} layout its shapes suggest: "
            f"{describe_key_mismatch(missing, unexpected, [])}"
        )
    model = build_model(config)
    own = model.state_dict()
    converted = to_transformers(state, config, own.keys(), where)
    mismatch = state_mismatch(own, converted)
    if mismatch:
        raise CheckpointError(
            f"{where}: tensors do not fit the DINOv2 {describe(config)} they suggest: {mismatch}"
        )
    model.load_state_dict(converted, strict=True)
    return model.eval(), config


def describe(config: dict) -> str:
    """``ViT-L/14``, ``ViT-g/14 with 4 registers``, or ``ViT (width 32)/14``."""
    width = config["hidden_size"]
    name = SIZE_NAMES.get(width, f"ViT (width {width})") + f"/{config['patch_size']}"
    registers = config.get("num_register_tokens")
    return name + (f" with {registers} registers" if registers else "")


def backbone_name(config: dict) -> str:
    """The :func:`~pivotseg.backbones.build_backbone` name that reads this model."""
    return "dinov2_reg" if config.get("num_register_tokens") else "dinov2"


def import_dinov2(path: str | Path, out: str | Path, num_heads: int | None = None) -> dict:
    """Convert a facebookresearch/dinov2 ``.pth`` (or ``.safetensors``) into a transformers
    folder (``config.json`` + ``model.safetensors``) that ``build_backbone`` reads.

    Args:
        path: the released file (read with ``torch.load(weights_only=True)``).
        out: a new or empty folder; written under a temporary name and renamed at the end.
        num_heads: attention heads (default: width / 64, as every released DINOv2).

    Returns:
        ``{"name", "backbone", "config", "out"}``: the model's name (``ViT-L/14``), the backbone
        name to build it with, the transformers config fields and the folder.

    Raises:
        CheckpointError: the file is refused, or is not a DINOv2 backbone (keys named).
        ConfigError: ``out`` holds files already.
    """
    out = Path(out)
    check_new_dir(out, "--out")
    state, _ = tensor_dict(load_released(path), path)
    model, config = dinov2_from_state(state, path, num_heads)
    with staged_dir(out, "importing") as tmp:
        model.save_pretrained(str(tmp))
    fields = {k: v for k, v in config.items() if k != "layerscale"}
    return {
        "name": describe(config),
        "backbone": backbone_name(config),
        "config": fields,
        "out": out,
    }
