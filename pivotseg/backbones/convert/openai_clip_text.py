"""OpenAI CLIP's text-tower layout -> transformers' ``CLIPTextModelWithProjection``.

OpenAI's layout (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*`` with a
fused ``attn.in_proj``, ``ln_final``, ``text_projection``), converted to ``.safetensors``, is how
the CLIP ResNets (RN50, RN101) are released; this maps it onto transformers' text model so that
they need no other text code. The fused query/key/value rows split in that order; the
projection is stored ``(width, dim)`` and transformers' ``Linear`` wants its transpose.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pivotseg.errors import CheckpointError

OPENAI_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight")


def read_openai_text_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The text-tower tensors (everything but ``visual.*``) of an OpenAI-layout ``.safetensors``.

    Raises:
        CheckpointError: not a ``.safetensors`` file, or no OpenAI text tower in it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"{path}: give OpenAI's CLIP checkpoint converted to .safetensors (text keys "
            "token_embedding.*, transformer.resblocks.*, ln_final.*, text_projection)"
        )
    state = load_file(str(path))
    missing = [k for k in OPENAI_TEXT_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: holds no OpenAI CLIP text tower (missing {', '.join(missing)}); "
            "give the full CLIP checkpoint, not only its visual part"
        )
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def openai_text_config(state: dict[str, torch.Tensor], heads: int | None = None) -> dict:
    """``CLIPTextConfig`` fields read off the shapes of an OpenAI-layout text tower."""
    vocab, width = state["token_embedding.weight"].shape
    layers = sorted(
        {
            int(k.split(".")[2])
            for k in state
            if k.startswith("transformer.resblocks.") and k.endswith("attn.in_proj_weight")
        }
    )
    return dict(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=len(layers),
        # OpenAI's CLIP builds its text transformer with width // 64 heads.
        num_attention_heads=int(heads or max(1, width // 64)),
        max_position_embeddings=int(state["positional_embedding"].shape[0]),
        projection_dim=int(state["text_projection"].shape[1]),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def convert_openai_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI text-tower keys -> ``CLIPTextModelWithProjection`` keys (fused qkv split)."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
    }
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    i = 0
    while f"transformer.resblocks.{i}.attn.in_proj_weight" in state:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        qkv_w = state[src + "attn.in_proj_weight"].chunk(3, dim=0)
        qkv_b = state[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for part, w, b in zip(("q", "k", "v"), qkv_w, qkv_b):
            out[f"{dst}self_attn.{part}_proj.weight"] = w.contiguous()
            out[f"{dst}self_attn.{part}_proj.bias"] = b.contiguous()
        for old, new in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{new}.{leaf}"] = state[f"{src}{old}.{leaf}"]
        i += 1
    return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def openai_text_model(
    state: dict[str, torch.Tensor], where, heads: int | None = None, **token_ids: int | None
):
    """``CLIPTextModelWithProjection`` (eval mode) holding the OpenAI-layout text ``state``.

    Args:
        state: the text tensors (:func:`read_openai_text_state`).
        where: the file, for the message.
        heads: attention heads (default: width // 64, as OpenAI).
        **token_ids: ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id`` of the tokenizer
            (default: OpenAI's end-of-text token, the last id of the vocabulary).

    Raises:
        CheckpointError: the tensors do not fit transformers' CLIP text model.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    fields = openai_text_config(state, heads)
    fields.update(token_ids or {"eos_token_id": fields["vocab_size"] - 1})
    model = CLIPTextModelWithProjection(CLIPTextConfig(**fields)).eval()
    converted = convert_openai_text_state(state)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(converted))
    if bad:
        raise CheckpointError(
            f"{where}: the text tower does not fit transformers' CLIP text model "
            f"({len(bad)} keys differ, e.g. {', '.join(bad[:3])})"
        )
    model.load_state_dict(converted, strict=True)
    return model
