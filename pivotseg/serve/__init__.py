"""``pivotseg serve``: a local web app to segment images with trained runs and to segment an
object shown in a reference image (FastAPI + one static page; see docs/serve.md).

:func:`create_app` builds the app (:mod:`pivotseg.serve.app`);
:func:`pivotseg.serve.server.serve_forever` runs it. The package itself imports nothing heavy,
so ``pivotseg serve --help`` reads its defaults from :mod:`pivotseg.serve.uploads` at no cost.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from pivotseg.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
