"""Issue #13, checkpoints and loops: damaged, missing or non-finite checkpoints give one line that
names the file and the run's other checkpoints; worker errors stay one line; two identical runs
write byte-identical random state."""

from __future__ import annotations

import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pivotseg.cli.main import main
from pivotseg.config import EvalConfig, TrainConfig
from pivotseg.engine import Trainer
from pivotseg.engine import checkpoint as ckpt
from pivotseg.errors import CheckpointError, DataError
from pivotseg.segmenter import SegmenterConfig, build_segmenter, load_segmenter
from pivotseg.tasks.dgss.evaluate import evaluate_datasets
from tests.helpers import tiny_vit_config

BROKEN_IMAGE = "data/img_007.png: not an image (truncated PNG); re-export it or remove it"


class Toy(nn.Module):
    """A 1x1 conv classifier with dropout, so that training draws from the torch generator."""

    config = SimpleNamespace(num_classes=3, class_names=None)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.2)

    def forward(self, images):
        return self.conv(self.drop(images / 255.0))

    def compute_loss(self, images, labels):
        loss = F.cross_entropy(self(images), labels)
        return loss, {"ce": loss.detach()}


class ToyData(Dataset):
    classes = ["r", "g", "b"]

    def __init__(self, n: int = 4):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 8, 8, generator=gen) * 255

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.images[i].argmax(0)}


class BrokenData(ToyData):
    def __getitem__(self, i):
        raise DataError(BROKEN_IMAGE)


def train_toy(run, data=None, num_workers=0, resume=None, **cfg):
    torch.manual_seed(0)
    settings = dict(iterations=4, global_batch_size=2, lr=0.05, weight_decay=0.0)
    settings.update(eval_every=0, checkpoint_every=2, log_every=1, **cfg)
    trainer = Trainer(
        Toy(), TrainConfig(**settings), data or ToyData(), run, num_workers=num_workers
    )
    trainer.fit(resume=resume)
    return run


def one_line(err) -> str:
    assert "\n" not in str(err) and "Traceback" not in str(err), str(err)
    return str(err)


# ----- random state -----------------------------------------------------------------------------
def test_identical_runs_write_identical_rng_files(tmp_path):
    files = []
    for entropy in (1, 2):
        # A fresh process starts Python's and NumPy's generators from OS entropy.
        random.seed(entropy)
        np.random.seed(entropy)
        run = train_toy(tmp_path / f"run{entropy}")
        files.append((run / "checkpoints" / "last" / "rng.safetensors").read_bytes())
    assert files[0] == files[1]


# ----- damaged checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_checkpoint_on_resume_names_file_and_earlier_checkpoint(tmp_path, name, damage):
    run = train_toy(tmp_path / "run")
    path = run / "checkpoints" / "last" / name
    data = path.read_bytes()
    # `last` shares its files with iter_0000004 (hard links): both are damaged
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError) as err:
        train_toy(run, resume=run, iterations=6)
    message = one_line(err.value)
    assert message.startswith(f"{path}: unreadable")
    assert f"e.g. {run / 'checkpoints' / 'iter_0000002'}" in message


def segmenter_run(tmp_path):
    """A run folder holding iter_0000002, iter_0000004 and last of a tiny segmenter."""
    cfg = SegmenterConfig(
        num_classes=3,
        backbone="dinov2",
        backbone_config=tiny_vit_config(),
        method="frozen",
        head="fpn",
        head_args={"channels": 16},
    )
    model = build_segmenter(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    for it in (2, 4):
        model.save(checkpoints / f"iter_{it:07d}")
    ckpt.link_checkpoint(checkpoints / "iter_0000004", checkpoints / "last")
    return model, tmp_path / "run"


def test_truncated_model_on_eval_names_file_and_earlier_checkpoint(tmp_path, capsys):
    _, run = segmenter_run(tmp_path)
    path = run / "checkpoints" / "last" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        load_segmenter(run / "checkpoints" / "last")
    assert one_line(err.value).startswith(f"{path}: unreadable")
    assert f"e.g. {run / 'checkpoints' / 'iter_0000002'}" in str(err.value)
    assert main(["eval", str(run), "--data", "x=/nowhere:folder:val"]) == 2
    printed = capsys.readouterr().err.strip()
    assert "\n" not in printed and "iter_0000002" in printed


def test_non_finite_checkpoint_is_refused_naming_the_tensors(tmp_path):
    model, run = segmenter_run(tmp_path)
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("head."))
    with torch.no_grad():
        param.fill_(float("nan"))
    folder = run / "checkpoints" / "iter_0000006"
    model.save(folder)
    with pytest.raises(CheckpointError) as err:
        load_segmenter(folder)
    message = one_line(err.value)
    assert message.startswith(f"{folder / 'model.safetensors'}: 1 of ")
    assert f"NaN or infinite values (e.g. {name})" in message
    assert "iter_0000004" in message


def test_missing_last_points_to_the_existing_checkpoints(tmp_path, capsys):
    _, run = segmenter_run(tmp_path)
    shutil.rmtree(run / "checkpoints" / "last")
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_checkpoint(run)
    message = one_line(err.value)
    assert "iter_0000002, iter_0000004" in message
    assert f"e.g. {run / 'checkpoints' / 'iter_0000004'}" in message
    assert main(["eval", str(run), "--data", "x=/nowhere:folder:val"]) == 2
    assert "iter_0000004" in capsys.readouterr().err


# ----- errors in DataLoader workers ------------------------------------------------------------
def test_worker_data_error_in_training_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        train_toy(tmp_path / "run", data=BrokenData(), num_workers=1)
    assert str(err.value) == BROKEN_IMAGE


def test_worker_data_error_in_evaluation_is_one_line():
    with pytest.raises(DataError) as err:
        evaluate_datasets(Toy(), {"bad": BrokenData()}, EvalConfig(), num_workers=1)
    assert str(err.value) == BROKEN_IMAGE
