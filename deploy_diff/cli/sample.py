"""``deploy-diff sample``: images from a bundle with the torch-free runtime, as a PNG grid or an .npz.

A pixel-space bundle samples with :class:`~deploy_diff.runtime.Pipeline` (``--class``, ``--guidance`` for models
with a null label); a text-to-image bundle with :class:`~deploy_diff.runtime.TextToImagePipeline` (``--prompt``,
``--negative-prompt``, ``--height`` / ``--width``, ``--guidance`` 7.5 and 50 steps by default, ``-n`` images per
prompt). A flag of one kind on a bundle of the other is an error that says so.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..runtime.precisions import SUPPORTED_PRECISIONS
from ._common import EXPORT_HINT_WORDS, add_command, class_list

NAME = "sample"

EXAMPLES = (
    "examples:\n"
    "  deploy-diff sample bundles/digits --scheduler dpmsolver++ --steps 20 -n 16 --seed 0 --out grid.png\n"
    "  deploy-diff sample bundles/digits-cond --class 7 --guidance 3 -n 8 --out sevens.png\n"
    "  deploy-diff sample bundles/cifar --device cuda --npz --out samples.npz\n"
    '  deploy-diff sample bundles/sd15 --prompt "a lighthouse at dusk, watercolor" --negative-prompt "blurry" \\\n'
    "      --steps 25 --guidance 7.5 --seed 0 -n 4 --out lighthouse.png"
)

# the library's export_bundle() arguments in runtime messages -> the export command's flags; the text-to-image
# arguments -> their flags
FLAG_WORDS = (
    *EXPORT_HINT_WORDS,
    (r"\bnum_images_per_prompt\b", "-n"),
    (r"\bnegative_prompt\b", "--negative-prompt"),
    (r"^(height|width) must be", r"--\1 must be"),
    (r"\bguidance_scale must be", "--guidance must be"),
    (r"\bnum_inference_steps=", "--steps "),
    (r"\bnum_inference_steps\b", "--steps"),
)
PIXEL_DEFAULT_IMAGES = 16  # -n for a pixel-space bundle (a grid); a text-to-image bundle makes 1 per prompt
TEXT_FLAGS = ("prompt", "negative_prompt", "height", "width")  # text-to-image bundles only
PIXEL_FLAGS = ("class_labels",)  # pixel-space bundles only


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="sample images from a bundle with the torch-free runtime",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="PNG grid to write (or .npz with --npz)")
    p.add_argument("--prompt", help="text-to-image bundles: what to draw")
    p.add_argument("--negative-prompt", help="text-to-image bundles: what to steer away from (with --guidance > 1)")
    p.add_argument("--height", type=int, help="text-to-image bundles: image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="text-to-image bundles: image width in pixels (default: the model's)")
    p.add_argument(
        "--scheduler",
        help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc, pndm, lcm (default: the bundle's)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the bundle's default_inference_steps, else 50)")
    p.add_argument(
        "-n",
        "--num-images",
        type=int,
        help=f"images (default {PIXEL_DEFAULT_IMAGES}); for a text-to-image bundle, images per prompt (default 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="torch-compatible seed: the images diffusers gives for generator=torch.manual_seed(seed)",
    )
    p.add_argument(
        "--seed-per-image",
        action="store_true",
        help="one generator per image (seed, seed+1, ...): an image does not depend on -n",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale: text-to-image bundles (default 7.5; <= 1: no guidance), pixel-space "
        "models with a null label (default none)",
    )
    p.add_argument("--class", dest="class_labels", type=class_list, help="class index, or one per image: 1,7,7")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise weight (0 = deterministic)")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        help="onnxruntime (default), openvino (CPU), tensorrt (the bundle's engine), or auto: openvino when "
        "installed and the device is the CPU, else onnxruntime",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument(
        "--precision",
        default="fp32",
        help="what is computed (default fp32): "
        + "; ".join(f"{b} {', '.join(ps)}" for b, ps in SUPPORTED_PRECISIONS.items())
        + " (bf16 on CPUs with bf16 arithmetic)",
    )
    p.add_argument("--threads", type=int, help="CPU threads of ONNX Runtime / OpenVINO (default: one per core)")
    p.add_argument("--cache-dir", help="OpenVINO's compiled-model cache folder (default: no cache)")
    p.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (static-batch bundles, CUDA)")
    p.add_argument("--npz", action="store_true", help="write float32 images [N, H, W, C] in [0, 1] to an .npz")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--scale", type=int, help="grid upscaling factor (default: about 128 px per image)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sample with the torch-free runtime; write a PNG grid (or an .npz with --npz)."""
    import time
    from pathlib import Path

    import numpy as np

    from ..runtime._fileio import atomic_open
    from ..runtime.bundle import TEXT_TO_IMAGE_PIPELINE, load_bundle
    from ..runtime.images import image_grid, save_png, to_uint8
    from ..runtime.pipeline import Pipeline
    from ..runtime.text_to_image import DEFAULT_GUIDANCE_SCALE, TextToImagePipeline

    for flag in ("nrow", "scale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as {Path(args.out) / 'grid.png'}")

    bundle = load_bundle(args.bundle)
    text = bundle.pipeline == TEXT_TO_IMAGE_PIPELINE
    _check_flags(args, text, bundle.path)
    options = dict(
        backend=args.backend,
        device=args.device,
        scheduler=args.scheduler,
        precision=args.precision,
        num_threads=args.threads,
        cuda_graph=args.cuda_graph,
        cache_dir=args.cache_dir,
    )
    pipe = TextToImagePipeline.from_bundle(bundle, **options) if text else Pipeline.from_bundle(bundle, **options)
    num_images = args.num_images if args.num_images is not None else 1 if text else PIXEL_DEFAULT_IMAGES
    labels = None
    if args.class_labels is not None:
        labels = args.class_labels[0] if len(args.class_labels) == 1 else args.class_labels
    seed = args.seed
    if seed is not None and args.seed_per_image:
        seed = [args.seed + i for i in range(num_images)]
    steps = pipe.inference_steps(args.steps)  # the bundle's own default when --steps is not given
    guidance = (DEFAULT_GUIDANCE_SCALE if args.guidance is None else args.guidance) if text else args.guidance
    t0 = time.perf_counter()
    if text:
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
            height=args.height,
            width=args.width,
            eta=args.eta,
            output_type="np",
            progress=not args.no_progress,
        )
    else:
        images = pipe(
            num_images=num_images,
            num_inference_steps=steps,
            seed=seed,
            guidance_scale=guidance,
            class_labels=labels,
            eta=args.eta,
            output_type="np",
            progress=not args.no_progress,
        )
    elapsed = time.perf_counter() - t0
    out = args.out
    if args.npz:
        if not out.endswith(".npz"):
            out += ".npz"
        arrays = {"images": images, "steps": np.int64(steps)}
        if labels is not None:
            arrays["class_labels"] = np.broadcast_to(np.asarray(labels, np.int64), (num_images,))
        if text:
            arrays.update(prompt=np.str_(args.prompt), guidance_scale=np.float64(guidance))
            if args.negative_prompt is not None:
                arrays["negative_prompt"] = np.str_(args.negative_prompt)
        if args.seed is not None:
            arrays["seed"] = np.int64(args.seed)
        with atomic_open(out) as f:
            np.savez(f, **arrays)
    else:
        scale = args.scale or max(1, 128 // max(images.shape[1], 1))
        save_png(image_grid(to_uint8(images), nrow=args.nrow, scale=scale), out)
    sched = type(pipe.make_scheduler()).__name__
    backend = type(pipe.runner).__name__.removesuffix("Runner")
    print(
        f"{len(images)} image(s), {sched}, {steps} steps, {backend} {pipe.precision}, {elapsed:.2f} s "
        f"({elapsed / len(images) * 1000:.1f} ms/image) -> {out}"
    )
    return 0


def _check_flags(args: argparse.Namespace, text: bool, bundle: Any) -> None:
    """Flags of one bundle kind on a bundle of the other are refused, naming both."""
    if text:
        given = [f for f in PIXEL_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(
                f"{_flags(given)} is for pixel-space bundles; {bundle} is a text-to-image bundle: describe the image "
                "with --prompt"
            )
        if args.prompt is None:
            raise ValueError(f"{bundle} is a text-to-image bundle: give --prompt TEXT")
    else:
        given = [f for f in TEXT_FLAGS if getattr(args, f) is not None]
        if given:
            raise ValueError(
                f"{_flags(given)} is for text-to-image bundles; {bundle} is a pixel-space UNet bundle (it takes "
                "--class and --guidance when class-conditional)"
            )


def _flags(dests: list[str]) -> str:
    names = {"class_labels": "--class"}
    return ", ".join(names.get(d, "--" + d.replace("_", "-")) for d in dests)
