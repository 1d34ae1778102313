"""``deploy-diff export``: a training run or a diffusers UNet2DModel -> a validated ONNX bundle (torch + onnx)."""

from __future__ import annotations

import argparse

from ._common import add_command

NAME = "export"

EXAMPLES = (
    "examples:\n  deploy-diff export runs/digits --out bundles/digits --fp16\n"
    "  deploy-diff export --from-diffusers ./ddpm-cifar10-32 --out bundles/cifar --static-batch 8"
)

# the library's argument names in its messages -> this command's flags (see _common.error_line)
FLAG_WORDS = (
    (r"\bstatic_batch must be (.*?) or None\b", r"--static-batch must be \1"),
    (r"(?<![-\w])opset must be\b", "--opset must be"),
    (r"^out=(['\"])(.*?)\1 ", r"--out \2 "),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="export a run or a diffusers UNet2DModel to a validated ONNX bundle",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", help="training run folder (deploy-diff train --out)")
    p.add_argument("--from-diffusers", metavar="DIR", help="diffusers pipeline folder or UNet2DModel folder")
    p.add_argument(
        "--scheduler-config",
        metavar="FILE",
        help="scheduler_config.json for a bare UNet2DModel folder (default: diffusers' DDPM defaults)",
    )
    p.add_argument("--out", required=True, help="bundle folder to write (an existing bundle is replaced)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.add_argument("--fp16", action="store_true", help="also write unet.fp16.onnx (validated to 2e-2)")
    p.add_argument("--static-batch", type=int, metavar="B", help="fixed batch size (for CUDA graphs)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (needs TensorRT + GPU)")
    p.add_argument("--tensorrt-max-batch", type=int, default=16, help="largest batch of the engine's profile")
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="keep the graph as exported (no attention fusion into ONNX Runtime's MultiHeadAttention)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.bundle import export_bundle
    from ..export.sources import ExportError, load_diffusers_source, load_run_source

    if (args.run_dir is None) == (args.from_diffusers is None):
        raise ExportError("give exactly one source: a RUN_DIR (positional) or --from-diffusers DIR")
    if args.scheduler_config and not args.from_diffusers:
        raise ExportError("--scheduler-config applies to --from-diffusers only (a run folder has its own)")
    if args.no_ema and not args.run_dir:
        raise ExportError("--no-ema applies to a training run folder only")
    if args.run_dir is not None:
        src = load_run_source(args.run_dir, use_ema=not args.no_ema)
    else:
        src = load_diffusers_source(args.from_diffusers, args.scheduler_config)
    manifest = export_bundle(
        src,
        args.out,
        opset=args.opset,
        fp16=args.fp16,
        static_batch=args.static_batch,
        tensorrt=args.tensorrt,
        tensorrt_max_batch=args.tensorrt_max_batch,
        optimize=not args.no_optimize,
    )
    for precision, report in manifest["export"]["validation"].items():
        print(
            f"{precision}: max error vs torch {report['max_error']:.2e} (tolerance {report['tolerance']:g}) "
            f"over {len(report['cases'])} batches"
        )
    print(f"bundle: {args.out}")
    return 0
