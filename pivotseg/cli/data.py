"""``pivotseg data check|stats``: inspect a dataset folder before training on it."""

from __future__ import annotations

import argparse
from collections import Counter

from pivotseg.data.check import DatasetReport, scan_dataset
from pivotseg.data.formats import FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check a dataset folder or print its statistics")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    check = sub.add_parser(
        "check",
        help="read every file and report all problems (exit 1 when there is one)",
        description="Read every image and label; report unreadable files, unpaired files, "
        "image/label size mismatches and label values outside the classes, all at once.",
    )
    _common(check)
    check.set_defaults(func=run_check)

    stats = sub.add_parser("stats", help="print the class pixel frequencies")
    _common(stats)
    stats.set_defaults(func=run_stats)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the dataset folder")
    parser.add_argument(
        "--format", required=True, metavar="F", help="one of: " + ", ".join(FORMATS)
    )
    parser.add_argument("--split", default=None, help="one split (default: all splits)")
    parser.add_argument("--mapping", default=None, help="folder format: classes/mapping file")
    parser.add_argument("--condition", default=None, help="acdc: fog, night, rain or snow")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _scan(args: argparse.Namespace, check_images: bool) -> DatasetReport:
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
