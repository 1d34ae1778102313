"""``deploy-diff``: the command line. Each subcommand imports its room lazily, so ``deploy-diff --help``
and the runtime commands never import torch.

Errors print one readable line and exit non-zero (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence


def _cmd_schedules(args: argparse.Namespace) -> int:
    """Print every beta schedule with its end points and terminal SNR."""
    import numpy as np

    from .runtime.schedules import DIFFUSERS_SCHEDULES, SCHEDULES, alphas_cumprod_from_betas, get_betas

    if args.num_train_timesteps < 1:
        raise ValueError(f"-T/--num-train-timesteps must be >= 1; got {args.num_train_timesteps}")
    if not (0 < args.beta_start < 1 and 0 < args.beta_end < 1):
        raise ValueError(f"--beta-start and --beta-end must lie in (0, 1); got {args.beta_start}, {args.beta_end}")
    rows = []
    for name in SCHEDULES:
        try:
            betas = get_betas(name, args.num_train_timesteps, args.beta_start, args.beta_end,
                              rescale_betas_zero_snr=args.rescale_betas_zero_snr)
        except ValueError as e:  # e.g. iddpm_linear with a small T
            rows.append({"name": name, "error": str(e)})
            continue
        abar = alphas_cumprod_from_betas(betas)
        with np.errstate(divide="ignore"):
            snr_T = float(abar[-1] / (1 - abar[-1]))
        rows.append({"name": name, "origin": "diffusers" if name in DIFFUSERS_SCHEDULES else "deploy-diff",
                     "beta_first": float(betas[0]), "beta_last": float(betas[-1]),
                     "alphas_cumprod_first": float(abar[0]), "alphas_cumprod_last": float(abar[-1]),
                     "snr_last": snr_T})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"T = {args.num_train_timesteps}, beta_start = {args.beta_start}, beta_end = {args.beta_end}"
          + (", rescaled to zero terminal SNR" if args.rescale_betas_zero_snr else ""))
    print(f"{'name':<18} {'origin':<12} {'beta[0]':>10} {'beta[T-1]':>10} {'abar[0]':>10} {'abar[T-1]':>10} "
          f"{'SNR[T-1]':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<18} refused: {r['error']}")
            continue
        print(f"{r['name']:<18} {r['origin']:<12} {r['beta_first']:>10.3e} {r['beta_last']:>10.3e} "
              f"{r['alphas_cumprod_first']:>10.6f} {r['alphas_cumprod_last']:>10.3e} {r['snr_last']:>10.3e}")
    return 0


def _cmd_timesteps(args: argparse.Namespace) -> int:
    """Print the timesteps (and sigmas) a scheduler would use."""
    import numpy as np

    from .runtime.schedulers import load_scheduler, scheduler_from_name

    try:
        overrides = json.loads(args.set) if args.set else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--set is not valid JSON ({e}); e.g. '{{\"timestep_spacing\": \"trailing\"}}'") from None
    if not isinstance(overrides, dict):
        raise ValueError("--set takes a JSON object, e.g. '{\"timestep_spacing\": \"trailing\"}'")
    if args.config:
        scheduler = (scheduler_from_name(args.scheduler, args.config, **overrides) if args.scheduler
                     else load_scheduler(args.config, **overrides))
    else:
        scheduler = scheduler_from_name(args.scheduler or "ddim", {}, **overrides)
    scheduler.set_timesteps(args.steps)
    out = {"scheduler": type(scheduler).__name__, "config": dict(scheduler.config),
           "timesteps": np.asarray(scheduler.timesteps).tolist(),
           "init_noise_sigma": float(scheduler.init_noise_sigma)}
    if hasattr(scheduler, "sigmas"):
        out["sigmas"] = np.asarray(scheduler.sigmas).tolist()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['scheduler']}, {args.steps} steps, init_noise_sigma = {out['init_noise_sigma']:.6g}")
        print("timesteps:", " ".join(f"{t:g}" for t in out["timesteps"]))
        if "sigmas" in out:
            print("sigmas:   ", " ".join(f"{s:.4g}" for s in out["sigmas"]))
    return 0


_TRAIN_EXAMPLES = """examples:
  deploy-diff train --data digits --out runs/digits                      # the default: unconditional 8x8 digits
  deploy-diff train --data digits --num-classes 10 --out runs/digits-cond  # conditional, for guidance
  deploy-diff train --data ./faces --sample-size 32 --channels 3 --steps 20000 --out runs/faces
  deploy-diff train --out runs/digits --steps 6000 --resume              # continue up to 6000 steps in total
  torchrun --nproc_per_node 2 -m deploy_diff.cli train --data digits --out runs/ddp
"""

# CLI flags that set a UNetConfig / TrainConfig field of the same name (argparse does the type checks)
_MODEL_FLAGS = ("sample_size", "channels", "base_channels", "channel_mult", "layers_per_block",
                "attention_resolutions", "num_heads", "dropout", "num_classes", "gradient_checkpointing")
_TRAIN_FLAGS = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "ema_decay", "max_grad_norm",
                "mixed_precision", "loss_type", "prediction_type", "num_train_timesteps", "beta_schedule", "beta_start",
                "beta_end", "rescale_betas_zero_snr", "label_dropout", "hflip", "seed", "log_every", "save_every",
                "sample_every", "keep_last", "device")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 1,2,2; got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig, read_json_config
    from .train.trainer import train
    from .train.unet import UNetConfig

    file_cfg = read_json_config(args.config) if args.config else {}
    model_cfg = dict(file_cfg.get("model", {}))
    train_cfg = dict(file_cfg.get("train", {}))
    for key, value in file_cfg.items():  # a flat file: sort its keys into the two sections
        if key in ("model", "train"):
            continue
        if key in UNetConfig.__dataclass_fields__:
            model_cfg[key] = value
        elif key in TrainConfig.__dataclass_fields__:
            train_cfg[key] = value
        else:
            raise ValueError(f"--config {args.config}: unknown key {key!r}")
    model_given = bool(model_cfg)
    for flag in _MODEL_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            model_given = True
            if flag == "channels":
                model_cfg["in_channels"] = model_cfg["out_channels"] = value
            else:
                model_cfg[flag] = value
    for flag in _TRAIN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            train_cfg[flag] = value
    if args.data is not None:
        train_cfg["data"] = args.data
    data = train_cfg.get("data", "digits")
    if data != "digits" and not args.resume and not str(data).endswith((".npy", ".npz")):
        # a folder of images: RGB at 32 px unless told otherwise
        model_cfg.setdefault("in_channels", 3)
        model_cfg.setdefault("out_channels", model_cfg["in_channels"])
        model_cfg.setdefault("sample_size", 32)
    if args.resume:
        from .train.checkpoint import find_checkpoint

        saved = find_checkpoint(args.out).train_config.to_dict()
        train_cfg = {**saved, **train_cfg}  # the run's own settings unless overridden
    tc = TrainConfig.from_dict(train_cfg)
    mc = UNetConfig.from_dict(model_cfg) if (not args.resume or model_given) else None
    result = train(mc, tc, args.out, resume=args.resume, progress=not args.no_progress)
    return 130 if result["interrupted"] else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.bundle import export_bundle
    from .export.sources import ExportError, load_diffusers_source, load_run_source

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
    manifest = export_bundle(src, args.out, opset=args.opset, fp16=args.fp16, static_batch=args.static_batch,
                             tensorrt=args.tensorrt, tensorrt_max_batch=args.tensorrt_max_batch,
                             optimize=not args.no_optimize)
    for precision, report in manifest["export"]["validation"].items():
        print(f"{precision}: max error vs torch {report['max_error']:.2e} (tolerance {report['tolerance']:g}) "
              f"over {len(report['cases'])} batches")
    print(f"bundle: {args.out}")
    return 0


def _format_manifest(bundle) -> str:
    m = bundle.manifest
    model = bundle.model
    ex = m.get("export", {})
    lines = [f"bundle      {bundle.path}  (format {m['format']} v{m['format_version']}, files verified)",
             f"model       {model.in_channels}x{model.sample_size[0]}x{model.sample_size[1]} -> "
             f"{model.out_channels} channels, prediction_type={model.prediction_type}",
             "classes     " + (f"{model.num_classes}, null label "
                              + (str(model.null_class_label) if model.null_class_label is not None
                                 else "none (guidance unavailable)") if model.conditional else "unconditional"),
             f"batch       {'static ' + str(model.static_batch) if model.static_batch else 'dynamic'}",
             "inputs      " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m['model']['inputs'].items()),
             "outputs     " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in m['model']['outputs'].items())]
    src = m["model"].get("source") or {}
    if src:
        lines.append("source      " + ", ".join(f"{k}={v}" for k, v in src.items() if v is not None))
    sched = bundle.scheduler_config()
    lines.append(f"scheduler   {sched.get('_class_name', 'DDPMScheduler')} (T={sched.get('num_train_timesteps')}, "
                 f"beta_schedule={sched.get('beta_schedule')}, spacing={sched.get('timestep_spacing', 'leading')})")
    for precision, report in ex.get("validation", {}).items():
        lines.append(f"validation  {precision}: max error {report['max_error']:.2e} "
                     f"(tolerance {report['tolerance']:g})")
    lines.append(f"export      opset {ex.get('opset')}, torch {ex.get('torch_version')}, "
                 f"onnx {ex.get('onnx_version')}, "
                 f"onnxruntime {ex.get('onnxruntime_version')}, {ex.get('created')}, "
                 f"{ex.get('seconds', {}).get('total_s', float('nan')):.1f} s")
    lines.append("files")
    for name, entry in m["files"].items():
        lines.append(f"  {name:<40} {entry['bytes']:>12,d} B  sha256 {entry['sha256'][:16]}")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle, verify=not args.no_verify)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
    else:
        print(_format_manifest(bundle))
    return 0


def _class_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index or a comma list like 1,7,7; got {text!r}") from None


def _cmd_sample(args: argparse.Namespace) -> int:
    """Sample with the torch-free runtime; write a PNG grid (or an .npz with --npz)."""
    import time
    from pathlib import Path

    import numpy as np

    from .runtime._fileio import atomic_open
    from .runtime.images import image_grid, save_png, to_uint8
    from .runtime.pipeline import Pipeline

    for flag in ("nrow", "scale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as {Path(args.out) / 'grid.png'}")

    pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, device=args.device, scheduler=args.scheduler,
                                precision=args.precision, num_threads=args.threads, cuda_graph=args.cuda_graph)
    labels = None
    if args.class_labels is not None:
        labels = args.class_labels[0] if len(args.class_labels) == 1 else args.class_labels
    seed = args.seed if args.seed is not None else None
    if seed is not None and args.seed_per_image:
        seed = [args.seed + i for i in range(args.num_images)]
    t0 = time.perf_counter()
    images = pipe(num_images=args.num_images, num_inference_steps=args.steps, seed=seed,
                  guidance_scale=args.guidance, class_labels=labels, eta=args.eta, output_type="np",
                  progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    out = args.out
    if args.npz:
        if not out.endswith(".npz"):
            out += ".npz"
        arrays = {"images": images, "steps": np.int64(args.steps)}
        if labels is not None:
            arrays["class_labels"] = np.broadcast_to(np.asarray(labels, np.int64), (args.num_images,))
        if args.seed is not None:
            arrays["seed"] = np.int64(args.seed)
        with atomic_open(out) as f:
            np.savez(f, **arrays)
    else:
        as_uint8 = to_uint8(images)
        scale = args.scale or max(1, 128 // max(images.shape[1], 1))
        save_png(image_grid(as_uint8, nrow=args.nrow, scale=scale), out)
    sched = type(pipe.make_scheduler()).__name__
    print(f"{args.num_images} image(s), {sched}, {args.steps} steps, {elapsed:.2f} s "
          f"({elapsed / args.num_images * 1000:.1f} ms/image) -> {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Time the runtime on a bundle; beside it, the diffusers pipeline on torch when the bundle came from one."""
    from .analysis.bench import cold_start, diffusers_baseline, dumps, time_call, time_pipeline
    from .runtime.pipeline import Pipeline

    if args.repeats < 1 or args.steps < 1 or not args.batch or min(args.batch) < 1:
        raise ValueError(f"--repeats, --steps and every --batch size must be >= 1; got --repeats {args.repeats}, "
                         f"--steps {args.steps}, --batch {args.batch}")
    pipe = Pipeline.from_bundle(args.bundle, scheduler=args.scheduler, num_threads=args.threads,
                                device=args.device, precision=args.precision)
    bundle = pipe.bundle
    baseline = None if args.no_baseline else diffusers_baseline(bundle, args.scheduler, args.threads)
    if isinstance(baseline, str):
        print(baseline)
        baseline = None
    kw = {}
    if bundle.model.conditional:
        kw["class_labels"] = 0
    rows = []
    print(f"{bundle.path}: {args.scheduler}, {args.steps} steps, best of {args.repeats} "
          f"({'threads ' + str(args.threads) if args.threads else 'default threads'})")
    print(f"{'batch':>5} {'ours s':>9} {'model %':>8} {'per step ms':>11} {'diffusers s':>12} {'speedup':>8} "
          f"{'max|diff|':>10}")
    for batch in args.batch:
        ours, images = time_pipeline(pipe, batch, args.steps, repeats=args.repeats, **kw)
        row = {"batch": batch, "ours_s": ours.seconds, "model_s": ours.model_seconds, "runs": ours.runs}
        if baseline is not None:
            best, runs, ref = time_call(lambda b=batch: baseline(b, args.steps, 0), repeats=args.repeats)
            row.update(diffusers_s=best, diffusers_runs=runs, speedup=best / ours.seconds,
                       max_abs_diff=float(abs(ref - images).max()))
        rows.append(row)
        print(f"{batch:>5} {ours.seconds:>9.3f} {100 * ours.model_seconds / ours.seconds:>7.0f}% "
              f"{1000 * ours.seconds / args.steps:>11.2f} "
              + (f"{row['diffusers_s']:>12.3f} {row['speedup']:>7.2f}x {row['max_abs_diff']:>10.2e}"
                 if baseline is not None else f"{'-':>12} {'-':>8} {'-':>10}"), flush=True)
    result: dict = {"bundle": str(bundle.path), "scheduler": args.scheduler, "steps": args.steps, "rows": rows}
    if args.cold_start:
        cs = cold_start(bundle, repeats=args.repeats, threads=args.threads)
        result["cold_start"] = cs
        o = cs["ours"]
        line = (f"cold start (import + load + 1 step): ours {o['seconds']:.2f} s, "
                f"peak RSS {o['peak_rss_bytes'] / 2**20:.0f} MiB")
        if "diffusers" in cs:
            d = cs["diffusers"]
            line += (f"; diffusers {d['seconds']:.2f} s, {d['peak_rss_bytes'] / 2**20:.0f} MiB "
                     f"({cs['speedup']:.1f}x faster, {cs['rss_ratio']:.1f}x smaller)")
        print(line)
    if args.json:
        from .runtime._fileio import atomic_write_text

        atomic_write_text(args.json, dumps(result) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """train -> export -> sample on the built-in digits; write a grid and print a timing table."""
    import time
    from pathlib import Path

    import numpy as np

    from .runtime.schedulers import SCHEDULER_NAMES

    if args.scheduler.lower() not in SCHEDULER_NAMES:  # checked before minutes of training, not after
        raise ValueError(f"unknown scheduler {args.scheduler!r}; expected one of {list(SCHEDULER_NAMES)}")
    if args.sample_steps < 1 or args.steps < 1:
        raise ValueError(f"--steps and --sample-steps must be >= 1; got {args.steps}, {args.sample_steps}")
    out = Path(args.out)
    run_dir, bundle_dir = out / "run", out / "bundle"
    timings: list[tuple[str, float, str]] = []

    # 1. train (torch): a class-conditional digits model, so the grid shows one digit per row
    from .train.checkpoint import CheckpointError, find_checkpoint

    try:
        done = find_checkpoint(run_dir).step >= args.steps and not args.retrain
    except CheckpointError:
        done = False
    if done:
        print(f"[1/3] train: reusing {run_dir} (trained to {args.steps}+ steps; --retrain to start over)")
    else:
        from .train.config import TrainConfig
        from .train.trainer import train
        from .train.unet import UNetConfig

        if run_dir.exists() and args.retrain:
            import shutil

            shutil.rmtree(run_dir)
        print(f"[1/3] train: {args.steps} steps on the built-in digits -> {run_dir}")
        t0 = time.perf_counter()
        result = train(UNetConfig(num_classes=10), TrainConfig(steps=args.steps, sample_every=0, seed=args.seed),
                       run_dir, resume=run_dir.exists(), progress=not args.no_progress)
        if result["interrupted"]:
            return 130
        timings.append(("train (torch)", time.perf_counter() - t0, f"{args.steps} steps"))

    # 2. export (torch + onnx): validated fp32 and fp16 graphs
    from .export.bundle import export_bundle
    from .export.sources import load_run_source

    print(f"[2/3] export: {run_dir} -> {bundle_dir}")
    t0 = time.perf_counter()
    manifest = export_bundle(load_run_source(run_dir), bundle_dir, fp16=True)
    errs = ", ".join(f"{p} {r['max_error']:.1e}" for p, r in manifest["export"]["validation"].items())
    timings.append(("export + validate", time.perf_counter() - t0, f"max error vs torch: {errs}"))

    # 3. sample with the torch-free runtime
    from .runtime.images import image_grid, save_png, to_uint8
    from .runtime.pipeline import Pipeline

    print(f"[3/3] sample: the runtime (numpy + onnxruntime), {args.scheduler}, {args.sample_steps} steps")
    pipe = Pipeline.from_bundle(bundle_dir, scheduler=args.scheduler)
    labels = np.repeat(np.arange(10), 10)
    t0 = time.perf_counter()
    images = pipe(num_images=100, num_inference_steps=args.sample_steps, seed=list(range(100)),
                  class_labels=labels, guidance_scale=args.guidance, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    timings.append((f"sample 100 ({args.scheduler}, {args.sample_steps} steps)", elapsed,
                    f"{elapsed * 10:.1f} ms/image"))
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="deploy-diff",
        description="Train a diffusion UNet in PyTorch, export it, and sample it without torch.")
    parser.add_argument("--version", action="version", version=f"deploy-diff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(*a, **kw):  # every subcommand also takes --debug after its name
        p = _add_parser(*a, **kw)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("schedules", help="list the beta schedules with their terminal SNR")
    p.add_argument("-T", "--num-train-timesteps", type=int, default=1000)
    p.add_argument("--beta-start", type=float, default=0.0001)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--rescale-betas-zero-snr", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_schedules)

    p = sub.add_parser("train", help="train a UNet denoiser (torch)", epilog=_TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="'digits' (built in, the default), a folder of images, or a .npy/.npz file")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, loss.png, samples/)")
    p.add_argument("--config", help="JSON file: {\"model\": {...}, \"train\": {...}} or one flat object")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out up to --steps in total")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("model (defaults: the digits model)")
    g.add_argument("--sample-size", type=int)
    g.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)")
    g.add_argument("--base-channels", type=int)
    g.add_argument("--channel-mult", type=_ints, help="e.g. 1,2,2")
    g.add_argument("--layers-per-block", type=int)
    g.add_argument("--attention-resolutions", type=_ints, help="feature-map sizes with self-attention, e.g. 8,4")
    g.add_argument("--num-heads", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--num-classes", type=int, help="0 = unconditional; N > 0 adds a null label for guidance")
    g.add_argument("--gradient-checkpointing", action="store_const", const=True)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="total optimizer steps of the run")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--max-grad-norm", type=float, help="0 disables clipping")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    g.add_argument("--loss-type", choices=["l2", "l1", "huber"])
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"])
    g.add_argument("--num-train-timesteps", type=int)
    g.add_argument("--beta-schedule", help="linear, scaled_linear, squaredcos_cap_v2, sigmoid, cosine, quadratic, "
                                           "iddpm_linear, karras (see `deploy-diff schedules`)")
    g.add_argument("--beta-start", type=float)
    g.add_argument("--beta-end", type=float)
    g.add_argument("--rescale-betas-zero-snr", action="store_const", const=True)
    g.add_argument("--label-dropout", type=float, help="probability of the null label (conditional models)")
    g.add_argument("--hflip", action="store_const", const=True, help="random horizontal flips")
    g.add_argument("--seed", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--sample-every", type=int, help="sample grid PNG interval (0 disables)")
    g.add_argument("--keep-last", type=int, help="older checkpoints kept under checkpoints/")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("timesteps", help="print the timesteps and sigmas a scheduler would use")
    p.add_argument("config", nargs="?", help="scheduler_config.json or a folder holding one (default: diffusers' "
                                             "defaults for --scheduler)")
    p.add_argument("--scheduler", help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc "
                                       "(default: the config's _class_name)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--set", help="JSON object of config overrides")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_timesteps)

    p = sub.add_parser("export", help="export a run or a diffusers UNet2DModel to a validated ONNX bundle",
                       epilog="examples:\n  deploy-diff export runs/digits --out bundles/digits --fp16\n"
                              "  deploy-diff export --from-diffusers ./ddpm-cifar10-32 --out bundles/cifar "
                              "--static-batch 8", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="training run folder (deploy-diff train --out)")
    p.add_argument("--from-diffusers", metavar="DIR", help="diffusers pipeline folder or UNet2DModel folder")
    p.add_argument("--scheduler-config", metavar="FILE", help="scheduler_config.json for a bare UNet2DModel folder "
                                                              "(default: diffusers' DDPM defaults)")
    p.add_argument("--out", required=True, help="bundle folder to write (an existing bundle is replaced)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.add_argument("--fp16", action="store_true", help="also write unet.fp16.onnx (validated to 2e-2)")
    p.add_argument("--static-batch", type=int, metavar="B", help="fixed batch size (for CUDA graphs)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (needs TensorRT + GPU)")
    p.add_argument("--tensorrt-max-batch", type=int, default=16, help="largest batch of the engine's profile")
    p.add_argument("--no-optimize", action="store_true", help="keep the graph as exported (no attention fusion "
                                                              "into ONNX Runtime's MultiHeadAttention)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("sample", help="sample images from a bundle with the torch-free runtime",
                       epilog="examples:\n"
                              "  deploy-diff sample bundles/digits --scheduler dpmsolver++ --steps 20 -n 16 --seed 0 "
                              "--out grid.png\n"
                              "  deploy-diff sample bundles/digits-cond --class 7 --guidance 3 -n 8 --out sevens.png\n"
                              "  deploy-diff sample bundles/cifar --device cuda --npz --out samples.npz",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="PNG grid to write (or .npz with --npz)")
    p.add_argument("--scheduler", help="ddpm, ddim, dpmsolver++, sde-dpmsolver++, euler, euler_a, heun, unipc "
                                       "(default: the bundle's own)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("-n", "--num-images", type=int, default=16)
    p.add_argument("--seed", type=int, help="torch-compatible seed: the images diffusers gives for "
                                            "generator=torch.manual_seed(seed)")
    p.add_argument("--seed-per-image", action="store_true", help="one generator per image (seed, seed+1, ...): an "
                                                                 "image does not depend on -n")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (models with a null label)")
    p.add_argument("--class", dest="class_labels", type=_class_list, help="class index, or one per image: 1,7,7")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise weight (0 = deterministic)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--cuda-graph", action="store_true", help="capture a CUDA graph (static-batch bundles, CUDA)")
    p.add_argument("--npz", action="store_true", help="write float32 images [N, H, W, C] in [0, 1] to an .npz")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--scale", type=int, help="grid upscaling factor (default: about 128 px per image)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("bench", help="time sampling from a bundle (against diffusers on torch when possible)")
    p.add_argument("bundle")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=_ints, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="threads for both sides (default: the libraries' defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--no-baseline", action="store_true", help="time the runtime only")
    p.add_argument("--cold-start", action="store_true", help="also time a fresh process: import + load + 1 step")
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="train -> export -> sample on the built-in digits (what `make demo` runs)")
    p.add_argument("--out", default="demo", help="folder for run/, bundle/ and grid.png (default: demo)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000: about 4 min on 2 cores)")
    p.add_argument("--scheduler", default="dpmsolver++")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train from scratch even if --out holds a run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("inspect", help="verify a bundle and print its manifest")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("deploy-diff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line unless --debug
        if args.debug:
            raise
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # no terminal colour codes from library messages
        print(f"deploy-diff {args.command}: error: {type(e).__name__}: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
