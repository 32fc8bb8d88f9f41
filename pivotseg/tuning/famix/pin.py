"""Prompt-driven instance normalisation (PIN): the per-batch optimisation of FAMix's mining.

For a patch whose dominant class (mode of its label patch, ignore included) is ``c``, the
patch's channel mean ``mu`` and std ``sigma`` (initialised to its own statistics) are optimised
so that CLIP's image embedding of ``act(sigma * norm(patch) + mu)`` matches the text embedding
of ``"<style> <class name>"`` (``"photo"`` for ignore): loss ``1 - cos``, SGD lr 1, momentum
0.9, weight decay 1e-4, 100 steps. As in FAMix's code, one patch per distinct dominant class of
a batch is optimised (its first occurrence).

ViT sites: the class token of the image at the site's block stands in for the patch's class
token and the remaining blocks run on ``[class token, patch tokens]``; ``post_layernorm`` and
``visual_projection`` of the class token give the embedding [P]: FAMix defines this for
ResNets only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.tuning.famix.site import StyleSite
from pivotseg.tuning.famix.styles import mean_std, patch_regions


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
