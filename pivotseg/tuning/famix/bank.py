"""Style banks: the mined ``(mu, sigma)`` pairs per class, in a ``.safetensors`` file.

Bank files carry a JSON header (safetensors metadata ``pivotseg_famix``) naming the backbone
(name, source, a hash of the shapes and one of the values of every tensor the style site's
features depend on) and the site; :meth:`StyleBank.check_fits` refuses a bank mined on another
backbone or layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pivotseg.errors import CheckpointError
from pivotseg.tuning.famix.site import StyleSite, site_fingerprint

HEADER_KEY = "pivotseg_famix"
FORMAT_VERSION = 1


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
