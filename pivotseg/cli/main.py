"""``pivotseg`` command: a thin argparse front over the library's public functions.

Each command group lives in its own module with ``register(subparsers)``; :data:`COMMANDS` maps
the group name to that module so that ``pivotseg --help`` stays fast (modules import on use).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pivotseg.errors import PivotsegError

COMMANDS: dict[str, str] = {
    "demo": "pivotseg.cli.demo",
    "weights": "pivotseg.cli.weights",
    "data": "pivotseg.cli.data",
    "train": "pivotseg.cli.train",
    "eval": "pivotseg.cli.eval",
    "predict": "pivotseg.cli.predict",
    "adapt": "pivotseg.cli.adapt",
    "bench": "pivotseg.cli.bench",
    "ovseg": "pivotseg.cli.ovseg",
    "famix": "pivotseg.cli.famix",
    "refseg": "pivotseg.cli.refseg",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pivotseg",
        description="Segmentation with vision foundation models that generalises.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
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
