"""The interface every decode head offers to the segmenter."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = 255

# Module types whose parameters get no weight decay (Rein: decay_mult 0 for every "norm").
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.batchnorm._BatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)


class Head(nn.Module):
    """A decode head: backbone feature maps in, per-class scores out.

    Subclasses implement :meth:`forward`, :meth:`loss` and :meth:`logits`; ``outputs`` is
    whatever :meth:`forward` returns and only the same head interprets it.

    Attributes:
        uses_queries: this head expects ``queries`` from the tuning method in :meth:`forward`
            (Rein's query linkage); the segmenter passes ``tuning.queries()`` only then.
        accepts_queries: the head class can be built with external queries at all; such a
            head takes ``external_queries`` and ``hidden_dim`` (the queries' width).
    """

    uses_queries: bool = False
    accepts_queries: bool = False

    @classmethod
    def query_dim(cls, args: dict[str, Any]) -> int:
        """The width external queries must have for this head built with ``args`` (its
        ``hidden_dim``); only for a head that :attr:`accepts_queries`."""
        if not cls.accepts_queries:
            raise TypeError(f"{cls.__name__} takes no external queries")
        default = inspect.signature(cls).parameters["hidden_dim"].default
        return int(args.get("hidden_dim", default))

    def forward(self, features: list[torch.Tensor], queries: torch.Tensor | None = None):
        raise NotImplementedError

    def loss(self, outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms (summed by the caller) for int64 ``labels (B, H, W)``; 255 is ignored.

        ``labels`` cover the same image area as the input the outputs were computed from.
        """
        raise NotImplementedError

    def logits(self, outputs, size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel class scores ``(B, K, *size)`` for evaluation (argmax gives the label)."""
        raise NotImplementedError

    def no_decay_parameter_names(self) -> set[str]:
        """Names (relative to this head) of parameters trained without weight decay.

        Norm layers, biases and embedding tables (learnt queries, level embeddings), as in
        Rein's and Mask2Former's recipes.
        """
        names = set()
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, _ in module.named_parameters(recurse=False):
                if (
                    isinstance(module, (*NORM_TYPES, nn.Embedding))
                    or name.endswith("bias")
                    or "level_embed" in name
                ):
                    names.add(prefix + name)
        return names
