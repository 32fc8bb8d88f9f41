"""The backbone registry (a plain dict of builders, importable without transformers), the
block loop every chained backbone inherits, and the preset helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pivotseg.backbones.base import Backbone, choose_preset
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT

REGISTRY_PROBE = """
import json, sys
from pivotseg.backbones import BACKBONES
print(json.dumps({
    "builders": {k: [f.__module__, f.__name__] for k, f in BACKBONES.items()},
    "transformers": "transformers" in sys.modules,
}))
"""


def test_registry_maps_names_to_builders_without_importing_transformers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REGISTRY_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["transformers"]
    builders = result["builders"]
    assert builders["dinov2_reg"] == ["pivotseg.backbones.dinov2", "build_dinov2_reg"]
    assert builders["clip_resnet"] == ["pivotseg.backbones.clip_resnet", "build_clip_resnet"]
    assert set(builders) == {
        "dinov2", "dinov2_reg", "clip", "siglip", "sam", "sam2", "eva02", "clip_resnet", "tinyvit"
    }  # fmt: skip


class Counter(nn.Module):
    """Adds ``step`` to its input and counts its calls."""

    def __init__(self, step: float):
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, x):
        self.calls += 1
        return x + self.step


class Chain(Backbone):
    """Four blocks adding 1, 2, 3, 4 to a (B, 1, 2, 2) map; a neck that scales by 10."""

    name = "chain"

    def __init__(self, out_indices=None):
        super().__init__(out_indices)
        self.layers = nn.ModuleList(Counter(float(i + 1)) for i in range(4))

    @property
    def blocks(self):
        return list(self.layers)

    def block_input(self, pixel_values):
        return torch.zeros(pixel_values.shape[0], 1, 2, 2)

    def block_map(self, index, x):
        return x

    def neck_map(self, x):
        return 10 * x


def test_default_forward_blocks_runs_only_the_blocks_it_needs_in_the_order_asked():
    chain = Chain()
    maps = chain.forward_blocks(torch.zeros(1, 3, 8, 8), [2, 0])
    assert [m.flatten()[0].item() for m in maps] == [6.0, 1.0]  # 1 + 2 + 3, then 1
    assert [b.calls for b in chain.layers] == [1, 1, 1, 0]


def test_default_forward_blocks_reads_the_neck_after_the_last_block():
    chain = Chain()
    maps = chain.forward_blocks(torch.zeros(1, 3, 8, 8), [1, 4])
    assert [m.flatten()[0].item() for m in maps] == [3.0, 100.0]  # neck: 10 * (1 + 2 + 3 + 4)
    assert [b.calls for b in chain.layers] == [1, 1, 1, 1]


def test_choose_preset_returns_the_variant_and_the_other_settings():
    presets = {"small": {"width": 8}, "large": {"width": 16}}
    config = {"variant": "large", "depth": 2}
    assert choose_preset("toy", presets, config, "small") == ("large", {"depth": 2})
    assert config == {"variant": "large", "depth": 2}  # the caller's dict is left as it was
    assert choose_preset("toy", presets, None, "small") == ("small", {})
    with pytest.raises(ConfigError, match="toy: unknown variant 'huge'; known: small, large"):
        choose_preset("toy", presets, {"variant": "huge"}, "small")
