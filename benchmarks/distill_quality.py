"""Few-step students against their teacher: wall time per image through the runtime and quality on digits.

    .venv/bin/python benchmarks/distill_quality.py TEACHER_RUN [STUDENT_RUN] [--student NAME=RUN[:STEPS] ...]
        [--num-images 540] [--sets 3] [--threads 2] [--out benchmarks/results/distill_quality]

Exports every run to a temporary fp32 bundle, then for the teacher with DPM-Solver++ at 10/20/50 steps and DDIM
at 50, and for each student with its own scheduler (the bundle's) at its step counts (default 1/2/4), samples
``--sets`` x ``--num-images`` digits through ``deploy_diff.runtime.Pipeline`` (ONNX Runtime, image i has seed i)
and prints one table: model evaluations per image, milliseconds per image (the whole set in calls of 256, and one
image at a time), the Frechet-distance ratio to the real floor (``deploy_diff.analysis.quality.DigitsQuality``, the
measure of ``benchmarks/digits_quality.py``, averaged over the sets), and the median nearest-neighbour L2 distance
of the first set's samples to the training digits (memorisation check). Writes OUT.json, OUT.md and OUT.png
(quality against model evaluations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deploy_diff.analysis.bench import dumps, sample_for_quality
from deploy_diff.analysis.quality import DigitsQuality
from deploy_diff.export.bundle import export_bundle
from deploy_diff.export.sources import load_run_source
from deploy_diff.runtime import Pipeline

TEACHER_ROWS = (("dpmsolver++", 10), ("dpmsolver++", 20), ("dpmsolver++", 50), ("ddim", 50))
STUDENT_STEPS = (1, 2, 4)
LATENCY_IMAGES = 16  # one-image calls timed for the latency column


def nearest_neighbour_median(images: np.ndarray, reference: np.ndarray) -> float:
    """Median over ``images`` of the L2 distance (in [0, 1] pixel units) to the closest ``reference`` image."""
    a = images.reshape(len(images), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return float(np.median(np.sqrt(np.maximum(d2.min(1), 0.0))))


def measure(pipe: Pipeline, steps: int, n: int, sets: int, quality: DigitsQuality, train_digits: np.ndarray) -> dict:
    pipe(num_images=1, num_inference_steps=steps, seed=0)  # warm-up
    t0 = time.perf_counter()
    images, labels = sample_for_quality(pipe, n * sets, steps)
    batch_ms = (time.perf_counter() - t0) / (n * sets) * 1e3
    single = []
    for i in range(LATENCY_IMAGES):
        t1 = time.perf_counter()
        pipe(num_images=1, num_inference_steps=steps, seed=i)
        single.append(time.perf_counter() - t1)
    # the measure of benchmarks/digits_quality.py on ``sets`` disjoint sets of n images (seeds 0..n-1, n..2n-1, ...):
    # one set's ratio varies by about +-0.3 between seed sets, so the table gives their mean and range
    scores = [
        quality.score(images[i * n : (i + 1) * n, ..., 0], None if labels is None else labels[i * n : (i + 1) * n])
        for i in range(sets)
    ]
    ratios = [sc["ratio"] for sc in scores]
    return {
        "ms_per_image_batched": batch_ms,
        "ms_per_image_single": float(np.median(single) * 1e3),
        "fd": float(np.mean([sc["fd"] for sc in scores])),
        "floor": scores[0]["floor"],
        "fd_ratio": float(np.mean(ratios)),
        "fd_ratio_sets": ratios,
        "nn_median_l2": nearest_neighbour_median(images[:n, ..., 0], train_digits),
        **({"class_agreement": float(np.mean([sc["class_agreement"] for sc in scores]))} if labels is not None else {}),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((r["evaluations"], r["fd_ratio"]) for r in rows if r["series"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="real-data floor")
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per image")
    ax.set_ylabel("Frechet distance / real floor")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("student", nargs="?", help="the student run (named 'student'), sampled at 1, 2 and 4 steps")
    parser.add_argument(
        "--student",
        dest="students",
        action="append",
        default=[],
        metavar="NAME=RUN[:STEPS]",
        help="another student, sampled at STEPS (comma list; default 1,2,4)",
    )
    parser.add_argument("--num-images", type=int, default=540)
    parser.add_argument("--sets", type=int, default=3, help="disjoint image sets whose FD ratios are averaged")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/distill_quality")
    args = parser.parse_args()
    students = [("student", args.student, STUDENT_STEPS)] if args.student else []
    for spec in args.students:
        name, _, rest = spec.partition("=")
        run, _, steps = rest.partition(":")
        students.append((name, run, tuple(int(k) for k in steps.split(",")) if steps else STUDENT_STEPS))
    if not students:
        parser.error("give at least one student run")
    from sklearn.datasets import load_digits

    train_digits = load_digits().images.astype(np.float32) / 16.0
    quality = DigitsQuality()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("teacher", args.teacher)] + [(name, run) for name, run, _ in students]
        bundles = {}
        for name, run in runs:
            bundles[name] = Path(tmp) / name
            export_bundle(load_run_source(run), bundles[name], log=None)
        plans = [("teacher", sched, steps) for sched, steps in TEACHER_ROWS]
        plans += [(name, None, steps) for name, _, step_list in students for steps in step_list]
        for name, sched, steps in plans:
            pipe = Pipeline.from_bundle(bundles[name], scheduler=sched, num_threads=args.threads)
            sched_name = type(pipe.make_scheduler()).__name__
            row = {
                "series": f"{name} ({sched_name})",
                "model": name,
                "scheduler": sched_name,
                "steps": steps,
                "evaluations": steps,
                **measure(pipe, steps, args.num_images, args.sets, quality, train_digits),
            }
            rows.append(row)
            print(
                f"{row['series']:<38} {steps:>3} evals  {row['ms_per_image_batched']:7.2f} ms/img batched  "
                f"{row['ms_per_image_single']:7.2f} ms single  FD ratio {row['fd_ratio']:.2f}  "
                f"NN {row['nn_median_l2']:.3f}",
                flush=True,
            )
    ref = {(r["scheduler"], r["steps"]): r for r in rows if r["model"] == "teacher"}
    dpm20, ddim50 = ref[("DPMSolverMultistepScheduler", 20)], ref[("DDIMScheduler", 50)]
    for r in rows:
        r["speedup_vs_dpmsolver20"] = dpm20["ms_per_image_batched"] / r["ms_per_image_batched"]
        r["speedup_vs_ddim50"] = ddim50["ms_per_image_batched"] / r["ms_per_image_batched"]
        r["fd_ratio_vs_dpmsolver20"] = r["fd_ratio"] / dpm20["fd_ratio"]
        r["nn_vs_teacher_dpmsolver20"] = r["nn_median_l2"] / dpm20["nn_median_l2"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "teacher": args.teacher,
        "students": {name: run for name, run, _ in students},
        "sets": args.sets,
        "num_images": args.num_images,
        "threads": args.threads,
        "floor": quality.floor,
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
    }
    out.with_suffix(".json").write_text(dumps({"meta": meta, "rows": rows}) + "\n", encoding="utf-8")
    lines = [
        f"# Distilled students vs teacher (ONNX Runtime, {args.threads} threads; FD ratio: mean of {args.sets} sets of "
        f"{args.num_images} digits, range in brackets; NN: median nearest-neighbour L2 of the first set, and its ratio "
        "to the teacher's with DPM-Solver++ 20)",
        "",
        "| model | scheduler | evals | ms/image (batches of 256) | ms/image (one at a time) | speed-up vs DPM++ 20 "
        "| vs DDIM 50 | FD ratio | vs DPM++ 20 | NN median L2 (vs teacher) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['scheduler']} | {r['evaluations']} | {r['ms_per_image_batched']:.2f} | "
            f"{r['ms_per_image_single']:.2f} | {r['speedup_vs_dpmsolver20']:.1f}x | {r['speedup_vs_ddim50']:.1f}x | "
            f"{r['fd_ratio']:.2f} ({min(r['fd_ratio_sets']):.2f}-{max(r['fd_ratio_sets']):.2f}) | "
            f"{r['fd_ratio_vs_dpmsolver20']:.2f} | {r['nn_median_l2']:.3f} "
            f"({r['nn_vs_teacher_dpmsolver20']:.2f}) |"
        )
    lines += ["", f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, out.with_suffix(".png"))
    print(json.dumps({"written": [str(out.with_suffix(s)) for s in (".json", ".md", ".png")]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
