"""Start-up time of the ``pivotseg`` command, an older revision and this tree side by side.

Times (wall clock and CPU, median of interleaved repeats) ``pivotseg --help``,
``pivotseg train --help`` and ``pivotseg data check`` on a one-image dataset written to a
temporary folder, with ``python -c pass`` as the floor. The older revision (``--before``,
default 1ebc0b0) is checked out with ``git worktree add --detach`` into a temporary folder,
removed afterwards. Both run with this Python as ``python -m pivotseg`` from their own
folder, so each imports its own pivotseg (checked before timing). Each command first runs once
untimed (bytecode compiled, files cached); the rounds then alternate which revision goes first.

    python bench/startup.py [--before 1ebc0b0] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section

REPO_ROOT = check_checkout(__file__)

HEAVY = ("torch", "transformers")


def commands(dataset: Path) -> dict[str, list[str]]:
    """Row label -> the arguments after ``python``."""
    return {
        "`python -c pass`": ["-c", "pass"],
        "`pivotseg --help`": ["-m", "pivotseg", "--help"],
        "`pivotseg train --help`": ["-m", "pivotseg", "train", "--help"],
        "`pivotseg data check` (1 image)": [
            *("-m", "pivotseg", "data", "check", str(dataset)),
            *("--format", "folder", "--quiet"),
        ],
    }


def one_image_dataset(root: Path) -> Path:
    """A folder-format dataset of one 480x360 image (CamVid's size) and its label."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / "frame.png")
    Image.fromarray(rng.integers(0, 3, (360, 480), dtype=np.uint8)).save(
        root / "labels" / "frame.png"
    )
    (root / "classes.json").write_text(json.dumps({"classes": ["road", "car", "sky"]}))
    return root


def child_env() -> dict[str, str]:
    # The folder a command runs in decides which pivotseg it imports: nothing else may.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(args: list[str], cwd: Path, stderr=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} in {cwd} exited with {done.returncode}")
    return done


def check_imported_from(tree: Path) -> None:
    done = run(["-c", "import pivotseg; print(pivotseg.__file__)"], tree)
    found = Path(done.stdout.strip()).resolve()
    if found != (tree / "pivotseg" / "__init__.py").resolve():
        raise SystemExit(f"{tree}: python imports {found}, not this tree's pivotseg")


def heavy_imports(args: list[str], cwd: Path) -> list[str]:
    """Which of :data:`HEAVY` the command imports (``python -X importtime``)."""
    err = run(["-X", "importtime", *args], cwd, stderr=subprocess.PIPE).stderr
    return [m for m in HEAVY if re.search(rf"\|\s+{m}$", err, re.MULTILINE)]


def timed(args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system, of the child) of one run, in seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run(args, cwd)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def measure(trees: dict[str, Path], cmds: dict[str, list[str]], repeats: int) -> dict:
    """``(label, rev) -> (median wall, median CPU)``."""
    times = {(label, rev): [] for label in cmds for rev in trees}
    for args in cmds.values():
        for tree in trees.values():
            run(args, tree)  # untimed: compiles bytecode, warms the file cache
    order = list(trees)
    for round_ in range(repeats):
        for label, args in cmds.items():
            for rev in order if round_ % 2 == 0 else order[::-1]:
                times[(label, rev)].append(timed(args, trees[rev]))
        print(f"round {round_ + 1}/{repeats} done", file=sys.stderr)
    return {
        key: tuple(statistics.median(column) for column in zip(*values))
        for key, values in times.items()
    }


def table(trees, cmds, medians, heavy) -> str:
    before, after = list(trees)
    rows = []
    for label in cmds:
        (bw, bc), (aw, ac) = medians[(label, before)], medians[(label, after)]
        loaded = [", ".join(heavy[(label, rev)]) or "-" for rev in (before, after)]
        rows.append(
            [label, f"{bw:.2f}", f"{aw:.2f}", f"{bw / aw:.1f}x", f"{bc:.2f}", f"{ac:.2f}", *loaded]
        )
    header = [
        "command",
        f"wall, {before} (s)",
        f"wall, {after} (s)",
        "wall speed-up",
        f"CPU, {before} (s)",
        f"CPU, {after} (s)",
        f"imports ({before})",
        f"imports ({after})",
    ]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="1ebc0b0", help="the older revision (git)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per command and tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pivotseg-startup-") as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(old), args.before],
            check=True,
            capture_output=True,
        )
        try:
            trees = {args.before: old, "this tree": REPO_ROOT}
            for tree in trees.values():
                check_imported_from(tree)
            cmds = commands(one_image_dataset(tmp / "one_image"))
            heavy = {
                (label, rev): heavy_imports(cmd, tree)
                for label, cmd in cmds.items()
                for rev, tree in trees.items()
            }
            medians = measure(trees, cmds, args.repeats)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(old)],
                check=True,
                capture_output=True,
            )
    result = table(trees, cmds, medians, heavy)
    body = (
        f"Wall time and CPU time (user + system of the command's process), median of "
        f"{args.repeats} runs per command and tree, interleaved (the rounds "
        f"alternate which tree goes first), after one untimed run of each. `pivotseg` runs as "
        f"`python -m pivotseg` with the same Python from each tree's folder (revision "
        f"{args.before} in a temporary `git worktree`), so each imports its own pivotseg. `data "
        "check` reads a folder-format dataset of one 480x360 PNG and its label. The imports "
        "columns name the heavy packages the command loads (`python -X importtime`).\n\n"
        + result
        + "\n\nThe machine's 2 cores are shared with other jobs (this script ran at niceness "
        f"{os.nice(0)}), "
        "so wall times carry their load; CPU time hardly does, and the medians of interleaved "
        "runs compare the two trees under the same load."
    )
    command = f"python bench/startup.py --before {args.before} --repeats {args.repeats}"
    write_section("startup", "Start-up time of the CLI", command, body)
    print(result)


if __name__ == "__main__":
    main()
