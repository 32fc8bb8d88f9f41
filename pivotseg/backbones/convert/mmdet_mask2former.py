"""mmdet's Mask2Former head (as mmseg and Rein save it) -> pivotseg's Mask2Former head.

pivotseg's head (:mod:`pivotseg.heads.mask2former`) runs transformers' Mask2Former modules, which
compute what mmdet's do (post-norm deformable encoder over strides 32/16/8, one FPN level at
stride 4, masked-attention decoder cross -> self -> FFN, sine positions, the same mask and class
predictors); only the names and one fused tensor differ::

    pixel_decoder.input_convs.i.{conv,gn}          pixel_decoder.input_projections.i.{0,1}
    pixel_decoder.level_encoding.weight            pixel_decoder.level_embed
    pixel_decoder.encoder.layers.n.self_attn.*     (same names)
    ....ffn.layers.0.0 / ffn.layers.1 / norms.0 / norms.1
                                                   fc1 / fc2 / self_attn_layer_norm / final_layer_norm
    pixel_decoder.lateral_convs.0.{conv,gn}        pixel_decoder.adapter_1.{0,1}
    pixel_decoder.output_convs.0.{conv,gn}         pixel_decoder.layer_1.{0,1}
    pixel_decoder.mask_feature                     pixel_decoder.mask_projection
    transformer_decoder.layers.n.cross_attn.attn.* transformer_module.decoder.layers.n.cross_attn.*
    transformer_decoder.layers.n.self_attn.attn.in_proj_{weight,bias}
                                                   ...self_attn.{q,k,v}_proj (rows q, k, v)
    ....norms.0 / norms.1 / norms.2                cross_attn / self_attn / final _layer_norm
    transformer_decoder.post_norm                  transformer_module.decoder.layernorm
    level_embed                                    transformer_module.level_embed
    querys2feat (Rein's replace_query_feat)        transformer_module.queries_to_features
    cls_embed / mask_embed.{0,2,4}                 class_predictor / ...mask_embedder.{0,1,2}.0

Anything else (mmdet's learnt ``query_feat``/``query_embed`` tables, input projections a
head of another width has) has no place in pivotseg's query-linked head and is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_PD, _TD = "pixel_decoder.", "transformer_module.decoder."
_ENC = r"pixel_decoder\.encoder\.layers\.(\d+)\."
_DEC = r"transformer_decoder\.layers\.(\d+)\."
_P = r"(weight|bias)"

# (source pattern, target template); ``\1``... refer to the pattern's groups.
RENAMES: list[tuple[str, str]] = [
    (rf"pixel_decoder\.input_convs\.(\d+)\.conv\.{_P}", _PD + r"input_projections.\1.0.\2"),
    (rf"pixel_decoder\.input_convs\.(\d+)\.gn\.{_P}", _PD + r"input_projections.\1.1.\2"),
    (r"pixel_decoder\.level_encoding\.weight", _PD + "level_embed"),
    (
        _ENC + rf"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.{_P}",
        _PD + r"encoder.layers.\1.self_attn.\2.\3",
    ),
    (_ENC + rf"ffn\.layers\.0\.0\.{_P}", _PD + r"encoder.layers.\1.fc1.\2"),
    (_ENC + rf"ffn\.layers\.1\.{_P}", _PD + r"encoder.layers.\1.fc2.\2"),
    (_ENC + rf"norms\.0\.{_P}", _PD + r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_ENC + rf"norms\.1\.{_P}", _PD + r"encoder.layers.\1.final_layer_norm.\2"),
    (rf"pixel_decoder\.lateral_convs\.0\.conv\.{_P}", _PD + r"adapter_1.0.\1"),
    (rf"pixel_decoder\.lateral_convs\.0\.gn\.{_P}", _PD + r"adapter_1.1.\1"),
    (rf"pixel_decoder\.output_convs\.0\.conv\.{_P}", _PD + r"layer_1.0.\1"),
    (rf"pixel_decoder\.output_convs\.0\.gn\.{_P}", _PD + r"layer_1.1.\1"),
    (rf"pixel_decoder\.mask_feature\.{_P}", _PD + r"mask_projection.\1"),
    (_DEC + r"cross_attn\.attn\.(in_proj_weight|in_proj_bias)", _TD + r"layers.\1.cross_attn.\2"),
    (_DEC + rf"cross_attn\.attn\.out_proj\.{_P}", _TD + r"layers.\1.cross_attn.out_proj.\2"),
    (_DEC + rf"self_attn\.attn\.out_proj\.{_P}", _TD + r"layers.\1.self_attn.out_proj.\2"),
    (_DEC + rf"ffn\.layers\.0\.0\.{_P}", _TD + r"layers.\1.fc1.\2"),
    (_DEC + rf"ffn\.layers\.1\.{_P}", _TD + r"layers.\1.fc2.\2"),
    (_DEC + rf"norms\.0\.{_P}", _TD + r"layers.\1.cross_attn_layer_norm.\2"),
    (_DEC + rf"norms\.1\.{_P}", _TD + r"layers.\1.self_attn_layer_norm.\2"),
    (_DEC + rf"norms\.2\.{_P}", _TD + r"layers.\1.final_layer_norm.\2"),
    (rf"transformer_decoder\.post_norm\.{_P}", _TD + r"layernorm.\1"),
    (r"level_embed\.weight", "transformer_module.level_embed.weight"),
    (rf"querys2feat\.{_P}", r"transformer_module.queries_to_features.\1"),
    (rf"cls_embed\.{_P}", r"class_predictor.\1"),
]
_MASK_EMBED = re.compile(rf"mask_embed\.([024])\.{_P}")
_SELF_IN_PROJ = re.compile(_DEC + r"self_attn\.attn\.in_proj_(weight|bias)")
_COMPILED = [(re.compile(p), t) for p, t in RENAMES]


def _split_in_proj(match: re.Match, value: torch.Tensor) -> dict[str, torch.Tensor]:
    # nn.MultiheadAttention stacks the query, key and value projections in that order.
    layer, part = match[1], match[2]
    q, k, v = value.chunk(3, dim=0)
    base = f"{_TD}layers.{layer}.self_attn."
    return {f"{base}q_proj.{part}": q, f"{base}k_proj.{part}": k, f"{base}v_proj.{part}": v}


def _special(key: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]] | None:
    if match := _SELF_IN_PROJ.fullmatch(key):
        return lambda value: _split_in_proj(match, value)
    if match := _MASK_EMBED.fullmatch(key):
        index = int(match[1]) // 2  # Linear, ReLU, Linear, ReLU, Linear
        target = f"{_TD}mask_predictor.mask_embedder.{index}.0.{match[2]}"
        return lambda value: {target: value}
    return None


def rename(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors under pivotseg's names, source keys with no rule)`` for a ``decode_head.*``
    state dict given without its ``decode_head.`` prefix."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        special = _special(key)
        if special is not None:
            out.update(special(value))
            continue
        for pattern, template in _COMPILED:
            if match := pattern.fullmatch(key):
                out[match.expand(template)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def _count(state: dict, pattern: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    return len(found)


def head_settings(state: dict[str, torch.Tensor]) -> tuple[dict, int | None]:
    """``(head_args, num_classes)`` read from a ``decode_head.*`` state dict (no prefix).

    Settings that the tensors cannot tell are left out (pivotseg's defaults are Rein's);
    ``num_classes`` is ``None`` without ``cls_embed``.
    """
    args: dict = {}
    if "level_embed.weight" in state:
        args["hidden_dim"] = state["level_embed.weight"].shape[1]
    decoder = _count(state, _DEC)
    if decoder:
        args["decoder_layers"] = decoder
    encoder = _count(state, _ENC)
    if encoder:
        args["encoder_layers"] = encoder
    ffn = state.get("transformer_decoder.layers.0.ffn.layers.0.0.weight")
    if ffn is not None:
        args["dim_feedforward"] = ffn.shape[0]
    ffn = state.get("pixel_decoder.encoder.layers.0.ffn.layers.0.0.weight")
    if ffn is not None:
        args["encoder_feedforward_dim"] = ffn.shape[0]
    classes = state.get("cls_embed.weight")
    return args, None if classes is None else classes.shape[0] - 1
