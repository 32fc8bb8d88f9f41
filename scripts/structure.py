"""Structure figures of the package, for refactors measured before and after.

    python scripts/structure.py [--root pivotseg] [--json FILE]

Prints files over 500 lines, functions over 80 lines, imports inside functions (lazy imports,
counted per subpackage: the CLI keeps them on purpose for its start-up time) and the import graph
between subpackages (``pivotseg.X`` -> ``pivotseg.Y`` edges, from module-level and lazy imports).
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter, defaultdict
from pathlib import Path

LONG_FILE, LONG_FUNCTION = 500, 80


def subpackage(module: str) -> str:
    """``pivotseg.tasks.adapt.uda`` -> ``tasks.adapt``; ``pivotseg.segmenter`` -> ``segmenter``."""
    parts = module.split(".")[1:]
    if parts and parts[0] == "tasks" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: Path) -> dict:
    long_files, long_functions = [], []
    lazy = Counter()
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n") + 1
        rel = str(path.relative_to(root.parent))
        if lines > LONG_FILE:
            long_files.append((rel, lines))
        tree = ast.parse(text)
        module = module_name(root, path)
        here = subpackage(module)
        functions = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for fn in functions:
            length = fn.end_lineno - fn.lineno + 1
            if length > LONG_FUNCTION:
                long_functions.append((f"{rel}::{fn.name}", length))
        inside = {id(n) for fn in functions for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [resolve(module, node, path.name == "__init__.py") or ""]
            else:
                continue
            if id(node) in inside:
                lazy[here] += 1
            for name in names:
                if name.startswith(root.name + ".") and subpackage(name) != here:
                    edges[(here, subpackage(name))] += 1
    return {
        "long_files": sorted(long_files, key=lambda x: -x[1]),
        "long_functions": sorted(long_functions, key=lambda x: -x[1]),
        "lazy_imports": dict(sorted(lazy.items())),
        "edges": sorted(f"{a} -> {b}" for a, b in edges),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).parent.parent / "pivotseg")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = scan(args.root.resolve())
    print(f"files over {LONG_FILE} lines: {len(report['long_files'])}")
    for name, n in report["long_files"]:
        print(f"  {n:5d}  {name}")
    print(f"functions over {LONG_FUNCTION} lines: {len(report['long_functions'])}")
    for name, n in report["long_functions"]:
        print(f"  {n:5d}  {name}")
    total = sum(report["lazy_imports"].values())
    print(f"imports inside functions: {total}")
    for name, n in report["lazy_imports"].items():
        print(f"  {n:5d}  {name}")
    print(f"import edges between subpackages: {len(report['edges'])}")
    for edge in report["edges"]:
        print(f"  {edge}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
