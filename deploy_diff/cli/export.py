"""``deploy-diff export``: a training run, a diffusers UNet2DModel or a StableDiffusionPipeline folder -> a validated
ONNX bundle (torch + onnx). ``--from-diffusers`` dispatches on the folder's ``model_index.json`` ``_class_name``:
``StableDiffusionPipeline`` exports a text-to-image bundle, a UNet2DModel pipeline (or bare model folder) a pixel
bundle, any other pipeline class is refused by name."""

from __future__ import annotations

import argparse

from ._common import add_command

NAME = "export"

EXAMPLES = (
    "examples:\n  deploy-diff export runs/digits --out bundles/digits --fp16\n"
    "  deploy-diff export --from-diffusers ./ddpm-cifar10-32 --out bundles/cifar --static-batch 8\n"
    "  deploy-diff export --from-diffusers ./stable-diffusion-v1-5 --out bundles/sd15 --fp16"
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
        help="export a run, a diffusers UNet2DModel or a StableDiffusionPipeline to a validated ONNX bundle",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", help="training run folder (deploy-diff train --out)")
    p.add_argument(
        "--from-diffusers",
        metavar="DIR",
        help="diffusers pipeline folder (a UNet2DModel pipeline, or a StableDiffusionPipeline: a text-to-image "
        "bundle) or UNet2DModel folder",
    )
    p.add_argument(
        "--scheduler-config",
        metavar="FILE",
        help="scheduler_config.json for a bare UNet2DModel folder (default: diffusers' DDPM defaults)",
    )
    p.add_argument("--out", required=True, help="bundle folder to write (an existing bundle is replaced)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write fp16 graphs (validated to 2e-2; a text-to-image bundle leaves out a text encoder or VAE "
        "decoder fp16 graph that fails, and says why)",
    )
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
    from ..export.sources import ExportError, diffusers_pipeline_kind, load_diffusers_source, load_run_source

    if (args.run_dir is None) == (args.from_diffusers is None):
        raise ExportError("give exactly one source: a RUN_DIR (positional) or --from-diffusers DIR")
    if args.scheduler_config and not args.from_diffusers:
        raise ExportError("--scheduler-config applies to --from-diffusers only (a run folder has its own)")
    if args.no_ema and not args.run_dir:
        raise ExportError("--no-ema applies to a training run folder only")
    if args.from_diffusers is not None and diffusers_pipeline_kind(args.from_diffusers) == "text-to-image":
        return _run_text_to_image(args)
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


def _run_text_to_image(args: argparse.Namespace) -> int:
    from ..export.sources import ExportError
    from ..export.text_to_image import export_text_to_image

    given = [
        flag
        for flag, value in (
            ("--scheduler-config", args.scheduler_config),
            ("--static-batch", args.static_batch),
            ("--tensorrt", args.tensorrt),
        )
        if value
    ]
    if given:
        raise ExportError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a StableDiffusionPipeline folder "
            "(a text-to-image bundle takes the folder's scheduler, a dynamic batch and no TensorRT engine)"
        )
    manifest = export_text_to_image(
        args.from_diffusers, args.out, opset=args.opset, fp16=args.fp16, optimize=not args.no_optimize
    )
    for component, reports in manifest["export"]["validation"].items():
        for precision, report in reports.items():
            print(
                f"{component} {precision}: max error vs torch {report['max_error']:.2e} "
                f"(tolerance {report['tolerance']:g}) over {len(report['cases'])} cases"
            )
    for component, why in manifest["export"].get("fp16_skipped", {}).items():
        print(f"{component} fp16: left out ({why})")
    print(f"bundle: {args.out}")
    return 0
