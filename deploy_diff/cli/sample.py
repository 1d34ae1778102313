"""``deploy-diff sample``: images from a bundle with the torch-free runtime, as a PNG grid or an .npz."""

from __future__ import annotations

import argparse

from ..runtime.precisions import SUPPORTED_PRECISIONS
from ._common import EXPORT_HINT_WORDS, add_command, class_list

NAME = "sample"

EXAMPLES = (
    "examples:\n"
    "  deploy-diff sample bundles/digits --scheduler dpmsolver++ --steps 20 -n 16 --seed 0 --out grid.png\n"
    "  deploy-diff sample bundles/digits-cond --class 7 --guidance 3 -n 8 --out sevens.png\n"
    "  deploy-diff sample bundles/cifar --device cuda --npz --out samples.npz"
)


# the library's export_bundle() arguments in runtime messages -> the export command's flags
FLAG_WORDS = EXPORT_HINT_WORDS


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
    p.add_argument(
        "--scheduler",
        help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc, lcm (default: the bundle's own)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the bundle's default_inference_steps, else 50)")
    p.add_argument("-n", "--num-images", type=int, default=16)
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
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (models with a null label)")
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
    from ..runtime.images import image_grid, save_png, to_uint8
    from ..runtime.pipeline import Pipeline

    for flag in ("nrow", "scale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as {Path(args.out) / 'grid.png'}")

    pipe = Pipeline.from_bundle(
        args.bundle,
        backend=args.backend,
        device=args.device,
        scheduler=args.scheduler,
        precision=args.precision,
        num_threads=args.threads,
        cuda_graph=args.cuda_graph,
        cache_dir=args.cache_dir,
    )
    labels = None
    if args.class_labels is not None:
        labels = args.class_labels[0] if len(args.class_labels) == 1 else args.class_labels
    seed = args.seed
    if seed is not None and args.seed_per_image:
        seed = [args.seed + i for i in range(args.num_images)]
    steps = pipe.inference_steps(args.steps)  # the bundle's own default when --steps is not given
    t0 = time.perf_counter()
    images = pipe(
        num_images=args.num_images,
        num_inference_steps=steps,
        seed=seed,
        guidance_scale=args.guidance,
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
            arrays["class_labels"] = np.broadcast_to(np.asarray(labels, np.int64), (args.num_images,))
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
        f"{args.num_images} image(s), {sched}, {steps} steps, {backend} {pipe.precision}, {elapsed:.2f} s "
        f"({elapsed / args.num_images * 1000:.1f} ms/image) -> {out}"
    )
    return 0
