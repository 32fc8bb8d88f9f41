"""DPFT's mechanisms are off by default since the paired ablation (docs/benchmarks.md): what a
default run can adapt with, and run folders saved before the change, which still load as they
were trained (their segmenter.json lists every switch)."""

from __future__ import annotations

import json

import pytest
import torch

from pivotseg.errors import ConfigError
from pivotseg.segmenter import CONFIG_FILE, build_segmenter, load_segmenter
from pivotseg.tasks.adapt import resolve_method
from tests.helpers import DPFT_ALL_ON, TINY_HEAD_ARGS, tiny_vit_config

SWITCHES = tuple(DPFT_ALL_ON)
TINY_DPFT = dict(num_tokens=12, per_class=2, rank=4, attn_dim=16, context_rank=8)


def dpft_segmenter(**method_args):
    torch.manual_seed(0)
    return build_segmenter(
        {
            "num_classes": 3,
            "backbone": "dinov2",
            "backbone_config": tiny_vit_config(),
            "method": "dpft",
            "method_args": {**TINY_DPFT, **method_args},
            "head": "fpn",
            "head_args": dict(TINY_HEAD_ARGS["fpn"]),
        },
        seed=0,
    ).eval()


def test_a_default_dpft_run_self_trains_and_spl_names_the_fix():
    model = dpft_segmenter()
    assert not model.tuning.uses_pivots and model.warmup_images == 0
    assert resolve_method(model, "auto") == "selftrain"
    with pytest.raises(ConfigError) as err:
        resolve_method(model, "spl")
    message = str(err.value)
    assert message.startswith("a dpft run without set pivots cannot adapt with spl")
    assert "\n" not in message and "--method selftrain" in message
    assert "pivot_loss: true" in message and "presence_gating" in message
    # Either mechanism gives the run pivots and allows spl, which auto still does not pick
    # (its pivot parts measured no effect).
    pivots = dpft_segmenter(pivot_loss=True)
    assert resolve_method(pivots, "spl") == "spl" and resolve_method(pivots, "auto") == "selftrain"
    gated = dpft_segmenter(class_prompts=True, presence_gating=True)
    assert resolve_method(gated, "spl") == "spl"


def test_checkpoints_saved_with_every_switch_on_load_the_full_dpft(tmp_path):
    # Before the defaults changed, a run saved every switch as True in segmenter.json.
    old = dpft_segmenter(**DPFT_ALL_ON)
    with torch.no_grad():
        old.tuning.pivot_banks["32"].pivots.normal_()
        old.tuning.pivot_banks["32"].valid.fill_(True)
    old.save(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())["method_args"]
    assert all(saved[s] is True for s in SWITCHES)
    loaded = load_segmenter(tmp_path / "old")
    assert all(getattr(loaded.tuning, s) for s in SWITCHES)
    torch.testing.assert_close(
        loaded.tuning.pivot_banks["32"].pivots, old.tuning.pivot_banks["32"].pivots
    )
    assert hasattr(loaded.tuning, "context") and loaded.tuning.presence_blocks == [3]
    assert resolve_method(loaded, "spl") == "spl"  # its pivots came back: spl is allowed
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old(x))

    new = dpft_segmenter()
    new.save(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / CONFIG_FILE).read_text())["method_args"]
    assert all(saved[s] is False for s in SWITCHES)  # a later default change cannot alter it
    rebuilt = load_segmenter(tmp_path / "new")
    assert not hasattr(rebuilt.tuning, "pivot_banks") and not hasattr(rebuilt.tuning, "context")
    assert not any(k.startswith("tuning.pivot_banks") for k in rebuilt.state_dict())
