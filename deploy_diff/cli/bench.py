"""``deploy-diff bench``: time sampling from a bundle, beside diffusers on torch when the bundle came from it."""

from __future__ import annotations

import argparse

from ._common import EXPORT_HINT_WORDS, add_command, int_list, passes

NAME = "bench"


# the library's export_bundle() arguments in runtime messages -> the export command's flags
FLAG_WORDS = EXPORT_HINT_WORDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, NAME, help="time sampling from a bundle (against diffusers on torch when possible)")
    p.add_argument("bundle")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int_list, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="threads for both sides (default: the libraries' defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--no-baseline", action="store_true", help="time the runtime only")
    p.add_argument("--cold-start", action="store_true", help="also time a fresh process: import + load + 1 step")
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Time the runtime on a bundle; beside it, the diffusers pipeline on torch when the bundle came from one."""
    from ..analysis.bench import cold_start, diffusers_baseline, dumps, time_call, time_pipeline
    from ..runtime.arguments import check_num_images, check_num_inference_steps
    from ..runtime.pipeline import Pipeline

    steps_ok = passes(check_num_inference_steps, args.steps)
    batches_ok = bool(args.batch) and all(passes(check_num_images, b) for b in args.batch)
    if args.repeats < 1 or not steps_ok or not batches_ok:
        raise ValueError(
            f"--repeats, --steps and every --batch size must be >= 1; got --repeats {args.repeats}, "
            f"--steps {args.steps}, --batch {args.batch}"
        )
    pipe = Pipeline.from_bundle(
        args.bundle, scheduler=args.scheduler, num_threads=args.threads, device=args.device, precision=args.precision
    )
    bundle = pipe.bundle
    baseline = None if args.no_baseline else diffusers_baseline(bundle, args.scheduler, args.threads)
    if isinstance(baseline, str):
        print(baseline)
        baseline = None
    kw = {}
    if bundle.model.conditional:
        kw["class_labels"] = 0
    rows = []
    print(
        f"{bundle.path}: {args.scheduler}, {args.steps} steps, best of {args.repeats} "
        f"({'threads ' + str(args.threads) if args.threads else 'default threads'})"
    )
    print(
        f"{'batch':>5} {'ours s':>9} {'model %':>8} {'per step ms':>11} {'diffusers s':>12} {'speedup':>8} "
        f"{'max|diff|':>10}"
    )
    for batch in args.batch:
        ours, images = time_pipeline(pipe, batch, args.steps, repeats=args.repeats, **kw)
        row = {"batch": batch, "ours_s": ours.seconds, "model_s": ours.model_seconds, "runs": ours.runs}
        if baseline is not None:
            best, runs, ref = time_call(lambda b=batch: baseline(b, args.steps, 0), repeats=args.repeats)
            row.update(
                diffusers_s=best,
                diffusers_runs=runs,
                speedup=best / ours.seconds,
                max_abs_diff=float(abs(ref - images).max()),
            )
        rows.append(row)
        print(
            f"{batch:>5} {ours.seconds:>9.3f} {100 * ours.model_seconds / ours.seconds:>7.0f}% "
            f"{1000 * ours.seconds / args.steps:>11.2f} "
            + (
                f"{row['diffusers_s']:>12.3f} {row['speedup']:>7.2f}x {row['max_abs_diff']:>10.2e}"
                if baseline is not None
                else f"{'-':>12} {'-':>8} {'-':>10}"
            ),
            flush=True,
        )
    result: dict = {"bundle": str(bundle.path), "scheduler": args.scheduler, "steps": args.steps, "rows": rows}
    if args.cold_start:
        cs = cold_start(bundle, repeats=args.repeats, threads=args.threads)
        result["cold_start"] = cs
        o = cs["ours"]
        line = (
            f"cold start (import + load + 1 step): ours {o['seconds']:.2f} s, "
            f"peak RSS {o['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        if "diffusers" in cs:
            d = cs["diffusers"]
            line += (
                f"; diffusers {d['seconds']:.2f} s, {d['peak_rss_bytes'] / 2**20:.0f} MiB "
                f"({cs['speedup']:.1f}x faster, {cs['rss_ratio']:.1f}x smaller)"
            )
        print(line)
    if args.json:
        from ..runtime._fileio import atomic_write_text

        atomic_write_text(args.json, dumps(result) + "\n")
    return 0
