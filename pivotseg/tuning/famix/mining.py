"""FAMix style mining over a dataset, driven by a small YAML file (``pivotseg famix mine``).

Data preparation for the ``famix`` tuning method: one pass over the source set writes the style
bank it trains with (the per-batch optimisation is :mod:`pivotseg.tuning.famix.pin`).

Example (FAMix's RN50 on GTA5)::

    backbone: clip_resnet
    source: weights/RN50.safetensors        # OpenAI's RN50 checkpoint as .safetensors
    tokenizer: openai/clip-vit-base-patch16 # CLIP's BPE files (shared by all OpenAI CLIPs)
    dataset: {path: /data/gta5, format: gta5, split: train}
    layer: layer1
    steps: 100
    out: styles/rn50_gta5_layer1.safetensors

Text tower: a ``clip`` (ViT) backbone uses its own; a ``clip_resnet`` reads the text weights
of the same OpenAI checkpoint (``text_source`` overrides it).

Images: batches of ``batch_size`` consecutive images in dataset order; each image is resized
(``resize_short``, optional) and cropped to ``crop`` at a position drawn from ``seed`` and its
index (FAMix mines on its training crops, 768), padded when smaller (label 255). The style for
a patch is drawn from ``styles`` with a generator seeded by ``seed`` and the batch index, so a
resumed run mines exactly what an uninterrupted one would.

Progress: the bank file is rewritten every ``save_every`` batches with the number of finished
batches in its header; running again with the same settings continues after them. Other
settings with the same ``out`` are refused (start a new file or delete the old one).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pivotseg.backbones.hub import refuse_unsafe_options
from pivotseg.errors import ConfigError
from pivotseg.text.templates import FAMIX_STYLES, resolve_templates
from pivotseg.tuning.famix.bank import StyleBank
from pivotseg.tuning.famix.pin import mine_styles, select_patches
from pivotseg.tuning.famix.site import StyleSite, site_fingerprint, style_site
from pivotseg.tuning.famix.styles import dominant_classes
from pivotseg.typed_config import read_dataclass

IGNORE_PROMPT = "photo"  # FAMix's target text for patches whose dominant label is ignore


@dataclass
class MiningConfig:
    """Settings of one mining run (see the module docstring).

    Attributes:
        backbone: ``clip_resnet`` (FAMix) or ``clip`` (a CLIP ViT with its text tower).
        source: where the weights are (``clip_resnet``: OpenAI's checkpoint as .safetensors).
        backbone_config: architecture settings (e.g. ``{variant: RN101}``).
        dataset: ``{path, format, split}`` as :func:`pivotseg.data.build_dataset` takes them.
        out: the bank file to write (``.safetensors``).
        layer: style site (``layer1`` for clip_resnet, a block index for ViTs).
        styles: style names put before the class name (default FAMix's 20).
        templates: ``imagenet`` (80), ``single`` or a list of ``{}`` templates.
        steps, lr, momentum, weight_decay: the PIN optimisation (FAMix: 100, 1, 0.9, 1e-4).
        batch_size: images per batch; one patch per distinct class per batch is optimised.
        crop, resize_short: image geometry (FAMix: 768 crops).
        parts: patches per side (3).
        text_source: OpenAI-layout checkpoint with the text tower (clip_resnet; default source).
        tokenizer: folder or hub id of CLIP's tokenizer files (default: next to the weights).
        limit: mine on the first N images only.
        save_every: batches between saves.
        seed: crops and style draws.
        device: ``cpu``/``cuda`` (default: cuda when available).
    """

    backbone: str
    dataset: dict[str, Any]
    out: str
    source: str | None = None
    backbone_config: dict[str, Any] = field(default_factory=dict)
    layer: str | int | None = None
    styles: list[str] = field(default_factory=lambda: list(FAMIX_STYLES))
    templates: str | list[str] = "imagenet"
    steps: int = 100
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    crop: int | None = 768
    resize_short: int | None = None
    parts: int = 3
    text_source: str | None = None
    tokenizer: str | None = None
    limit: int | None = None
    save_every: int = 10
    seed: int = 1
    device: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "famix config") -> MiningConfig:
        cfg = read_dataclass(cls, data, source=where)
        refuse_unsafe_options(cfg.backbone_config or {}, f"{where}: backbone_config")
        if not cfg.styles:
            raise ConfigError(f"{where}: styles is empty; list style names or leave it out")
        if "path" not in cfg.dataset:
            raise ConfigError(f"{where}: dataset needs at least a path (and format, split)")
        if cfg.steps < 0 or cfg.batch_size < 1 or cfg.save_every < 1:
            raise ConfigError(f"{where}: steps >= 0, batch_size >= 1 and save_every >= 1 please")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> MiningConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        return cls.from_dict(data, where=str(path))

    def run_signature(self, dataset_size: int) -> dict[str, Any]:
        """What must match for a saved bank to be continued."""
        keys = (
            "styles",
            "templates",
            "steps",
            "lr",
            "momentum",
            "weight_decay",
            "batch_size",
            "crop",
            "resize_short",
            "parts",
            "seed",
            "dataset",
        )
        return {**{k: getattr(self, k) for k in keys}, "dataset_size": dataset_size}


def text_encoder_for(cfg: MiningConfig, backbone):
    """The text tower matching ``backbone`` (see the module docstring)."""
    from pivotseg.text.encoder import load_openai_text_encoder, text_encoder_from_backbone

    if backbone.name == "clip_resnet":
        source = cfg.text_source or cfg.source
        if source is None:
            raise ConfigError(
                "famix config: clip_resnet needs text_source (OpenAI's full CLIP checkpoint as "
                ".safetensors) to embed the style prompts"
            )
        return load_openai_text_encoder(source, cfg.tokenizer)
    encoder = text_encoder_from_backbone(backbone)
    if cfg.tokenizer is not None:
        from pivotseg.text.encoder import load_tokenizer

        encoder.tokenizer = load_tokenizer(cfg.tokenizer)
    return encoder


def _crop(item: dict, size: int | None, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """``image (3, s, s)`` 0-255 and ``label (s, s)`` cut (and padded) to ``size``."""
    image = torch.as_tensor(np.asarray(item["image"]))
    if image.ndim == 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    image = image.float()
    label = torch.as_tensor(np.asarray(item["label"])).long()
    if size is None:
        return image, label
    h, w = label.shape
    y = rng.randint(0, max(h - size, 0))
    x = rng.randint(0, max(w - size, 0))
    image, label = image[:, y : y + size, x : x + size], label[y : y + size, x : x + size]
    ph, pw = size - label.shape[0], size - label.shape[1]
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=255)
    return image, label


def mine_dataset(cfg: MiningConfig, progress: bool = True) -> Path:
    """Mine a FAMix style bank over ``cfg.dataset``; returns the bank file.

    Raises:
        ConfigError: bad settings, or ``cfg.out`` holds a bank of other settings.
        CheckpointError: ``cfg.out`` holds a bank of another backbone or layer.
    """
    from pivotseg.backbones import build_backbone
    from pivotseg.data import build_dataset
    from pivotseg.data.transforms import eval_transforms

    templates = resolve_templates(cfg.templates)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {"with_text": True} if cfg.backbone == "clip" else {}
    backbone = build_backbone(
        cfg.backbone, source=cfg.source, config=dict(cfg.backbone_config), **kwargs
    )
    backbone = backbone.freeze().eval().to(device)
    site = style_site(backbone, cfg.layer)
    encoder = text_encoder_for(cfg, backbone).to(device).eval()

    ds = cfg.dataset
    dataset = build_dataset(
        ds["path"],
        ds.get("format", "folder"),
        ds.get("split"),
        ds.get("domain"),
        transform=eval_transforms(cfg.resize_short),
    )
    count = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    batches = -(-count // cfg.batch_size)
    out = Path(cfg.out)
    bank = _open_bank(cfg, site, list(dataset.classes), count, batches)
    start = int(bank.info.get("done_batches", 0))
    if start >= batches:
        return out

    num_classes = len(dataset.classes)
    target = _style_targets(cfg, encoder, list(dataset.classes), templates)
    stats = tuple(t.to(device) for t in backbone.pixel_stats())
    bar = tqdm(
        range(start, batches), desc="famix mine", disable=not progress, initial=start, total=batches
    )
    for batch in bar:
        pixels, labels = _load_batch(cfg, dataset, batch, count, backbone.size_divisor, stats)
        with torch.no_grad():
            features, context = site.features(pixels)
        classes = dominant_classes(labels, features.shape[-2:], site.stride, num_classes, cfg.parts)
        patches = select_patches(classes)
        rng = random.Random(cfg.seed * 7_919 + batch)
        targets = torch.stack([target(p.klass, rng) for p in patches])
        mu, sigma, before, after = mine_styles(
            site,
            features,
            context,
            patches,
            targets,
            cfg.steps,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            cfg.parts,
        )
        for item, m, s in zip(patches, mu, sigma):
            bank.add(item.klass, m, s)
        bank.info["done_batches"] = batch + 1
        bar.set_postfix(patches=len(patches), cos=f"{before.mean():.3f}->{after.mean():.3f}")
        if (batch + 1) % cfg.save_every == 0 or batch + 1 == batches:
            bank.save(out)
    return out


def _open_bank(
    cfg: MiningConfig, site: StyleSite, classes: list[str], count: int, batches: int
) -> StyleBank:
    """An empty bank for this run, or the one at ``cfg.out`` when it continues this run."""
    signature = cfg.run_signature(count)
    fingerprint = site_fingerprint(site)
    out = Path(cfg.out)
    if out.exists():
        saved = StyleBank.load(out)
        saved.check_fits(site, len(classes), where=str(out), fingerprint=fingerprint)
        if saved.info.get("mining") != signature:
            raise ConfigError(
                f"{out}: holds styles mined with other settings; give a new out path (or delete "
                "the file) to start again"
            )
        return saved
    return StyleBank(
        classes,
        site.channels,
        {
            "backbone": {"name": site.backbone.name, "source": cfg.source, **fingerprint},
            "layer": site.layer_id,
            "mining": signature,
            "done_batches": 0,
            "total_batches": batches,
        },
    )


def _style_targets(
    cfg: MiningConfig, encoder, names: list[str], templates: list[str]
) -> Callable[[int, random.Random], torch.Tensor]:
    """``target(klass, rng)``: the text embedding of a style drawn by ``rng`` for ``klass``
    (``"photo"`` for ignore), each prompt embedded once."""
    from pivotseg.text.encoder import prompt_embeddings

    cache: dict[str, torch.Tensor] = {}

    def target(klass: int, rng: random.Random) -> torch.Tensor:
        if klass >= len(names):
            prompt = IGNORE_PROMPT
        else:
            prompt = f"{rng.choice(cfg.styles)} {names[klass].replace('_', ' ')}"
        if prompt not in cache:
            cache[prompt] = prompt_embeddings(encoder, [prompt], templates, normalize_each=False)[0]
        return cache[prompt]

    return target


def _load_batch(
    cfg: MiningConfig,
    dataset,
    batch: int,
    count: int,
    divisor: int,
    stats: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels (padded to ``divisor``) and labels of batch ``batch``."""
    mean, std = stats
    indices = range(batch * cfg.batch_size, min((batch + 1) * cfg.batch_size, count))
    crops = [_crop(dataset[i], cfg.crop, random.Random(cfg.seed * 1_000_003 + i)) for i in indices]
    sizes = {tuple(c[1].shape) for c in crops}
    if len(sizes) > 1:
        raise ConfigError(
            f"famix config: images of batch {batch} differ in size ({sorted(sizes)}); set "
            "crop (or batch_size: 1)"
        )
    pixels = (torch.stack([c[0] for c in crops]).to(mean.device) - mean) / std
    labels = torch.stack([c[1] for c in crops]).to(mean.device)
    pad_h, pad_w = -pixels.shape[-2] % divisor, -pixels.shape[-1] % divisor
    return F.pad(pixels, (0, pad_w, 0, pad_h)), labels
