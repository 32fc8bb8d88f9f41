"""``_base_`` inheritance of config files, the recipes rewritten on it, and PIVOTSEG_SHARED.

tests/data/config_recipes_flat.json holds every recipe of configs/ as it was before the recipes
were rewritten on ``_base_`` (commit 1ebc0b0), flat, as ``yaml.safe_load`` read each file. It
was written once, from that commit's files, with::

    import json, yaml
    from pathlib import Path
    old = {p.name: yaml.safe_load(p.read_text()) for p in sorted(Path("configs").glob("*.yaml"))}
    Path("tests/data/config_recipes_flat.json").write_text(json.dumps(old, indent=1) + "\\n")

Do not regenerate it from the rewritten files: it is the independent truth they are checked
against. A deliberate change of a recipe's settings changes its entry by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pivotseg.config import config_from_dict, dump_config, load_config, save_config
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT

FLAT = json.loads((REPO_ROOT / "tests" / "data" / "config_recipes_flat.json").read_text())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(FLAT))
def test_recipes_resolve_as_their_flat_versions(name):
    """Byte-identical resolved YAML: finished bench runs are reused only when their saved
    config.yaml matches, and dict order (method_args, head_args) is part of that text."""
    flat = {**FLAT[name], "run_dir": str(Path("runs") / Path(name).stem)}
    assert dump_config(load_config(REPO_ROOT / "configs" / name)) == dump_config(
        config_from_dict(flat)
    )


def test_bench_overrides_apply_after_the_bases():
    # What `pivotseg bench dg` passes for a Rein row of seed 1 (benchmark._overrides_for).
    over = ["model.method=rein", "model.method_args={}", "seed=1", "run_dir=runs/x"]
    flat = FLAT["bench_dg_tinyvit_camvid.yaml"]
    got = load_config(REPO_ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml", over)
    assert dump_config(got) == dump_config(config_from_dict(flat, over))


BASE = """\
model: {num_classes: 3, method: rein, method_args: {num_tokens: 10, rank: 4}}
data:
  source: {path: /data/x, format: folder}
  targets: [{path: /data/a}, {path: /data/b}]
  scales: [256, 512]
train: {lr: 1.0e-3, iterations: 100, betas: [0.8, 0.9]}
"""
BASE_DATA = yaml.safe_load(BASE)


def test_bases_deep_merge_in_order_then_the_file_then_overrides(tmp_path):
    write(tmp_path / "base" / "a.yaml", BASE)
    write(tmp_path / "base" / "b.yaml", "train: {lr: 2.0e-3, warmup_iters: 5}\nseed: 3\n")
    path = write(
        tmp_path / "exp.yaml",
        "_base_: [base/a.yaml, base/b.yaml]\n"
        "model: {method_args: {rank: 8}}\n"
        "data: {targets: [{path: /data/c}], scales: [300]}\n"
        "train: {iterations: 50}\n",
    )
    cfg = load_config(path, ["train.warmup_iters=7", "data.targets.0.split=val"])
    # Mappings merge key by key, keeping the inherited keys in their order.
    assert list(cfg.model.method_args.items()) == [("num_tokens", 10), ("rank", 8)]
    assert cfg.model.method == "rein" and cfg.data.source.path == "/data/x"
    # Lists replace: one target, one scale.
    assert [t.path for t in cfg.data.targets] == ["/data/c"] and cfg.data.scales == [300]
    assert cfg.data.targets[0].split == "val"
    # b.yaml after a.yaml, the file after both, the command line last.
    assert cfg.train.lr == 2e-3 and cfg.seed == 3 and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.iterations == 50 and cfg.train.warmup_iters == 7
    assert cfg.run_dir == str(Path("runs") / "exp")  # the including file names the run


def test_bases_of_bases_are_relative_to_their_own_file(tmp_path):
    write(tmp_path / "lib" / "models" / "m.yaml", "_base_: ../root.yaml\nmodel: {head: fpn}\n")
    write(tmp_path / "lib" / "root.yaml", BASE)
    path = write(tmp_path / "runs_cfg" / "exp.yaml", "_base_: ../lib/models/m.yaml\nseed: 4\n")
    cfg = load_config(path)
    assert cfg.model.head == "fpn" and cfg.model.num_classes == 3 and cfg.seed == 4


def test_delete_replaces_the_inherited_mapping(tmp_path):
    write(tmp_path / "a.yaml", BASE)
    path = write(
        tmp_path / "exp.yaml",
        "_base_: a.yaml\nmodel: {method_args: {_delete_: true, alpha: 2}}\n",
    )
    assert load_config(path).model.method_args == {"alpha": 2}
    bad = write(tmp_path / "bad.yaml", "_base_: a.yaml\nmodel: {method_args: {_delete_: yes!}}\n")
    with pytest.raises(ConfigError, match=r"model.method_args._delete_='yes!'; write _delete_"):
        load_config(bad)


def test_a_cycle_is_refused_naming_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "_base_: ../a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(a)
    message = str(err.value)
    chain = [tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "sub" / "c.yaml"]
    assert "_base_ cycle " + " -> ".join(str(p.resolve()) for p in [*chain, chain[0]]) in message
    assert "\n" not in message


def test_a_file_that_is_its_own_base_is_a_cycle(tmp_path):
    path = write(tmp_path / "a.yaml", BASE + "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(path)


def test_the_same_base_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", BASE)
    write(tmp_path / "x.yaml", "_base_: root.yaml\ntrain: {lr: 0.5}\n")
    write(tmp_path / "y.yaml", "_base_: root.yaml\nseed: 9\n")
    path = write(tmp_path / "exp.yaml", "_base_: [x.yaml, y.yaml]\n")
    cfg = load_config(path)
    # y's copy of root comes after x: root's lr wins back, as a plain in-order merge gives.
    assert cfg.seed == 9 and cfg.train.lr == 1e-3


def test_a_missing_base_names_the_file_and_the_path_tried(tmp_path):
    path = write(tmp_path / "cfg" / "exp.yaml", "_base_: [../nope/base.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: _base_ '../nope/base.yaml' not found")
    assert f"looked for {tmp_path / 'cfg' / '..' / 'nope' / 'base.yaml'}" in message


@pytest.mark.parametrize("value", ["3", "[a.yaml, 4]", "{a: b}"])
def test_a_bad_base_value_is_named(tmp_path, value):
    path = write(tmp_path / "exp.yaml", f"_base_: {value}\n")
    with pytest.raises(ConfigError, match="give a file name or a list of them"):
        load_config(path)


def test_errors_in_a_base_name_the_base(tmp_path):
    write(tmp_path / "a.yaml", "model: {num_classes: 3\n")
    path = write(tmp_path / "exp.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml, line \d+: not valid YAML"):
        load_config(path)
    write(tmp_path / "a.yaml", "- 1\n")
    with pytest.raises(ConfigError, match=r"a.yaml: the top level must be a mapping"):
        load_config(path)


def test_an_unknown_key_from_a_base_names_that_base(tmp_path):
    base = write(tmp_path / "a.yaml", BASE + "eval: {mode: whole, bach_size: 2}\n")
    path = write(tmp_path / "exp.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"unknown config key eval.bach_size (set in {base}); did you mean eval.batch_size?"
    )
    # Inside a list item: the file that set the list.
    write(tmp_path / "a.yaml", BASE.replace("{path: /data/b}", "{path: /data/b, fromat: x}"))
    with pytest.raises(ConfigError, match=rf"data.targets.1.fromat \(set in {base}\)"):
        load_config(path)


def test_an_unknown_key_of_the_file_or_command_line_reads_as_before(tmp_path):
    write(tmp_path / "a.yaml", BASE)
    path = write(tmp_path / "exp.yaml", "_base_: a.yaml\ntrain: {lrr: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == "unknown config key train.lrr; did you mean train.lr?"
    path = write(tmp_path / "exp.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.method_args={}", "model.hed=fpn"])
    assert str(err.value) == "unknown config key model.hed; did you mean model.head?"


def test_the_run_folder_config_is_flat_and_loads_back_the_same(tmp_path):
    """train() writes RUN/config.yaml with save_config (tasks/dgss/train.py)."""
    write(tmp_path / "lib" / "a.yaml", BASE)
    path = write(tmp_path / "exp.yaml", "_base_: lib/a.yaml\nmodel: {method_args: {rank: 2}}\n")
    cfg = load_config(path, ["seed=5"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(saved.read_text())
    assert "_base_" not in saved.read_text() and data["model"]["method_args"]["num_tokens"] == 10
    assert load_config(saved) == cfg


def test_shipped_bench_config_written_to_a_run_folder_loads_back(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "demo_dpft_tinyvit_camvid.yaml")
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert "_base_" not in saved.read_text()
    assert load_config(saved) == cfg and dump_config(load_config(saved)) == dump_config(cfg)


# ----- PIVOTSEG_SHARED wins over ../shared ------------------------------------------------------
def shared_layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A ../shared beside the current folder and another shared folder, both with the file."""
    beside = write(tmp_path / "shared" / "weights" / "w.safetensors", "beside")
    chosen = write(tmp_path / "elsewhere" / "weights" / "w.safetensors", "chosen")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return beside, chosen


def test_pivotseg_shared_wins_over_a_shared_folder_beside_the_cwd(tmp_path, monkeypatch):
    beside, chosen = shared_layout(tmp_path, monkeypatch)
    over = ["model.backbone_source=../shared/weights/w.safetensors"]
    monkeypatch.delenv("PIVOTSEG_SHARED", raising=False)
    assert config_from_dict(BASE_DATA, over).model.backbone_source == str(beside.resolve())
    monkeypatch.setenv("PIVOTSEG_SHARED", str(tmp_path / "elsewhere"))
    assert config_from_dict(BASE_DATA, over).model.backbone_source == str(chosen.resolve())


def test_pivotseg_shared_applies_to_datasets_and_names_a_missing_file_there(tmp_path, monkeypatch):
    shared_layout(tmp_path, monkeypatch)
    (tmp_path / "shared" / "data" / "camvid").mkdir(parents=True)
    monkeypatch.setenv("PIVOTSEG_SHARED", str(tmp_path / "elsewhere"))
    cfg = config_from_dict(BASE_DATA, ["data.source.path=../shared/data/camvid"])
    # Absent from the chosen folder: the path a later error names is the one the user chose.
    assert cfg.data.source.path == str((tmp_path / "elsewhere" / "data" / "camvid").resolve())
    # Other relative paths keep the current-folder-then-repository rule.
    (tmp_path / "work" / "local").mkdir()
    cfg = config_from_dict(BASE_DATA, ["data.source.path=local"])
    assert cfg.data.source.path == str(tmp_path / "work" / "local")
