"""``deploy-diff bench``: time sampling from a bundle per backend and precision, how far each precision's images are
from fp32's, beside diffusers on torch when the bundle came from it; optionally the digits quality ratio."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..runtime.precisions import BACKENDS, PRECISIONS
from ._common import EXPORT_HINT_WORDS, add_command, int_list, passes

NAME = "bench"

QUALITIES = ("digits",)
QUALITY_CHUNK = 256  # images per sampling call for --quality

# the library's export_bundle() arguments in runtime messages -> the export command's flags
FLAG_WORDS = EXPORT_HINT_WORDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        NAME,
        help="time sampling from a bundle per backend and precision (against diffusers on torch when possible)",
        description=(
            "Per backend, precision and batch: seconds per image, and max_abs / mean_abs / psnr_db of the images "
            "against the same backend's fp32 images for the same seeds (PSNR on [0, 1] images, peak 1.0; equal "
            "images have an infinite PSNR, printed as inf and written to JSON as null)."
        ),
    )
    p.add_argument("bundle")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int_list, default=[1, 8], help="batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="threads for both sides (default: the libraries' defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        help=f"comma list of {', '.join(BACKENDS)} (default onnxruntime); auto is resolved per precision: "
        "openvino when installed, the device is the CPU and it computes that precision, else onnxruntime",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help=f"comma list of {', '.join(PRECISIONS)} (default fp32); each is compared with fp32 of its backend",
    )
    p.add_argument(
        "--quality",
        help="also score samples per backend and precision: 'digits' (1-channel digits bundles; needs "
        "deploy-diff[train]) adds fd_ratio, the Frechet distance over what real digits score",
    )
    p.add_argument(
        "--quality-images", type=int, default=540, help="images sampled for --quality (seeds 0..N-1; default 540)"
    )
    p.add_argument("--no-baseline", action="store_true", help="time the runtime only")
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="also time a fresh process per backend and precision: import + load + 1 step",
    )
    p.add_argument("--json", help="write the results to this JSON file (an infinite PSNR is written as null)")
    p.set_defaults(func=run)


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """A comma list of names from ``allowed`` (repeats dropped, order kept), or a ValueError listing the unknown."""
    names = list(dict.fromkeys(v for v in text.replace(" ", "").lower().split(",") if v))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        what = f"unknown {', '.join(repr(n) for n in unknown)}" if unknown else "none given"
        raise ValueError(f"{flag} takes a comma list of {', '.join(allowed)}; {what}")
    return names


def _runs_on(bundle, backend: str, precision: str, device: str) -> str:
    """The backend that runs ``precision`` (``auto`` resolved) on ``bundle`` and its fp32 reference, checked by the
    library before any timing (a missing graph or engine, OpenVINO's absence, a CPU without bf16), so that nothing
    fails after minutes of timing."""
    from ..runtime.pipeline import check_backend

    resolved = check_backend(bundle, backend, device, precision)  # auto: the backend it picks for this precision
    check_backend(bundle, resolved, device, "fp32")  # the reference every row is compared with
    return resolved


def _parse(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The options that need no bundle, checked first; returns the backends and the precisions (fp32 first)."""
    from ..runtime.arguments import check_num_images, check_num_inference_steps

    steps_ok = passes(check_num_inference_steps, args.steps)
    batches_ok = bool(args.batch) and all(passes(check_num_images, b) for b in args.batch)
    if args.repeats < 1 or not steps_ok or not batches_ok:
        raise ValueError(
            f"--repeats, --steps and every --batch size must be >= 1; got --repeats {args.repeats}, "
            f"--steps {args.steps}, --batch {args.batch}"
        )
    backends = _names(args.backend, BACKENDS, "--backend")
    precisions = sorted(_names(args.precision, PRECISIONS, "--precision"), key=lambda p: p != "fp32")
    if args.quality is not None:
        _names(args.quality, QUALITIES, "--quality")
        if args.quality_images < 2:
            raise ValueError(f"--quality-images must be >= 2 (a covariance needs 2 images); got {args.quality_images}")
    return backends, precisions


def _plan(
    bundle, backends: list[str], precisions: list[str], device: str
) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """Backend -> the precisions it runs (``auto`` resolved per precision), and the pairs left out: with several
    backends, a precision that one of them lacks (openvino has no fp16) runs on the others; a precision that none
    of the requested backends can run is refused with the library's words."""
    plan: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for precision in precisions:
        refusals = []
        for backend in backends:
            try:
                resolved = _runs_on(bundle, backend, precision, device)
            except ValueError as e:  # a missing library (ImportError) is refused at once: that backend was asked for
                refusals.append(e)
                skipped.append({"backend": backend, "precision": precision, "reason": str(e)})
                continue
            if backend == "auto":
                print(f"auto {precision}: runs on {resolved}")
            if precision not in plan.setdefault(resolved, []):  # auto may name a backend that is also listed
                plan[resolved].append(precision)
        if len(refusals) == len(backends):
            raise refusals[0]
    return plan, skipped


def _digits_quality(bundle) -> Any:
    """The digits measure, built once; refused up front for a bundle that does not make digits-like images."""
    channels = bundle.model.in_channels
    if channels != 1:
        raise ValueError(
            f"--quality digits scores 1-channel (digits) bundles; {bundle.path} makes {channels}-channel images"
        )
    try:
        import sklearn.datasets  # noqa: F401

        from ..analysis.quality import DigitsQuality
    except ImportError as e:
        raise ImportError(
            f"--quality digits needs torch and scikit-learn ({e.name or e} is missing): "
            "pip install 'deploy-diff[train]'"
        ) from None
    return DigitsQuality()


def _close(pipe) -> None:
    close = getattr(pipe.runner, "close", None)
    if close is not None:
        close()


def run(args: argparse.Namespace) -> int:
    """Time the runtime on a bundle per backend, precision and batch; compare each precision's images with fp32's;
    beside it, the diffusers pipeline on torch when the bundle came from one."""
    from ..analysis.bench import (
        against_cold_baseline,
        cold_start,
        diffusers_baseline,
        dumps,
        image_diff,
        sample_for_quality,
        time_call,
        time_pipeline,
    )
    from ..runtime.bundle import load_bundle
    from ..runtime.pipeline import Pipeline

    backends, precisions = _parse(args)
    bundle = load_bundle(args.bundle)
    plan, skipped = _plan(bundle, backends, precisions, args.device)
    quality = _digits_quality(bundle) if args.quality else None

    def load(backend: str, precision: str) -> Pipeline:
        return Pipeline.from_bundle(
            bundle,
            backend=backend,
            scheduler=args.scheduler,
            num_threads=args.threads,
            device=args.device,
            precision=precision,
        )

    baseline = None if args.no_baseline else diffusers_baseline(bundle, args.scheduler, args.threads)
    if isinstance(baseline, str):
        print(baseline)
        baseline = None
    baseline_runs: dict[int, tuple[float, list[float], Any]] = {}  # batch -> diffusers timing, shared by all rows
    kw = {"class_labels": 0} if bundle.model.conditional else {}
    rows: list[dict[str, Any]] = []
    quality_rows: list[dict[str, Any]] = []
    for left_out in skipped:
        print(f"skipped {left_out['backend']} {left_out['precision']}: {left_out['reason']}")
    print(
        f"{bundle.path}: {args.scheduler}, {args.steps} steps, best of {args.repeats} "
        f"({'threads ' + str(args.threads) if args.threads else 'default threads'}); "
        "max|d| and PSNR against the same backend at fp32, same seeds"
    )
    print(
        f"{'backend':<11} {'prec':<4} {'batch':>5} {'ours s':>9} {'s/image':>9} {'model %':>8} {'per step ms':>11} "
        f"{'max|d|':>9} {'PSNR dB':>8} {'diffusers s':>12} {'speedup':>8} {'max|diff|':>10}"
    )
    for backend, wanted in plan.items():
        reference: dict[int, Any] = {}  # batch -> this backend's fp32 images
        if "fp32" not in wanted:
            pipe = load(backend, "fp32")
            try:
                for batch in args.batch:
                    reference[batch] = pipe(num_images=batch, num_inference_steps=args.steps, seed=0, **kw)
            finally:
                _close(pipe)
        for precision in wanted:
            pipe = load(backend, precision)
            try:
                for batch in args.batch:
                    ours, images = time_pipeline(pipe, batch, args.steps, repeats=args.repeats, **kw)
                    reference.setdefault(batch, images)
                    row = {
                        "backend": backend,
                        "precision": precision,
                        "batch": batch,
                        "threads": args.threads,
                        "runner": type(pipe.runner).__name__,
                        "runner_precision": getattr(pipe.runner, "precision", precision),
                        "seconds_per_image": ours.seconds / batch,
                        "ours_s": ours.seconds,
                        "model_s": ours.model_seconds,
                        "runs": ours.runs,
                        **image_diff(images, reference[batch]),
                    }
                    if baseline is not None:
                        if batch not in baseline_runs:
                            baseline_runs[batch] = time_call(
                                lambda b=batch: baseline(b, args.steps, 0), repeats=args.repeats
                            )
                        best, runs, ref = baseline_runs[batch]
                        row.update(
                            diffusers_s=best,
                            diffusers_runs=runs,
                            speedup=best / ours.seconds,
                            max_abs_diff=float(abs(ref - images).max()),
                        )
                    rows.append(row)
                    print(
                        f"{backend:<11} {precision:<4} {batch:>5} {ours.seconds:>9.3f} {ours.seconds / batch:>9.4f} "
                        f"{100 * ours.model_seconds / ours.seconds:>7.0f}% {1000 * ours.seconds / args.steps:>11.2f} "
                        f"{row['max_abs']:>9.2e} {row['psnr_db']:>8.1f} "
                        + (
                            f"{row['diffusers_s']:>12.3f} {row['speedup']:>7.2f}x {row['max_abs_diff']:>10.2e}"
                            if baseline is not None
                            else f"{'-':>12} {'-':>8} {'-':>10}"
                        ),
                        flush=True,
                    )
                if quality is not None:
                    t0 = time.perf_counter()
                    images, labels = sample_for_quality(pipe, args.quality_images, args.steps, chunk=QUALITY_CHUNK)
                    seconds = time.perf_counter() - t0
                    score = quality.score(images, labels)
                    quality_rows.append(
                        {
                            "backend": backend,
                            "precision": precision,
                            "threads": args.threads,
                            "fd_ratio": score.pop("ratio"),
                            **score,
                            "sample_s": seconds,
                        }
                    )
            finally:
                _close(pipe)
    for q in quality_rows:
        agreement = f", class agreement {q['class_agreement']:.2f}" if "class_agreement" in q else ""
        print(
            f"quality (digits, {q['num_images']} images): {q['backend']} {q['precision']}: fd_ratio "
            f"{q['fd_ratio']:.3f} (fd {q['fd']:.4g}, floor {q['floor']:.4g}){agreement}"
        )
    result: dict[str, Any] = {
        "bundle": str(bundle.path),
        "scheduler": args.scheduler,
        "steps": args.steps,
        "device": args.device,
        "rows": rows,
        "skipped": skipped,
        "quality": quality_rows,
        "cold_start": None,
    }
    if args.cold_start:
        result["cold_start"] = entries = []
        shared = None  # diffusers' cold start, measured once
        for backend, wanted in plan.items():
            for precision in wanted:
                cs = cold_start(
                    bundle,
                    repeats=args.repeats,
                    threads=args.threads,
                    backend=backend,
                    precision=precision,
                    baseline=not entries,
                )
                if "diffusers" in cs:
                    shared = cs["diffusers"]
                elif shared is not None:
                    cs.update(diffusers=shared, **against_cold_baseline(cs["ours"], shared))
                entries.append(cs)
                o = cs["ours"]
                line = (
                    f"cold start (import + load + 1 step): {backend} {precision} {o['seconds']:.2f} s, "
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
