"""``deploy-diff generate``: a dataset of images from a bundle, in resumable ``.npz`` shards, on Ray workers."""

from __future__ import annotations

import argparse

from ._common import add_command, class_list

NAME = "generate"

EXAMPLES = (
    "examples:\n"
    "  deploy-diff generate bundles/digits --num-images 20000 --out data/digits --workers 2\n"
    "  deploy-diff generate bundles/digits-cond --num-images 10000 --classes balanced --guidance 3 --out data/cond\n"
    "  deploy-diff generate bundles/digits --num-images 1000000 --out /shared/digits --address auto\n"
    "rerunning the same command resumes: only the shards missing from OUT are computed"
)

# the library's argument names in messages -> this command's flags
FLAG_WORDS = (
    (r"\bnum_images=", "--num-images "),
    (r"\bseed_base=", "--seed-base "),
    (r"\bshard_size=", "--shard-size "),
    (r"\bworkers=", "--workers "),
    (r"\bnum_threads=", "--threads "),
    (r"\bnum_inference_steps=", "--steps "),
    (r"\bguidance_scale=None", "no --guidance"),
    (r"\bguidance_scale=", "--guidance "),
    (r"\bclasses=", "--classes "),
    (r"\bscheduler=", "--scheduler "),
    (r"\bout=", "--out "),
    (r"\bnum_inference_steps\b", "--steps"),
    (r"\bguidance_scale\b", "--guidance"),
    (r"\bclass_labels\b", "--classes"),
    (r"\bnum_images\b", "--num-images"),
    (r"(?<!-)\bclasses must\b", "--classes must"),
    (r"\bworkers must\b", "--workers must"),
    (r"\bshard_size must\b", "--shard-size must"),
    (r"\bseed_base must\b", "--seed-base must"),
    (r"\bnum_threads must\b", "--threads must"),
)


def classes_arg(text: str) -> str | list[int]:
    """argparse type for ``--classes``: ``balanced`` or a comma list of labels like ``0,3,7``."""
    if text.strip().lower() == "balanced":
        return "balanced"
    try:
        return class_list(text)
    except argparse.ArgumentTypeError:
        expected = "expected balanced or a comma list of labels like 0,3,7"
        raise argparse.ArgumentTypeError(f"{expected}; got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="generate a dataset of images (resumable .npz shards) on Ray workers, locally or on a cluster",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="a pixel-space bundle folder")
    p.add_argument("--num-images", type=int, required=True, help="images to generate")
    p.add_argument("--out", required=True, help="output folder: manifest.json and shard-00000.npz, ...")
    p.add_argument("--seed-base", type=int, default=0, help="image i uses seed SEED_BASE + i (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default 1000)")
    p.add_argument(
        "--workers", type=int, help="Ray workers, each loading the bundle once (default: as many as the CPUs allow)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default 1; part of the settings)")
    p.add_argument(
        "--scheduler",
        help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc, pndm, lcm (default: the bundle's "
        "own)",
    )
    p.add_argument("--steps", type=int, help="inference steps (default: the bundle's default_inference_steps, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (models with a null label)")
    p.add_argument(
        "--classes",
        type=classes_arg,
        help="conditional bundles: balanced (image i gets label i %% num_classes; the default) or labels like 0,3,7 "
        "(image i gets the (i %% 3)-th)",
    )
    p.add_argument("--address", help="a Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: local Ray")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the images (or the shards still missing from --out); print a summary line."""
    import sys

    from ..serving.generate import generate

    manifest = generate(
        args.bundle,
        args.out,
        args.num_images,
        seed_base=args.seed_base,
        shard_size=args.shard_size,
        workers=args.workers,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        classes=args.classes,
        num_threads=args.threads,
        address=args.address,
        progress=not args.no_progress,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    run_info = manifest["runs"][-1]
    computed, kept = len(run_info["shards_computed"]), len(run_info["shards_kept"])
    images, seconds = run_info["images_computed"], run_info["seconds"] or 0.0
    head = f"{manifest['settings']['num_images']} image(s) in {manifest['num_shards']} shard(s)"
    if not computed:
        print(f"{head}: already complete, nothing computed -> {args.out}")
        return 0
    rate = f", {images / seconds:.1f} images/s" if seconds else ""
    done = f"{computed} computed on {run_info['workers']} worker(s) in {seconds:.1f} s{rate}, {kept} kept"
    print(f"{head}: {done} -> {args.out}")
    return 0
