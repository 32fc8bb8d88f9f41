"""Tiny configs and a tokenizer shared by the tests (segmenters, CLIP/SigLIP, open-vocabulary,
FAMix)."""

from pathlib import Path

from PIL import Image
from transformers import CLIPTokenizer

from pivotseg.tuning.dpft import INGREDIENTS


def tiny_vit_config(**overrides) -> dict:
    """A 4-layer, 32-wide ViT vision tower on 32x32 images with 8x8 patches."""
    vit = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    return {**vit, **overrides}


# DPFT's mechanisms, off by default since the ablation (docs/benchmarks.md): tests of the
# mechanisms, and of anything that needs set pivots (SPL), switch them on with this.
DPFT_ALL_ON = dict.fromkeys(INGREDIENTS, True)

# Tiny heads and tuning methods for segmenters on the 32-wide ViT above (segmenter and DGSS tests).
TINY_HEAD_ARGS = {
    "fpn": dict(channels=16),
    "mask2former": dict(
        num_queries=6,
        hidden_dim=64,  # GroupNorm(32) needs two channels per group on 1x1 maps
        decoder_layers=2,
        encoder_layers=1,
        num_heads=4,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        train_num_points=256,
    ),
}
TINY_METHOD_ARGS = {
    "frozen": {},
    "full": {},
    "lora": dict(rank=4),
    "rein": dict(num_tokens=6, rank=4),
    # Every mechanism on: these segmenters exercise presence, pivots, U(z) and the focus gate.
    "dpft": dict(num_tokens=12, per_class=2, rank=4, attn_dim=16, context_rank=8, **DPFT_ALL_ON),
}


def tiny_text_tower(**overrides) -> dict:
    """A 2-layer, 24-wide text transformer (vocabulary and token ids left to the caller)."""
    return dict(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        **overrides,
    )


def tiny_clip_text_config(**overrides) -> dict:
    """CLIP's text tower over :func:`tiny_clip_tokenizer`'s ids (60 entries, 32 positions)."""
    ids = dict(vocab_size=60, max_position_embeddings=32, bos_token_id=0, eos_token_id=1)
    return tiny_text_tower(**{**ids, "pad_token_id": 1, **overrides})


def tiny_clip_tokenizer(merges: tuple[tuple[str, str], ...] = ()) -> CLIPTokenizer:
    """A byte-level BPE over single letters, plus one vocabulary entry per merge, in order."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges))


def record_image_opens(monkeypatch) -> list[Path]:
    """Make ``PIL.Image.open`` record every path it opens (resolved) in the returned list, until
    ``monkeypatch.undo()``: which files a run read, e.g. that adaptation reads no target label."""
    opened: list[Path] = []
    real_open = Image.open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return opened
