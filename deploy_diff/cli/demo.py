"""``deploy-diff demo``: train -> export -> sample on the built-in digits, what ``make demo`` runs; writes a grid
and prints a timing table. A run already in ``--out`` that reached ``--steps`` is reused."""

from __future__ import annotations

import argparse

from ._common import add_command, passes

NAME = "demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, NAME, help="train -> export -> sample on the built-in digits (what `make demo` runs)")
    p.add_argument("--out", default="demo", help="folder for run/, bundle/ and grid.png (default: demo)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000: about 4 min on 2 cores)")
    p.add_argument("--scheduler", default="dpmsolver++")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train from scratch even if --out holds a run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """train -> export -> sample on the built-in digits; write a grid and print a timing table."""
    import time
    from pathlib import Path

    import numpy as np

    from ..runtime.arguments import check_guidance_scale, check_num_inference_steps
    from ..runtime.schedulers import SCHEDULER_NAMES
    from ..train.config import TrainConfig
    from ..train.unet import UNetConfig

    # the sampling options are checked before minutes of training, not after
    model_config = UNetConfig(num_classes=10)  # class-conditional, so the grid shows one digit per row
    if args.scheduler.lower() not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; expected one of {list(SCHEDULER_NAMES)}")
    if not passes(check_num_inference_steps, args.sample_steps) or not passes(TrainConfig, steps=args.steps):
        raise ValueError(f"--steps and --sample-steps must be >= 1; got {args.steps}, {args.sample_steps}")
    if not passes(check_guidance_scale, args.guidance, model_config.null_class_label, conditional=True):
        raise ValueError(f"--guidance must be a finite number >= 0; got {args.guidance}")
    out = Path(args.out)
    run_dir, bundle_dir = out / "run", out / "bundle"
    timings: list[tuple[str, float, str]] = []

    # 1. train (torch): a class-conditional digits model, so the grid shows one digit per row
    from ..train.checkpoint import CheckpointError, find_checkpoint

    try:
        done = find_checkpoint(run_dir).step >= args.steps and not args.retrain
    except CheckpointError:
        done = False
    if done:
        print(f"[1/3] train: reusing {run_dir} (trained to {args.steps}+ steps; --retrain to start over)")
    else:
        from ..train.trainer import train

        if run_dir.exists() and args.retrain:
            import shutil

            shutil.rmtree(run_dir)
        print(f"[1/3] train: {args.steps} steps on the built-in digits -> {run_dir}")
        t0 = time.perf_counter()
        result = train(
            model_config,
            TrainConfig(steps=args.steps, sample_every=0, seed=args.seed),
            run_dir,
            resume=run_dir.exists(),
            progress=not args.no_progress,
        )
        if result["interrupted"]:
            return 130
        timings.append(("train (torch)", time.perf_counter() - t0, f"{args.steps} steps"))

    # 2. export (torch + onnx): validated fp32 and fp16 graphs
    from ..export.bundle import export_bundle
    from ..export.sources import load_run_source

    print(f"[2/3] export: {run_dir} -> {bundle_dir}")
    t0 = time.perf_counter()
    manifest = export_bundle(load_run_source(run_dir), bundle_dir, fp16=True)
    errs = ", ".join(f"{p} {r['max_error']:.1e}" for p, r in manifest["export"]["validation"].items())
    timings.append(("export + validate", time.perf_counter() - t0, f"max error vs torch: {errs}"))

    # 3. sample with the torch-free runtime
    from ..runtime.images import image_grid, save_png, to_uint8
    from ..runtime.pipeline import Pipeline

    print(f"[3/3] sample: the runtime (numpy + onnxruntime), {args.scheduler}, {args.sample_steps} steps")
    pipe = Pipeline.from_bundle(bundle_dir, scheduler=args.scheduler)
    labels = np.repeat(np.arange(10), 10)
    t0 = time.perf_counter()
    images = pipe(
        num_images=100,
        num_inference_steps=args.sample_steps,
        seed=list(range(100)),
        class_labels=labels,
        guidance_scale=args.guidance,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - t0
    timings.append(
        (f"sample 100 ({args.scheduler}, {args.sample_steps} steps)", elapsed, f"{elapsed * 10:.1f} ms/image")
    )
    grid = save_png(image_grid(to_uint8(images), nrow=10, scale=4), out / "grid.png")
    for name, steps in (("ddim", 50), ("dpmsolver++", 20), ("unipc", 10)):
        p = Pipeline.from_bundle(bundle_dir, scheduler=name)
        p(num_images=8, num_inference_steps=2, seed=0, class_labels=0)  # warm-up
        t0 = time.perf_counter()
        p(num_images=8, num_inference_steps=steps, seed=0, class_labels=list(range(8)))
        dt = time.perf_counter() - t0
        timings.append((f"  8 images, {name} {steps} steps", dt, f"{dt / steps * 1000:.2f} ms/step"))

    print("\nstage                                   seconds  notes")
    for name, seconds, note in timings:
        print(f"{name:<38} {seconds:>8.2f}  {note}")
    print(f"\ngrid (one class per row, 0-9): {grid}")
    print(f"bundle: {bundle_dir}  (deploy-diff inspect {bundle_dir}; deploy-diff sample {bundle_dir} --out x.png)")
    return 0
