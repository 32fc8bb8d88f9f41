"""CLIP text side: a text encoder over transformers, prompt ensembles, class-name parsing.

:class:`ClipTextEncoder` wraps either a full ``CLIPModel`` (the text tower of a
:class:`~pivotseg.backbones.clip.ClipBackbone`) or a ``CLIPTextModelWithProjection``. The
latter is how CLIP ResNets get a text tower: :func:`load_openai_text_encoder` maps the text
weights of OpenAI's CLIP checkpoint layout (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.*``, ``ln_final``, ``text_projection``; converted to ``.safetensors``) onto
transformers' CLIP text model, so RN50/RN101 checkpoints need no other code.

Prompt ensembles (:func:`prompt_embeddings`): every prompt is put in each template, embedded,
averaged and L2-normalised. The open-vocabulary methods normalise each template's embedding
before averaging (``normalize_each=True``, as MaskCLIP/SCLIP/NACLIP/ProxyCLIP do); FAMix's
mining averages the raw embeddings (``normalize_each=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pivotseg.errors import CheckpointError, ConfigError, DataError

OPENAI_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight")


class ClipTextEncoder(nn.Module):
    """Strings -> CLIP text embeddings.

    Args:
        model: a transformers ``CLIPModel`` or ``CLIPTextModelWithProjection``.
        tokenizer: a ``CLIPTokenizer`` (from the same source as the weights).
    """

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg)

    @property
    def dim(self) -> int:
        return self.model.text_projection.weight.shape[0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError(
                "text encoder: no tokenizer; give a CLIP source that holds tokenizer files "
                "(tokenizer.json or vocab.json + merges.txt) or a tokenizer source"
            )
        out = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Raw (not normalised) embeddings ``(N, dim)`` of token ids."""
        device = self.model.text_projection.weight.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        if hasattr(self.model, "get_text_features"):
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out.pooler_output if hasattr(out, "pooler_output") else out
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], normalize: bool = True, batch_size: int = 256
    ) -> torch.Tensor:
        """Embeddings ``(len(texts), dim)`` of strings, L2-normalised when ``normalize``."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size])
            chunks.append(self(**tokens).float())
        out = torch.cat(chunks)
        return F.normalize(out, dim=-1) if normalize else out


@torch.no_grad()
def prompt_embeddings(
    encoder: ClipTextEncoder,
    prompts: Sequence[str],
    templates: Sequence[str],
    normalize_each: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """One L2-normalised embedding per prompt, averaged over ``templates`` (``(N, dim)``).

    Args:
        encoder: the text encoder.
        prompts: e.g. class names; each fills the ``{}`` of every template.
        templates: e.g. :data:`~.templates.OPENAI_IMAGENET_TEMPLATES`.
        normalize_each: normalise each template's embedding before the mean (open-vocabulary
            methods) or average the raw embeddings (FAMix).
        progress: show a tqdm bar over prompts.
    """
    out = []
    for prompt in tqdm(prompts, desc="text prompts", disable=not progress):
        feats = encoder.encode([t.format(prompt) for t in templates], normalize=normalize_each)
        out.append(F.normalize(feats.mean(dim=0), dim=-1))
    return torch.stack(out)


def text_encoder_from_backbone(backbone) -> ClipTextEncoder:
    """The text tower of a ClipBackbone built with text (a full ``CLIPModel``)."""
    if not getattr(backbone, "has_text", False):
        raise ConfigError(
            f"{getattr(backbone, 'name', 'backbone')}: has no text tower; build the CLIP backbone "
            "from a full CLIPModel source (e.g. openai/clip-vit-base-patch16) or with_text=True"
        )
    return ClipTextEncoder(backbone.model, backbone.tokenizer)


# ----- OpenAI checkpoint layout --------------------------------------------------------------
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


def load_openai_text_encoder(
    path: str | Path, tokenizer_source: str | Path | None = None, heads: int | None = None
) -> ClipTextEncoder:
    """The text tower of an OpenAI-layout CLIP checkpoint (``.safetensors``) in transformers.

    Args:
        path: the whole CLIP checkpoint converted to ``.safetensors`` (``visual.*`` keys are
            ignored), e.g. RN50's.
        tokenizer_source: folder or hub id with CLIP's BPE tokenizer files (every OpenAI CLIP
            shares one vocabulary, e.g. ``openai/clip-vit-base-patch16``); default: the folder
            of ``path``.
        heads: attention heads of the text transformer (default: width // 64, as OpenAI).

    Raises:
        CheckpointError: not a ``.safetensors`` file, or no OpenAI text tower in it.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

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
    text_state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    tokenizer = load_tokenizer(tokenizer_source if tokenizer_source is not None else path.parent)
    fields = openai_text_config(text_state, heads)
    if tokenizer is not None:
        fields.update(
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        # OpenAI's end-of-text token is the last id of the vocabulary.
        fields.update(eos_token_id=fields["vocab_size"] - 1)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**fields)).eval()
    converted = convert_openai_text_state(text_state)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(converted))
    if bad:
        raise CheckpointError(
            f"{path}: the text tower does not fit transformers' CLIP text model "
            f"({len(bad)} keys differ, e.g. {', '.join(bad[:3])})"
        )
    model.load_state_dict(converted, strict=True)
    return ClipTextEncoder(model, tokenizer)


def load_tokenizer(source: str | Path | None):
    """``CLIPTokenizer`` from a folder or hub id, or ``None`` when a folder holds none."""
    if source is None:
        return None
    from transformers import CLIPTokenizer

    from pivotseg.backbones.hub import looks_like_hub_id, require_hub_file

    folder = Path(source)
    if folder.is_dir() and not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json")):
        return None
    if looks_like_hub_id(source):
        require_hub_file(source, ("tokenizer.json", "vocab.json"), "CLIP tokenizer")
    try:
        return CLIPTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ConfigError(f"{source}: cannot load a CLIP tokenizer ({first})") from None


# ----- class names ---------------------------------------------------------------------------
def parse_class_names(entries: Sequence[str], where: str = "classes") -> list[list[str]]:
    """Each class as a list of synonyms (``"person; pedestrian"``), underscores as spaces.

    Raises:
        ConfigError: no classes, an empty name, or a name given twice.
    """
    if not entries:
        raise ConfigError(f"{where}: no class names given; list at least one")
    classes, seen = [], {}
    for i, entry in enumerate(entries):
        names = [n.strip().replace("_", " ") for n in str(entry).split(";")]
        if not all(names):
            raise ConfigError(
                f"{where}: class {i + 1} ({entry!r}) has an empty name; remove stray commas or "
                "semicolons"
            )
        for name in names:
            key = name.lower()
            if key in seen:
                raise ConfigError(
                    f"{where}: {name!r} is given twice (classes {seen[key] + 1} and {i + 1}); "
                    "each name may appear once"
                )
            seen[key] = i
        classes.append(names)
    return classes


def read_classes_file(path: str | Path) -> list[str]:
    """Class entries of a text file: one class per line (synonyms separated by ``;``), ``#``
    comments and blank lines skipped.

    Raises:
        DataError: the file does not exist or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: classes file not found; give a text file with one class per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the classes file ({err})") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
