"""FAMix's training recipe as a tuning method: partial fine-tuning + local style mixing.

Every training forward (identity in eval mode), each patch of the style site's features is
normalised by its own statistics, a bank style ``(mu_t, sigma_t)`` of its dominant class is
drawn (fallback: the ignore bank, then all banks), ``s ~ Beta(0.1, 0.1)`` per sample and
channel, and ``mu_mix = s mu + (1 - s) mu_t`` (likewise sigma) restyles it:
``act(sigma_mix f̂ + mu_mix)``.

Labels reach the mixing hook through :meth:`FAMix.prepare_batch`, which the training loop must
call with the batch's labels before the forward (the segmenter's forward carries no labels).
Without it, styles are drawn from all banks regardless of class and a warning says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tuning.base import BACKBONE_PREFIX, Rule, TuningMethod
from pivotseg.tuning.famix.bank import StyleBank
from pivotseg.tuning.famix.site import style_site
from pivotseg.tuning.famix.styles import dominant_classes, mix_styles


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
    path_args = ("style_bank",)

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
        prefix = backbone.last_block_prefix()
        if prefix is None:
            raise ConfigError(f"famix: cannot name the last block of {backbone.name}")
        return [prefix]

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
