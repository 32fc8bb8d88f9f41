"""Config dataset specs with ``corruptions``: a cached adverse copy, the same files as
``pivotseg data corrupt --mix`` writes."""

from __future__ import annotations

import numpy as np
import pytest

from pivotseg.cli.main import main
from pivotseg.config import DatasetSpec, config_from_dict
from pivotseg.data.from_spec import corrupted_copy_path, dataset_from_spec, spec_root
from pivotseg.errors import ConfigError
from tests.test_data_corrupt import digest, write_camvid

CORRUPTIONS = ["fog:3", "night:3", "motion_blur:2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    pytest.importorskip("albumentations", reason="albumentations is absent")
    monkeypatch.setenv("PIVOTSEG_CACHE", str(tmp_path / "cache"))


def spec_for(root, seed=0, corruptions=CORRUPTIONS) -> DatasetSpec:
    return DatasetSpec(
        path=str(root),
        format="camvid",
        split="test",
        name="adverse",
        corruptions=list(corruptions),
        corruption_seed=seed,
    )


def test_a_corrupted_spec_reads_the_files_data_corrupt_mix_writes(tmp_path):
    src = tmp_path / "camvid"
    write_camvid(src, n=5)
    spec = spec_for(src)
    dataset = dataset_from_spec(spec)
    assert len(dataset) == 5
    root = spec_root(spec)
    assert root == corrupted_copy_path(spec) and root.is_relative_to(tmp_path / "cache")

    by_hand = tmp_path / "by_hand"
    argv = ["data", "corrupt", str(src), "--format", "camvid", "--split", "test", "--mix"]
    argv += ["--out", str(by_hand), "--seed", "0"]
    for c in CORRUPTIONS:
        argv += ["--corruption", c]
    assert main(argv) == 0
    assert digest(by_hand) == digest(root)
    # Labels are the source's; images are not.
    item = dataset[0]
    source_item = dataset_from_spec(DatasetSpec(path=str(src), format="camvid", split="test"))[0]
    assert np.array_equal(item["label"], source_item["label"])
    assert not np.array_equal(item["image"], source_item["image"])


def test_the_copy_is_made_once_and_the_seed_names_another(tmp_path):
    src = tmp_path / "camvid"
    write_camvid(src, n=3)
    root = spec_root(spec_for(src))
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert spec_root(spec_for(src)) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    other = spec_root(spec_for(src, seed=1))
    assert other != root
    assert digest(other) != digest(root)


def test_a_spec_without_corruptions_reads_its_own_folder(tmp_path):
    src = tmp_path / "camvid"
    write_camvid(src, n=2)
    spec = DatasetSpec(path=str(src), format="camvid", split="test")
    assert spec_root(spec) == src
    assert not (tmp_path / "cache").exists()


def test_an_unknown_corruption_in_a_config_target_is_one_line(tmp_path):
    src = tmp_path / "camvid"
    write_camvid(src, n=2)
    cfg = config_from_dict(
        {
            "model": {"num_classes": 11},
            "data": {"targets": [{"path": str(src), "format": "camvid", "corruptions": ["fgo:3"]}]},
        }
    )
    with pytest.raises(ConfigError, match="unknown corruption 'fgo'; known corruptions: fog"):
        spec_root(cfg.data.targets[0])
