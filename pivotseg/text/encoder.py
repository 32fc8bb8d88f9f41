"""CLIP text encoder over transformers, its tokenizer, and prompt-ensemble embeddings.

:class:`ClipTextEncoder` wraps either a full ``CLIPModel`` (the text tower of a
:class:`~pivotseg.backbones.clip.ClipBackbone`) or a ``CLIPTextModelWithProjection``. The
latter is how CLIP ResNets get a text tower: :func:`load_openai_text_encoder` loads the text
weights of OpenAI's CLIP checkpoint layout into transformers' CLIP text model through
:mod:`pivotseg.backbones.convert.openai_clip_text`, so RN50/RN101 checkpoints need no other code.

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

from pivotseg.errors import ConfigError


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
    from pivotseg.backbones.convert.openai_clip_text import (
        openai_text_model,
        read_openai_text_state,
    )

    path = Path(path)
    state = read_openai_text_state(path)
    tokenizer = load_tokenizer(tokenizer_source if tokenizer_source is not None else path.parent)
    token_ids = {}
    if tokenizer is not None:
        token_ids = dict(
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ClipTextEncoder(openai_text_model(state, path, heads, **token_ids), tokenizer)


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
