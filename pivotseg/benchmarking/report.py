"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a
rerun replaces only that block (appended at the end the first time). README.md's results are
written the same way (:func:`write_readme_block`), between markers placed by hand, so that no
figure in it is typed by hand.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from pivotseg.paths import REPO_ROOT

# The checkout's files (bench/ scripts run from a source checkout, pivotseg installed editable).
DOC = REPO_ROOT / "docs" / "benchmarks.md"
README = REPO_ROOT / "README.md"
HEADER = "# Benchmarks\n\nEvery figure here comes from a script under `bench/`; each section names the command and the machine.\n"


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {dev}; Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def write_section(name: str, title: str, command: str, body: str, doc: Path = DOC) -> Path:
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    text = doc.read_text() if doc.exists() else HEADER
    replaced = _replace_block(text, name, block)
    text = replaced if replaced is not None else text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc


def write_readme_block(name: str, body: str, readme: Path = README) -> Path:
    """Replace the text between README's ``<!-- bench:NAME -->`` markers with ``body``.

    Raises:
        SystemExit: the markers are missing (the README is never appended to blindly).
    """
    block = f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->\n"
    text = readme.read_text()
    replaced = _replace_block(text, name, block)
    if replaced is None:
        raise SystemExit(
            f"{readme}: no <!-- bench:{name} --> ... <!-- /bench:{name} --> markers; put the two "
            "lines where the generated results belong and run again"
        )
    readme.write_text(replaced)
    return readme


def _replace_block(text: str, name: str, block: str) -> str | None:
    """``text`` with its NAME block replaced by ``block``; None when the markers are absent."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1].lstrip("\n")
    return before + block + ("\n" + after if after else "")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
