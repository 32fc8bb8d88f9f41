"""Inputs of the FAMix pipeline check in ``bench dg``: random CLIP RN50, tokenizer, style bank.

    python bench/famix_inputs.py [--cache runs/famix_inputs] [--limit 32] [--steps 20]

No CLIP weights can be downloaded here, so the FAMix row of ``bench/dg.py --famix`` runs FAMix's
whole pipeline (style mining with CLIP's text tower, CLIP RN50 + DeepLabv3+ with local style
mixing, evaluation) on **random** weights. It shows that the pieces fit and what they cost; its
mIoU says nothing about FAMix. This module writes, into a cache folder:

* ``rn50_random_seed<S>.safetensors``: a CLIP RN50 in OpenAI's checkpoint layout (``visual.*``
  and the text tower), fp16 as OpenAI's files. The image tower is
  :class:`pivotseg.backbones.clip_resnet.ModifiedResNet` as CLIP initialises it (each
  bottleneck's last batch norm at zero); the text tower has RN50's shape (12 layers, width 512,
  8 heads, 77 positions, 1024-d projection) with CLIP's initialisation scales, but a vocabulary
  of only the tokenizer below.
* ``vocab.json`` + ``merges.txt``: a byte-level BPE tokenizer for ``CLIPTokenizer``: the 256
  byte symbols (alone and word-final), merges learnt on the words of the prompts FAMix builds
  (80 ImageNet templates, 20 style names, the class names, "photo") until each is one token,
  and the two special tokens last (end of text = the largest id, as OpenAI's). Any other text
  still tokenises, byte by byte.
* ``styles_...safetensors``: a style bank mined (``pivotseg famix mine`` machinery, resumable)
  on the first ``limit`` images of the base config's source set with ``steps`` PIN steps.
* ``row_model.yaml``: the ``model:`` section of the row (``--row LABEL=row_model.yaml``):
  FAMix's recipe on these files (``configs/famix_clip_rn50_gta2cbm.yaml``'s model, with the
  base config's number of classes).

Everything is deterministic in ``seed``; files already in the cache are reused (the bank's name
holds its mining settings, and mining continues an unfinished bank).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
import yaml

from pivotseg.benchmarking import check_checkout
from pivotseg.config import load_config
from pivotseg.text.templates import FAMIX_STYLES, resolve_templates

ROOT = check_checkout(__file__)

LABEL = "famix (random RN50, pipeline check)"
BASE_CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
# OpenAI CLIP RN50's text transformer.
RN50_TEXT = dict(width=512, layers=12, heads=8, context=77, embed_dim=1024)
IGNORE_WORD = "photo"
# Mining of the pipeline check (FAMix: every source image, batches of 16, 100 steps): enough for
# a few styles per frequent class in a few minutes on one CPU core.
MINING = dict(limit=32, batch_size=4, steps=20)


# ----- tokenizer ---------------------------------------------------------------------------
def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges (CLIP's ``</w>`` word ends) learnt on ``words`` until each is one
    token (``tokenizers``' trainer, run to exhaustion)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tokenizer.train_from_iterator(words, trainer)
    return [tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def prompt_words(class_names: list[str], templates: list[str], styles: list[str]) -> list[str]:
    """Every word of the texts FAMix mining embeds: templates, styles, class names, "photo"."""
    text = " ".join([*templates, *styles, *class_names, IGNORE_WORD]).replace("_", " ")
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def write_tokenizer(folder: Path, words: list[str]) -> int:
    """``vocab.json`` + ``merges.txt`` of a CLIP BPE over ``words``; returns the vocabulary size.

    Laid out as OpenAI's: the 256 byte symbols, the same word-final (``</w>``), one entry per
    merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = bpe_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


# ----- weights -------------------------------------------------------------------------------
def random_text_tower(
    vocab_size: int, width: int, layers: int, heads: int, context: int, embed_dim: int
) -> dict[str, torch.Tensor]:
    """An OpenAI-layout CLIP text transformer with CLIP's initialisation scales.

    Token embeddings N(0, 0.02), positions N(0, 0.01); attention input N(0, width^-0.5),
    residual projections N(0, width^-0.5 (2 layers)^-0.5), MLP input N(0, (2 width)^-0.5),
    text projection N(0, width^-0.5); biases 0, layer norms 1/0. ``heads`` only fixes that
    ``width`` splits evenly (the checkpoint does not store it; loaders use width // 64).
    """
    if width % heads:
        raise ValueError(f"text width {width} does not split into {heads} heads")
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    state = {
        "token_embedding.weight": torch.randn(vocab_size, width) * 0.02,
        "positional_embedding": torch.randn(context, width) * 0.01,
        "ln_final.weight": torch.ones(width),
        "ln_final.bias": torch.zeros(width),
        "text_projection": torch.randn(width, embed_dim) * width**-0.5,
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state.update(
            {
                p + "attn.in_proj_weight": torch.randn(3 * width, width) * attn_std,
                p + "attn.in_proj_bias": torch.zeros(3 * width),
                p + "attn.out_proj.weight": torch.randn(width, width) * proj_std,
                p + "attn.out_proj.bias": torch.zeros(width),
                p + "ln_1.weight": torch.ones(width),
                p + "ln_1.bias": torch.zeros(width),
                p + "mlp.c_fc.weight": torch.randn(4 * width, width) * fc_std,
                p + "mlp.c_fc.bias": torch.zeros(4 * width),
                p + "mlp.c_proj.weight": torch.randn(width, 4 * width) * proj_std,
                p + "mlp.c_proj.bias": torch.zeros(width),
                p + "ln_2.weight": torch.ones(width),
                p + "ln_2.bias": torch.zeros(width),
            }
        )
    return state


def write_random_clip(
    path: Path,
    vocab_size: int,
    seed: int = 0,
    visual: dict | None = None,
    text: dict | None = None,
) -> Path:
    """A random CLIP ResNet (default RN50) with its text tower, as OpenAI's fp16 layout."""
    from safetensors.torch import save_file

    from pivotseg.backbones.clip_resnet import build_clip_resnet, public_state_dict

    torch.manual_seed(seed)
    backbone = build_clip_resnet(config=dict(visual or {"variant": "RN50"}))
    state = public_state_dict(backbone)
    state.update(random_text_tower(vocab_size, **(text or RN50_TEXT)))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    note = f"random CLIP weights for a pipeline check (bench/famix_inputs.py, seed {seed})"
    save_file(state, str(tmp), metadata={"pivotseg_note": note})
    tmp.replace(path)
    return path


# ----- the whole set ---------------------------------------------------------------------------
def prepare_famix_check(
    cache: str | Path,
    base_config: str | Path = BASE_CONFIG,
    *,
    seed: int = 0,
    limit: int = MINING["limit"],
    batch_size: int = MINING["batch_size"],
    steps: int = MINING["steps"],
    crop: int | None = None,
    templates: str = "imagenet",
    visual: dict | None = None,
    text: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write (or reuse) the pipeline check's inputs in ``cache``; returns ``row_model.yaml``.

    Args:
        cache: the folder for the files (created).
        base_config: the benchmark's base run config: its source set is mined and its number of
            classes sizes the head.
        seed: weights, mining crops and style draws.
        limit, batch_size, steps: mining on the first ``limit`` source images, ``batch_size`` at
            a time, ``steps`` PIN steps per patch (FAMix: all images, 16, 100).
        crop: mining crop (default: the base config's training crop).
        templates: prompt templates of the mining (``imagenet``: FAMix's 80).
        visual, text: architecture overrides (tests use tiny ones; default RN50's).
    """
    from pivotseg.data import build_dataset
    from pivotseg.tuning.famix.mining import MiningConfig, mine_dataset

    cache = Path(cache).resolve()
    base = load_config(base_config)
    source = base.data.source
    if source is None:
        from pivotseg.errors import ConfigError

        raise ConfigError(f"{base_config}: data.source is not set; the styles are mined on it")
    dataset = build_dataset(source.path, source.format, source.split, source.domain)
    words = prompt_words(list(dataset.classes), resolve_templates(templates), list(FAMIX_STYLES))
    vocab_size = write_tokenizer(cache, words)
    tag = "rn50" if visual is None else "rn"
    weights = cache / f"{tag}_random_seed{seed}_vocab{vocab_size}.safetensors"
    if not weights.is_file():
        write_random_clip(weights, vocab_size, seed, visual, text)

    crop = crop or base.data.crop_size[0]
    bank = (
        cache
        / f"styles_{weights.stem}_{limit}img_b{batch_size}_{steps}steps_{templates}.safetensors"
    )
    mining = MiningConfig.from_dict(
        dict(
            backbone="clip_resnet",
            source=str(weights),
            backbone_config=dict(visual or {"variant": "RN50"}),
            tokenizer=str(cache),
            dataset={
                "path": source.path,
                "format": source.format,
                "split": source.split,
                "domain": source.domain,
            },
            layer="layer1",
            steps=steps,
            batch_size=batch_size,
            crop=crop,
            templates=templates,
            limit=limit,
            save_every=1,
            seed=seed,
            out=str(bank),
            device="cpu",
        ),
        where="famix pipeline check",
    )
    mine_dataset(mining, progress=progress)

    model = dict(
        num_classes=base.model.num_classes,
        backbone="clip_resnet",
        backbone_source=str(weights),
        backbone_config={
            **(visual or {"variant": "RN50"}),
            "output_stride": 16,
            "dilation_pattern": "famix",
            "attnpool": False,
        },
        out_indices=[0, 3],
        method="famix",
        method_args=dict(
            style_bank=str(bank),
            layer="layer1",
            trainable=["visual.layer4.2."] if visual is None else None,
            backbone_lr_mult=0.1,
        ),
        head="deeplabv3plus",
        head_args=dict(aspp_rates=[6, 12, 18], label_smoothing=0.1),
    )
    if model["method_args"]["trainable"] is None:
        del model["method_args"]["trainable"]  # the method's default: the last layer4 block
    row = cache / "row_model.yaml"
    header = (
        "# FAMix pipeline check (bench/famix_inputs.py): RANDOM CLIP weights, not an accuracy "
        f"claim.\n# Styles: first {limit} images of {source.label}, batches of {batch_size}, "
        f"{steps} PIN steps, {templates} templates, crop {crop}, seed {seed}.\n"
    )
    row.write_text(header + yaml.safe_dump({"model": model}, sort_keys=False))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/famix_inputs"))
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="base run config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=MINING["limit"], help="images mined")
    parser.add_argument("--batch-size", type=int, default=MINING["batch_size"])
    parser.add_argument("--steps", type=int, default=MINING["steps"], help="PIN steps per patch")
    args = parser.parse_args()
    row = prepare_famix_check(
        args.cache,
        args.config,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        steps=args.steps,
    )
    print(f"row model: {row}\nuse: pivotseg bench dg --row '{LABEL}={row}'")


if __name__ == "__main__":
    main()
