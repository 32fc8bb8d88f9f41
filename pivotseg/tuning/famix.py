"""FAMix (Fahes et al., CVPR 2024): language-driven local style mining and mixing.

Two steps, both on the features of one early layer (the *style site*), split into a 3x3 grid of
patches:

1. **Mining** (one pass over the source set, :func:`mine_styles`): for a patch whose dominant
   class (mode of its label patch, ignore included) is ``c``, Prompt-driven Instance
   Normalisation optimises the patch's channel mean ``mu`` and std ``sigma`` (initialised to
   its own statistics) so that CLIP's image embedding of ``act(sigma * norm(patch) + mu)`` matches
   the text embedding of ``"<style> <class name>"`` (``"photo"`` for ignore): loss
   ``1 - cos``, SGD lr 1, momentum 0.9, weight decay 1e-4, 100 steps. As in FAMix's code, one
   patch per distinct dominant class of a batch is optimised (its first occurrence). The
   ``(mu, sigma)`` pairs go to per-class banks (:class:`StyleBank`, a ``.safetensors`` file).
2. **Mixing** (every training forward, :class:`FAMix`): each patch is normalised by its own
   statistics, a bank style ``(mu_t, sigma_t)`` of its dominant class is drawn (fallback: the
   ignore bank, then all banks), ``s ~ Beta(0.1, 0.1)`` per sample and channel, and
   ``mu_mix = s mu + (1 - s) mu_t`` (likewise sigma) restyles it: ``act(sigma_mix f̂ + mu_mix)``.
   Identity in eval mode.

Style sites: a CLIP ResNet (``clip_resnet``) uses a stage output, FAMix's ``layer1`` (stride 4),
with ``act = ReLU`` (the stage ends in one) and the restyled patch average-pooled to the
pretraining grid (56x56 for 224 inputs) before layers 2-4 and the attention pool. A ViT (any
backbone with transformer blocks; mining needs a CLIP ViT with its projection) uses the patch
tokens after block ``layer`` on their token grid, ``act`` = identity (tokens are a signed
residual stream). methods.md proposes blocks 2-4; the default is block index 2 (the third
block), the earliest of them, because style statistics live early [P]. When mining, the class
token of the image at that block stands in for the patch's class token and the remaining blocks
run on ``[class token, patch tokens]``; ``post_layernorm`` and ``visual_projection`` of the class
token give the embedding [P]: FAMix defines this for ResNets only.

Patch statistics follow FAMix's ``calc_mean_std``: unbiased variance + 1e-5, square root.

Labels reach the mixing hook through :meth:`FAMix.prepare_batch`, which the training loop must
call with the batch's labels before the forward (the segmenter's forward carries no labels).
Without it, styles are drawn from all banks regardless of class and a warning says so once.

Bank files carry a JSON header (safetensors metadata ``pivotseg_famix``) naming the backbone
(name, source, a hash of the shapes and one of the values of every tensor the style site's
features depend on) and the site; :meth:`StyleBank.check_fits` refuses a bank mined on another
backbone or layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones.base import Backbone, tokens_to_map
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tuning.base import BACKBONE_PREFIX, Rule, TuningMethod

EPS = 1e-5
IGNORE_INDEX = 255
HEADER_KEY = "pivotseg_famix"
FORMAT_VERSION = 1


# ----- patches and statistics ------------------------------------------------------------------
def grid_bounds(n: int, parts: int) -> list[int]:
    """``parts + 1`` cut points splitting ``n`` cells as evenly as possible."""
    return [round(i * n / parts) for i in range(parts + 1)]


def patch_regions(hw: tuple[int, int], parts: int = 3) -> list[tuple[slice, slice]]:
    """The ``parts x parts`` patches of an ``(h, w)`` grid, row-major."""
    ys, xs = grid_bounds(hw[0], parts), grid_bounds(hw[1], parts)
    return [
        (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
        for i in range(parts)
        for j in range(parts)
    ]


def mean_std(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``sqrt(unbiased var + eps)`` of ``(..., C, h, w)``."""
    flat = x.flatten(-2)
    # A one-cell patch (tiny grids) has no unbiased variance; call it 0.
    var = flat.var(-1, correction=1 if flat.shape[-1] > 1 else 0)
    return flat.mean(-1), (var + eps).sqrt()


def patch_statistics(features: torch.Tensor, parts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu, sigma`` of every patch: ``(B, parts², C)`` each."""
    stats = [
        mean_std(features[..., ys, xs]) for ys, xs in patch_regions(features.shape[-2:], parts)
    ]
    return torch.stack([m for m, _ in stats], 1), torch.stack([s for _, s in stats], 1)


def dominant_classes(
    labels: torch.Tensor,
    hw: tuple[int, int],
    stride: int,
    num_classes: int,
    parts: int = 3,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mode of the label pixels under each feature patch: ``(B, parts²)`` in ``0..K`` (K: ignore).

    Feature cell ``(i, j)`` covers label pixels ``[i*stride, (i+1)*stride)``; cells past the label
    (padding) and values outside ``0..K-1`` count as ignore. Ties go to the lower class, and a
    class beats ignore.
    """
    b = labels.shape[0]
    h_lab, w_lab = labels.shape[-2:]
    out = torch.full((b, parts * parts), num_classes, dtype=torch.long, device=labels.device)
    values = labels.long()
    values = torch.where((values >= 0) & (values < num_classes), values, num_classes)
    for p, (ys, xs) in enumerate(patch_regions(hw, parts)):
        y0, y1 = min(ys.start * stride, h_lab), min(ys.stop * stride, h_lab)
        x0, x1 = min(xs.start * stride, w_lab), min(xs.stop * stride, w_lab)
        if y1 <= y0 or x1 <= x0:
            continue
        region = values[:, y0:y1, x0:x1].reshape(b, -1)
        counts = F.one_hot(region, num_classes + 1).sum(1)  # (B, K + 1)
        out[:, p] = counts.argmax(1)
    return out


def restyle(
    features: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    parts: int = 3,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Give patch ``p`` of every image the statistics ``mu[:, p], sigma[:, p]`` (``(B, P, C)``)."""
    out = features.clone()
    for p, (ys, xs) in enumerate(patch_regions(features.shape[-2:], parts)):
        patch = features[..., ys, xs]
        m0, s0 = mean_std(patch)
        normed = (patch - m0[..., None, None]) / s0[..., None, None]
        out[..., ys, xs] = sigma[:, p, :, None, None] * normed + mu[:, p, :, None, None]
    return activation(out) if activation is not None else out


def mix_styles(
    features: torch.Tensor,
    mu_t: torch.Tensor,
    sigma_t: torch.Tensor,
    s: torch.Tensor,
    parts: int = 3,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """FAMix's local mixing: ``mu_mix = s mu + (1 - s) mu_t`` (same for sigma) per patch.

    Args:
        features: ``(B, C, h, w)``.
        mu_t, sigma_t: drawn target styles ``(B, parts², C)``.
        s: mixing weights ``(B, C)`` (``s = 1`` keeps the source style).
        activation: applied after restyling (ReLU for ResNet stage outputs).
    """
    mu, sigma = patch_statistics(features, parts)
    s = s[:, None, :]
    return restyle(
        features, s * mu + (1 - s) * mu_t, s * sigma + (1 - s) * sigma_t, parts, activation
    )


# ----- where styles live -----------------------------------------------------------------------
class StyleSite:
    """The layer of a backbone whose features FAMix stylises.

    Subclasses give the features, the hook used while training and (for mining) the CLIP image
    embedding of restyled patches.
    """

    layer_id: str = ""
    stride: int = 1
    channels: int = 0
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, C, h, w)`` features of normalised pixels and per-image context (or None)."""
        raise NotImplementedError

    def embed(self, patches: list[torch.Tensor], context: list[torch.Tensor | None]):
        """CLIP image embeddings ``(N, D)`` of restyled patches ``(C, h_i, w_i)``."""
        raise NotImplementedError

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Register ``fn(features (B, C, h, w)) -> features`` in the backbone's forward."""
        raise NotImplementedError

    def run_to_site(self, pixels: torch.Tensor) -> None:
        """Run the backbone just far enough to compute the site's features."""
        self.features(pixels)


class ResNetStageSite(StyleSite):
    """A stage output of a ``clip_resnet`` backbone (FAMix: ``layer1``)."""

    def __init__(self, backbone: Backbone, stage: str):
        super().__init__(backbone)
        from pivotseg.backbones.clip_resnet import STAGES

        if stage not in STAGES[1:-1]:
            raise ConfigError(
                f"famix: layer {stage!r} is not a stage FAMix can stylise; use one of "
                f"{', '.join(STAGES[1:-1])} (FAMix: layer1)"
            )
        index = STAGES.index(stage) - 1
        self.layer_id = stage
        self.stage = stage
        self.stride = backbone.stage_strides[index]
        self.channels = backbone.stage_dims[index]
        self.activation = F.relu
        # FAMix pools a restyled patch to the size layer1 has at the pretraining resolution.
        self.embed_grid = backbone.cfg.image_size // self.stride

    def features(self, pixels):
        return self.backbone.forward_stages(pixels, "stem", self.stage), None

    def embed(self, patches, context):
        batch = torch.stack([F.adaptive_avg_pool2d(p, self.embed_grid) for p in patches])
        return self.backbone.attnpool_forward(self.backbone.forward_from(self.stage, batch))

    def hook(self, fn):
        return self.backbone.add_stage_hook(self.stage, fn)


class BlockSite(StyleSite):
    """Patch tokens after transformer block ``index`` on their token grid."""

    def __init__(self, backbone: Backbone, index: int):
        super().__init__(backbone)
        n = backbone.num_blocks
        if not -n <= index < n - 1:
            raise ConfigError(
                f"famix: layer {index} is not a block of {backbone.name} before its last "
                f"(0..{n - 2}); methods.md proposes 2-4"
            )
        self.index = index % n
        self.layer_id = f"block{self.index}"
        self.stride = backbone.block_strides()[self.index]
        self.channels = backbone.block_dims[self.index]
        self.activation = None

    def _clip(self):
        bb = self.backbone
        if not (hasattr(bb, "vision") and getattr(bb, "has_text", False)):
            raise ConfigError(
                f"famix: mining on {bb.name} needs a CLIP ViT with its projection head (build "
                "the clip backbone from a full CLIPModel source)"
            )
        return bb.vision

    def features(self, pixels):
        vision = self._clip()
        x = vision.embeddings(pixels, interpolate_pos_encoding=True)
        x = vision.pre_layrnorm(x)
        for layer in vision.encoder.layers[: self.index + 1]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        p = self.backbone.patch_size
        hw = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        return tokens_to_map(x[:, 1:], hw), x[:, :1]

    def embed(self, patches, context):
        vision = self._clip()
        out = []
        for patch, cls in zip(patches, context):
            x = torch.cat([cls, patch.flatten(1).t()[None]], dim=1)
            for layer in vision.encoder.layers[self.index + 1 :]:
                x = layer(x, None)
                x = x[0] if isinstance(x, tuple) else x
            out.append(self.backbone.model.visual_projection(vision.post_layernorm(x[:, 0])))
        return torch.cat(out)

    def hook(self, fn):
        def on_tokens(tokens, hw):
            maps = fn(tokens_to_map(tokens, hw))
            return maps.flatten(2).transpose(1, 2)

        return self.backbone.add_block_hook(self.index, on_tokens)

    def run_to_site(self, pixels):
        self.backbone.forward_blocks(pixels, [self.index])


def style_site(backbone: Backbone, layer: str | int | None = None) -> StyleSite:
    """The style site of ``backbone``: a ``clip_resnet`` stage (default ``layer1``) or, for
    backbones with transformer blocks, the output of block ``layer`` (default 2)."""
    if backbone.name == "clip_resnet":
        return ResNetStageSite(backbone, "layer1" if layer is None else str(layer))
    if not backbone.blocks:
        raise ConfigError(
            f"famix: {backbone.name} has neither CLIP ResNet stages nor transformer blocks"
        )
    if layer is None:
        layer = 2
    if isinstance(layer, str):
        layer = int(layer[5:]) if layer.startswith("block") and layer[5:].isdigit() else layer
    if not isinstance(layer, int):
        raise ConfigError(f"famix: layer {layer!r} for {backbone.name}: give a block index")
    return BlockSite(backbone, layer)


def site_fingerprint(site: StyleSite) -> dict[str, str]:
    """Hashes of the tensors the site's features depend on, in execution order.

    Every module that runs on the way to the site contributes its parameters and buffers (batch
    norm statistics included, counters excluded). Names are left out, so a CLIP loaded with or
    without its text tower gives the same hashes.
    """
    backbone = site.backbone
    ran: list[nn.Module] = []
    seen: set[int] = set()

    def record(module, args):
        if id(module) not in seen:
            seen.add(id(module))
            ran.append(module)

    handles = [m.register_forward_pre_hook(record) for m in backbone.modules()]
    first = next(backbone.parameters())
    side = max(2 * backbone.size_divisor, 32)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            site.run_to_site(torch.zeros(1, 3, side, side, device=first.device, dtype=first.dtype))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    shapes, values = hashlib.sha256(), hashlib.sha256()
    for module in ran:
        own = list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        )
        for name, tensor in own:
            if name == "num_batches_tracked" or name.endswith("position_ids"):
                continue
            shapes.update(f"{type(module).__name__}.{name}{tuple(tensor.shape)};".encode())
            values.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {"config_hash": shapes.hexdigest()[:16], "weights_hash": values.hexdigest()[:16]}


# ----- the bank --------------------------------------------------------------------------------
@dataclass
class StyleBank:
    """Mined styles per class: ``mu[k], sigma[k]`` of shape ``(n_k, C)``; index ``K`` = ignore.

    ``info`` is the header: ``backbone`` (name, source, config_hash, weights_hash), ``layer``,
    ``channels``, mining settings and progress.
    """

    class_names: list[str]
    channels: int
    info: dict[str, Any] = field(default_factory=dict)
    mu: list[torch.Tensor] = field(default_factory=list)
    sigma: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        k = len(self.class_names) + 1
        if not self.mu:
            self.mu = [torch.zeros(0, self.channels) for _ in range(k)]
            self.sigma = [torch.zeros(0, self.channels) for _ in range(k)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def key(self, k: int) -> str:
        return "ignore" if k == self.num_classes else str(k)

    def add(self, k: int, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Append one style of class ``k`` (``K`` = ignore)."""
        self.mu[k] = torch.cat([self.mu[k], mu.detach().float().cpu().view(1, -1)])
        self.sigma[k] = torch.cat([self.sigma[k], sigma.detach().float().cpu().view(1, -1)])

    def counts(self) -> list[int]:
        return [int(m.shape[0]) for m in self.mu]

    def save(self, path: str | Path) -> Path:
        """Write atomically (a partial file never replaces a good one)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k in range(self.num_classes + 1):
            tensors[f"mu.{self.key(k)}"] = self.mu[k].contiguous()
            tensors[f"sigma.{self.key(k)}"] = self.sigma[k].contiguous()
        header = {
            **self.info,
            "format": FORMAT_VERSION,
            "class_names": self.class_names,
            "channels": self.channels,
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> StyleBank:
        """Read a bank written by :meth:`save`.

        Raises:
            CheckpointError: missing file or not a FAMix style bank.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"{path}: style bank not found; mine one with `pivotseg famix mine`"
            )
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None
        if HEADER_KEY not in meta:
            raise CheckpointError(f"{path}: not a FAMix style bank (no {HEADER_KEY} header)")
        header = json.loads(meta[HEADER_KEY])
        names, channels = header.pop("class_names"), int(header.pop("channels"))
        header.pop("format", None)
        bank = cls(names, channels, header)
        for k in range(bank.num_classes + 1):
            bank.mu[k] = tensors[f"mu.{bank.key(k)}"]
            bank.sigma[k] = tensors[f"sigma.{bank.key(k)}"]
        return bank

    def check_fits(
        self,
        site: StyleSite,
        num_classes: int | None = None,
        where: str = "style bank",
        fingerprint: dict[str, str] | None = None,
    ) -> None:
        """Refuse a bank mined on another backbone, weights, layer or taxonomy (one line)."""
        own = self.info.get("backbone", {})
        name = site.backbone.name
        mined = f"{own.get('name')} from {own.get('source')}"
        if own.get("name") == name and self.info.get("layer") != site.layer_id:
            raise CheckpointError(
                f"{where}: mined at layer {self.info.get('layer')}, not {site.layer_id}; set "
                f"layer to {self.info.get('layer')} or mine at {site.layer_id}"
            )
        fp = fingerprint or site_fingerprint(site)
        if own.get("name") != name or own.get("config_hash") != fp["config_hash"]:
            raise CheckpointError(
                f"{where}: mined on another backbone ({mined}), not this {name}; mine styles "
                "for this backbone with `pivotseg famix mine`"
            )
        if own.get("weights_hash") != fp["weights_hash"]:
            raise CheckpointError(
                f"{where}: mined with other weights of {name} ({mined}); mine styles with the "
                "weights you train from"
            )
        if num_classes is not None and num_classes != self.num_classes:
            raise CheckpointError(
                f"{where}: has banks for {self.num_classes} classes, the model predicts "
                f"{num_classes}; mine on a dataset of the model's taxonomy"
            )


# ----- mining ----------------------------------------------------------------------------------
@dataclass
class MinedPatch:
    """One optimised patch: image ``batch_index``, grid cell ``patch``, dominant ``klass``."""

    batch_index: int
    patch: int
    klass: int


def select_patches(classes: torch.Tensor) -> list[MinedPatch]:
    """FAMix's choice: the first patch (image-major) of each distinct dominant class."""
    chosen, seen = [], set()
    for b, row in enumerate(classes.tolist()):
        for p, c in enumerate(row):
            if c not in seen:
                seen.add(c)
                chosen.append(MinedPatch(b, p, c))
    return chosen


def mine_styles(
    site: StyleSite,
    features: torch.Tensor,
    context: torch.Tensor | None,
    patches: Sequence[MinedPatch],
    targets: torch.Tensor,
    steps: int = 100,
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    parts: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt-driven instance normalisation of the chosen patches.

    Args:
        site: where ``features`` come from (its ``embed`` gives CLIP image embeddings).
        features: ``(B, C, h, w)`` site features of the batch (no grad needed).
        context: per-image context from :meth:`StyleSite.features` (ViT class tokens).
        patches: which patches to optimise.
        targets: ``(len(patches), D)`` L2-normalised text embeddings.
        steps, lr, momentum, weight_decay: FAMix's SGD settings.

    Returns:
        ``mu, sigma`` ``(N, C)`` after optimisation and the cosine similarities ``(N,)`` to the
        targets before and after it.
    """
    regions = patch_regions(features.shape[-2:], parts)
    normed, mu0, sigma0, ctx = [], [], [], []
    for item in patches:
        ys, xs = regions[item.patch]
        patch = features[item.batch_index, :, ys, xs].detach()
        m, s = mean_std(patch)
        normed.append((patch - m[:, None, None]) / s[:, None, None])
        mu0.append(m)
        sigma0.append(s)
        ctx.append(None if context is None else context[item.batch_index : item.batch_index + 1])
    mu = nn.Parameter(torch.stack(mu0).clone())
    sigma = nn.Parameter(torch.stack(sigma0).clone())
    optimizer = torch.optim.SGD([mu, sigma], lr=lr, momentum=momentum, weight_decay=weight_decay)
    targets = targets.to(features)
    act = site.activation or (lambda t: t)

    def cosine() -> torch.Tensor:
        styled = [
            act(sigma[i, :, None, None] * n + mu[i, :, None, None]) for i, n in enumerate(normed)
        ]
        return F.cosine_similarity(site.embed(styled, ctx), targets, dim=-1)

    with torch.no_grad():
        before = cosine()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (1 - cosine()).mean()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = cosine()
    return mu.detach(), sigma.detach(), before, after


# ----- training-time mixing --------------------------------------------------------------------
class FAMix(TuningMethod):
    """FAMix's training recipe as a tuning method: partial fine-tuning + local style mixing.

    Args:
        backbone: a ``clip_resnet`` (FAMix's RN50/RN101) or a ViT backbone.
        num_classes: K; must match the bank's classes.
        style_bank: the ``.safetensors`` bank mined for this backbone and layer.
        layer: the style site: a ``clip_resnet`` stage (default ``layer1``) or a block index
            (default 2).
        trainable: prefixes of backbone parameter names to train (default: the recipe's
            ``visual.layer4.2.`` for clip_resnet, the last block for ViTs); all else frozen, and
            frozen modules stay in eval mode (FAMix trains only layer4[2]'s batch norms).
        backbone_lr_mult: learning-rate factor of the trained backbone part (FAMix: 0.01 vs 0.1).
        parts: patches per side (3).
        beta: the Beta(beta, beta) of the mixing weights (0.1).
    """

    name = "famix"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        style_bank: str,
        layer: str | int | None = None,
        trainable: Sequence[str] | None = None,
        backbone_lr_mult: float = 0.1,
        parts: int = 3,
        beta: float = 0.1,
    ):
        super().__init__(
            backbone,
            num_classes,
            style_bank=str(style_bank),
            layer=layer,
            trainable=list(trainable) if trainable is not None else None,
            backbone_lr_mult=backbone_lr_mult,
            parts=parts,
            beta=beta,
        )
        if beta <= 0:
            raise ConfigError(f"famix: beta={beta} must be positive")
        self.parts = int(parts)
        self.beta = float(beta)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.site = style_site(backbone, layer)
        self._labels: torch.Tensor | None = None
        self._warned = False
        self.style_bank = str(style_bank)
        k = num_classes + 1
        # Non-persistent: the bank is data, not trained state; it follows .to(device).
        self.register_buffer("bank_mu", torch.zeros(0, self.site.channels), persistent=False)
        self.register_buffer("bank_sigma", torch.zeros(0, self.site.channels), persistent=False)
        self.register_buffer("bank_start", torch.zeros(k, dtype=torch.long), persistent=False)
        self.register_buffer("bank_count", torch.zeros(k, dtype=torch.long), persistent=False)
        self.bank_loaded = False
        # Check the bank before training starts; a trained model can be evaluated without it.
        if Path(style_bank).exists():
            self.load_bank()
        self._frozen_modules: list[nn.Module] = []

    def load_bank(self) -> None:
        """Read and check :attr:`style_bank` (done at construction when the file exists).

        Raises:
            CheckpointError: missing, empty, or mined for another backbone, layer or taxonomy.
        """
        path = self.style_bank
        bank = StyleBank.load(path)
        bank.check_fits(self.site, self.num_classes, where=path)
        if bank.channels != self.site.channels:
            raise CheckpointError(
                f"{path}: styles have {bank.channels} channels, {self.site.layer_id} has "
                f"{self.site.channels}"
            )
        counts = bank.counts()
        if sum(counts) == 0:
            raise CheckpointError(f"{path}: the style bank is empty; mine it first")
        device = self.bank_mu.device
        self.bank_mu = torch.cat(bank.mu).to(device)
        self.bank_sigma = torch.cat(bank.sigma).to(device)
        self.bank_start = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
        self.bank_count = torch.tensor(counts, device=device)
        self.bank_loaded = True

    def _default_trainable(self, backbone: Backbone) -> list[str]:
        if backbone.name == "clip_resnet":
            return [f"visual.layer4.{len(backbone.visual.layer4) - 1}."]
        last = backbone.blocks[-1]
        for name, module in backbone.named_modules():
            if module is last:
                return [name + "."]
        raise ConfigError(f"famix: cannot name the last block of {backbone.name}")

    def attach(self, backbone: Backbone) -> None:
        prefixes = tuple(self._args["trainable"] or self._default_trainable(backbone))
        matched = False
        for name, param in backbone.named_parameters():
            train = name.startswith(prefixes)
            param.requires_grad_(train)
            matched |= train
        if not matched:
            raise ConfigError(
                f"famix: trainable={list(prefixes)} matches no parameter of {backbone.name}"
            )
        self._frozen_modules = [
            m
            for m in backbone.modules()
            if m is not backbone
            and any(True for _ in m.parameters(recurse=False))
            and not any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._handles.append(backbone.register_forward_pre_hook(self._keep_frozen_in_eval))
        self._handles.append(self.site.hook(self._mix))

    def _keep_frozen_in_eval(self, module, args) -> None:
        for m in self._frozen_modules:
            m.eval()

    def param_group_rules(self) -> list[Rule]:
        return [(BACKBONE_PREFIX, {"lr_mult": self.backbone_lr_mult, "decay_mult": 1.0})]

    def prepare_batch(self, labels: torch.Tensor | None) -> None:
        """Give the next training forward its labels ``(B, H, W)`` (255 = ignore)."""
        self._labels = labels

    def sample_styles(
        self, classes: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank styles ``(B, P, C)`` for dominant ``classes`` ``(B, P)`` (``None``: any class)."""
        k = self.num_classes
        device = self.bank_mu.device
        p = self.parts * self.parts
        counts = self.bank_count
        if classes is None:
            owner = torch.full((batch, p), -1, dtype=torch.long, device=device)
        else:
            owner = classes.to(device)
            owner = torch.where(counts[owner] > 0, owner, k)  # fallback: the ignore bank
            owner = torch.where(counts[owner] > 0, owner, -1)  # then every bank
        pooled = owner < 0
        start = torch.where(pooled, 0, self.bank_start[owner.clamp(min=0)])
        size = torch.where(pooled, self.bank_mu.shape[0], counts[owner.clamp(min=0)])
        index = start + (torch.rand(owner.shape, device=device) * size).long()
        index = torch.minimum(index, start + size - 1)
        return self.bank_mu[index], self.bank_sigma[index]

    def _mix(self, features: torch.Tensor) -> torch.Tensor:
        labels, self._labels = self._labels, None
        if not self.training:
            return features
        if not self.bank_loaded:
            self.load_bank()
        b = features.shape[0]
        classes = None
        if labels is not None and labels.shape[0] == b:
            classes = dominant_classes(
                labels.to(features.device),
                features.shape[-2:],
                self.site.stride,
                self.num_classes,
                self.parts,
            )
        elif not self._warned:
            self._warned = True
            warnings.warn(
                "famix: no labels were given with prepare_batch(labels) before this training "
                "forward; styles are drawn from every class bank",
                stacklevel=2,
            )
        mu_t, sigma_t = self.sample_styles(classes, b)
        s = torch.distributions.Beta(self.beta, self.beta).sample((b, features.shape[1]))
        return mix_styles(
            features,
            mu_t.to(features),
            sigma_t.to(features),
            s.to(features),
            self.parts,
            self.site.activation,
        )
