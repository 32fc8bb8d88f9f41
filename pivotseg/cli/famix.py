"""``pivotseg famix``: FAMix language-driven style mining (and a look inside a style bank).

pivotseg famix mine CONFIG.yaml [--out FILE] [--limit N] [--device cuda]
pivotseg famix info STYLES.safetensors
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("famix", help="FAMix style mining for CLIP-backed training")
    sub = parser.add_subparsers(dest="famix_command", metavar="ACTION")
    sub.required = True
    mine = sub.add_parser(
        "mine",
        help="mine per-class styles over a dataset (resumable)",
        description=(
            "Prompt-driven instance normalisation of 3x3 feature patches towards '<style> "
            "<class>' text embeddings; writes a .safetensors style bank. Rerunning with the same "
            "settings continues where it stopped."
        ),
    )
    mine.add_argument("config", help="YAML: backbone, source, dataset, layer, styles, steps, out")
    mine.add_argument("--out", help="override the config's out")
    mine.add_argument("--limit", type=int, help="mine on the first N images only")
    mine.add_argument("--device", help="cpu / cuda")
    mine.set_defaults(func=run_mine)
    info = sub.add_parser("info", help="print what a style bank holds")
    info.add_argument("bank", help="a .safetensors style bank")
    info.set_defaults(func=run_info)


def run_mine(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_file
    from pivotseg.tuning.famix import StyleBank
    from pivotseg.tuning.famix.mining import MiningConfig, mine_dataset

    cfg = MiningConfig.from_yaml(args.config)
    for key in ("out", "limit", "device"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    check_output_file(cfg.out, "out")
    path = mine_dataset(cfg)
    bank = StyleBank.load(path)
    print(f"wrote {path}: {sum(bank.counts())} styles at {bank.info['layer']}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pivotseg.tuning.famix import StyleBank

    bank = StyleBank.load(args.bank)
    backbone = bank.info.get("backbone", {})
    print(
        f"{args.bank}: {backbone.get('name')} ({backbone.get('source')}), layer "
        f"{bank.info.get('layer')}, {bank.channels} channels, batches "
        f"{bank.info.get('done_batches')}/{bank.info.get('total_batches')}"
    )
    names = [*bank.class_names, "ignore"]
    for name, count in zip(names, bank.counts()):
        print(f"  {name:<24} {count}")
    return 0
