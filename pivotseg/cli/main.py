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
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
