"""``pivotseg data check|stats|corrupt``: inspect a dataset folder, or write adverse copies."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pivotseg.data.check import DatasetReport

# The names of pivotseg.data.formats.FORMATS and pivotseg.data.corrupt.KNOWN, written out so
# that building the parser imports neither NumPy nor PIL (tests/test_cli_startup.py keeps them
# equal). Unknown names are refused by the data package itself, with the closest suggested.
FORMAT_NAMES = (
    "cityscapes",
    "gta5",
    "synthia",
    "bdd100k",
    "acdc",
    "mapillary_v1.2",
    "mapillary_v2.0",
    "camvid",
    "carlascapes",
    "idd_lite",
    "loveda",
    "potsdam",
    "vaihingen",
    "folder",
)
CORRUPTIONS = ("fog", "night", "rain", "snow", "motion_blur", "glare")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="check a dataset folder, print its statistics or corrupt a copy"
    )
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    check = sub.add_parser(
        "check",
        help="read every file and report all problems (exit 1 when there is one)",
        description="Read every image and label; report unreadable files and folders, broken "
        "links, unpaired files, image/label size mismatches, label values outside the classes "
        "and 16-bit images too dark to read at 8 bits, all at once.",
    )
    _common(check)
    check.set_defaults(func=run_check)

    stats = sub.add_parser("stats", help="print the class pixel frequencies")
    _common(stats)
    stats.set_defaults(func=run_stats)

    _register_corrupt(sub)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the dataset folder")
    parser.add_argument(
        "--format", required=True, metavar="F", help="one of: " + ", ".join(FORMAT_NAMES)
    )
    parser.add_argument("--split", default=None, help="one split (default: all splits)")
    parser.add_argument("--mapping", default=None, help="folder format: classes/mapping file")
    parser.add_argument("--condition", default=None, help="acdc: fog, night, rain or snow")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _scan(args: argparse.Namespace, check_images: bool) -> DatasetReport:
    from pivotseg.data.check import scan_dataset

    options = {}
    if args.mapping:
        options["mapping"] = args.mapping
    if args.condition:
        options["condition"] = args.condition
    return scan_dataset(
        args.path,
        args.format,
        split=args.split,
        progress=not args.quiet,
        check_images=check_images,
        **options,
    )


def _histogram(report: DatasetReport) -> list[str]:
    width = max((len(name) for name in report.classes), default=5)
    lines = []
    for i, name, pixels, share in report.frequencies():
        lines.append(f"  {i:>3}  {name:<{width}}  {pixels:>14,}  {100 * share:6.2f}%")
    total = int(report.pixel_counts.sum()) + report.ignored_pixels
    ignored = 100 * report.ignored_pixels / total if total else 0.0
    lines.append(
        f"  255  {'(ignore)':<{width}}  {report.ignored_pixels:>14,}  {ignored:6.2f}% of all"
    )
    return lines


def _header(report: DatasetReport) -> str:
    split = report.split or "all splits"
    return (
        f"{report.root} ({report.format}, {split}): {report.num_images} images, "
        f"{report.num_labels} labels, {report.num_pairs} pairs"
    )


def run_check(args: argparse.Namespace) -> int:
    report = _scan(args, check_images=True)
    print(_header(report))
    print("label pixels per class (share of labelled pixels):")
    print("\n".join(_histogram(report)))
    if report.sixteen_bit_images:
        print(
            "note: 16-bit images, read as 8-bit (the high byte of each value): "
            f"{report.sixteen_bit_images}"
        )
    if report.ok:
        print("no problems found")
        return 0
    print(f"{len(report.problems)} problems:")
    for problem in report.problems:
        print(f"  {problem}")
    counts = Counter(p.kind for p in report.problems)
    print("summary: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return 1


def run_stats(args: argparse.Namespace) -> int:
    report = _scan(args, check_images=False)
    print(_header(report))
    print("class pixel frequencies (share of labelled pixels):")
    print("\n".join(_histogram(report)))
    if not report.ok:
        print(
            f"{len(report.problems)} files could not be counted; run `pivotseg data check` "
            "for the list"
        )
        return 1
    return 0


def _register_corrupt(sub) -> None:
    corrupt = sub.add_parser(
        "corrupt",
        help="write fog/night/rain/snow/blur/glare copies of a dataset (adverse targets)",
        description="Write copies of a dataset folder with weather and lighting corruptions "
        "at fixed severities (albumentations), labels copied; the copy reads with the same "
        "--format. One sub-folder per corruption (OUT/fog3/...), or one mixed copy with --mix. "
        "Parameters: docs/datasets.md, 'Adverse conditions'.",
    )
    corrupt.add_argument("path", help="the source dataset folder (never written to)")
    corrupt.add_argument(
        "--format", required=True, metavar="F", help="one of: " + ", ".join(FORMAT_NAMES)
    )
    corrupt.add_argument("--out", required=True, help="the output folder (new, empty or resumed)")
    corrupt.add_argument(
        "--corruption",
        action="append",
        required=True,
        metavar="NAME:SEVERITY",
        help=f"repeatable; NAME one of {', '.join(CORRUPTIONS)}, SEVERITY 1-5 (e.g. fog:3)",
    )
    corrupt.add_argument(
        "--mix", action="store_true", help="one copy, each frame gets one of the corruptions"
    )
    corrupt.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    corrupt.add_argument("--split", default=None, help="one split (default: all splits)")
    corrupt.add_argument("--mapping", default=None, help="folder format: classes/mapping file")
    corrupt.add_argument("--condition", default=None, help="acdc: fog, night, rain or snow")
    corrupt.add_argument("--quiet", action="store_true", help="no progress bar")
    corrupt.set_defaults(func=run_corrupt)


def run_corrupt(args: argparse.Namespace) -> int:
    from pivotseg.data.corrupt import MANIFEST, corrupt_dataset

    options = {k: v for k, v in (("mapping", args.mapping), ("condition", args.condition)) if v}
    manifest = corrupt_dataset(
        args.path,
        args.format,
        args.out,
        args.corruption,
        seed=args.seed,
        split=args.split,
        mix=args.mix,
        progress=not args.quiet,
        **options,
    )
    split = f" --split {args.split}" if args.split else ""
    if args.mix:
        counts = ", ".join(f"{label} {n}" for label, n in manifest["counts"].items())
        print(f"{args.out}: {manifest['frames']} frames, one corruption each ({counts})")
    else:
        roots = ", ".join(f"{args.out}/{root}" for root in manifest["roots"].values())
        print(f"{manifest['frames']} frames per corruption in {roots}")
    print(f"read with --format {args.format}{split}; settings in {args.out}/{MANIFEST}")
    return 0
