"""FAMix (Fahes et al., CVPR 2024): language-driven local style mining and mixing.

Two steps, both on the features of one early block output (the *style site*, :mod:`.site`),
split into a 3x3 grid of patches (:mod:`.styles`):

1. **Mining** (one pass over the source set, ``pivotseg famix mine``: :mod:`.mining`, with the
   per-batch prompt-driven instance normalisation in :mod:`.pin`) writes per-class banks of
   patch styles ``(mu, sigma)`` (:class:`StyleBank`, a ``.safetensors`` file, :mod:`.bank`).
2. **Mixing** (every training forward, the tuning method :class:`FAMix`, :mod:`.method`) mixes
   each patch's statistics with a bank style of its dominant class.

Style sites: a CLIP ResNet (``clip_resnet``) uses a stage output, FAMix's ``layer1`` (stride 4),
with ``act = ReLU`` (the stage ends in one) and the restyled patch average-pooled to the
pretraining grid (56x56 for 224 inputs) before layers 2-4 and the attention pool. A ViT (any
backbone with transformer blocks; mining needs a CLIP ViT with its projection) uses the patch
tokens after block ``layer`` on their token grid, ``act`` = identity.

The mining driver (:mod:`.mining`: ``MiningConfig``, ``mine_dataset``) is not imported here: it
pulls in the data and text-encoder packages, which training does not need.
"""

from pivotseg.tuning.famix.bank import FORMAT_VERSION, HEADER_KEY, StyleBank
from pivotseg.tuning.famix.method import FAMix
from pivotseg.tuning.famix.pin import MinedPatch, mine_styles, select_patches
from pivotseg.tuning.famix.site import StyleSite, site_fingerprint, style_site
from pivotseg.tuning.famix.styles import (
    EPS,
    IGNORE_INDEX,
    dominant_classes,
    grid_bounds,
    mean_std,
    mix_styles,
    patch_regions,
    patch_statistics,
    restyle,
)

__all__ = [
    "EPS",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "IGNORE_INDEX",
    "FAMix",
    "MinedPatch",
    "StyleBank",
    "StyleSite",
    "dominant_classes",
    "grid_bounds",
    "mean_std",
    "mine_styles",
    "mix_styles",
    "patch_regions",
    "patch_statistics",
    "restyle",
    "select_patches",
    "site_fingerprint",
    "style_site",
]
