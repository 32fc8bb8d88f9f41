"""``pivotseg`` command: a thin argparse front over the library's public functions.

Each command group lives in its own module with ``register(subparsers)``. Those modules import
only the standard library and light pivotseg modules at the top; torch, transformers and the
tasks are imported inside the function that runs a command, so ``pivotseg --help`` and every
``--help`` below it start in a fraction of a second (tests/test_cli_startup.py checks this).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from pivotseg.cli import (
    adapt,
    bench,
    data,
    demo,
    export,
    famix,
    ovseg,
    predict,
    refseg,
    serve,
    train,
    weights,
)
from pivotseg.cli import eval as evaluate  # not to shadow the builtin
from pivotseg.errors import PivotsegError

COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "weights": weights,
    "data": data,
    "train": train,
    "eval": evaluate,
    "predict": predict,
    "export": export,
    "adapt": adapt,
    "bench": bench,
    "ovseg": ovseg,
    "famix": famix,
    "refseg": refseg,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pivotseg",
        description="Segmentation with vision foundation models that generalises.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except PivotsegError as err:
        print(f"pivotseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pivotseg: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return int(code or 0)


def _close_process_group() -> None:
    # Under torchrun, gloo/nccl threads still alive at interpreter exit can abort the process
    # ("terminate called without an active exception") after all work is done.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
