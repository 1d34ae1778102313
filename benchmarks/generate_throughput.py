"""Throughput of ``deploy-diff generate`` (Ray workers) against plain ``Pipeline`` processes, same images.

    .venv/bin/python benchmarks/generate_throughput.py [--bundle PATH] [--num-images 20000] [--steps 50]
        [--scheduler ddim] [--shard-size 1000] [--rows plain1,plain2,generate1,generate2]
        [--json benchmarks/results/generate_throughput.json] [--md benchmarks/results/generate_throughput.md]

Smoke run (about a minute): ``--num-images 256 --steps 5 --shard-size 128``. The full run (20,000 images, 50 DDIM
steps) computes the images four times over, about 3x the time of one single-thread pass: roughly 20-30 minutes
on 2 cores at 20-30 ms per image. Run it on a quiet machine: two processes or workers need both cores.

Model: ``--bundle``, or (default) the digits layout of ``benchmarks/_unet_layouts.py`` (UNet2DModel 1x8x8,
block_out_channels (32, 64), attention at 4x4: the size of the model ``deploy-diff train`` makes on the digits)
with random weights, built by ``benchmarks/pipeline_speed.py``'s ``build()``; speed does not depend on the values.

Rows, each in a fresh process (one thread per process or worker, the images of seeds 0..N-1, each shard of
``--shard-size`` images sampled in chunks of ``BATCH_SIZE`` (64) with per-image seeds, as generate does):
  plain1     one process: ``Pipeline.from_bundle(..., num_threads=1)`` in a loop, the images saved as one .npy
  plain2     two such processes started together, splitting the shards by hand (first half, second half)
  generate1  ``generate(..., workers=1)``: a local Ray started by the run, one worker
  generate2  ``generate(..., workers=2)``: two workers
Each row reports wall seconds from launching its process(es) to the last one's exit (imports, Ray start, model
load, sampling and writing included) and images per second over that wall time; ``compute_s`` is the part spent
sampling and writing (plain: after the model is loaded; generate: the run's own ``seconds``, from Ray being up,
worker start included). The issue's target: generate2 >= 0.9x the images/s of plain2. The images of every row are
compared with plain1's (they must be identical: same seeds, same chunks, one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = ("plain1", "plain2", "generate1", "generate2")
TARGET = 0.9  # generate2 / plain2 images per second


def _chunks(num_images: int, shard_size: int, shards: range, batch: int):
    """(start, count) of the model calls of ``shards``: generate's chunking (fixed chunks inside each shard)."""
    for k in shards:
        first, end = k * shard_size, min((k + 1) * shard_size, num_images)
        for start in range(first, end, batch):
            yield start, min(batch, end - start)


def plain_worker(args: argparse.Namespace) -> None:
    """Child process: a plain Pipeline loop over shards [first_shard, end_shard); prints its timings as JSON."""
    t0 = time.perf_counter()
    from deploy_diff.runtime import Pipeline
    from deploy_diff.serving.generate import BATCH_SIZE

    pipe = Pipeline.from_bundle(args.bundle, scheduler=args.scheduler, num_threads=1)
    t1 = time.perf_counter()
    parts = [
        pipe(
            num_images=count,
            num_inference_steps=args.steps,
            seed=list(range(start, start + count)),
            output_type="uint8",
        )
        for start, count in _chunks(args.num_images, args.shard_size, range(*args.shards), BATCH_SIZE)
    ]
    np.save(args.out, np.concatenate(parts))
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "compute_s": t2 - t1}))


def generate_worker(args: argparse.Namespace) -> None:
    """Child process: generate(..., workers=W) as the command runs it; prints its timings as JSON."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from deploy_diff.serving.generate import generate

    # what `deploy-diff generate` does: start a local Ray (all CPUs), run, shut it down
    manifest = generate(
        args.bundle,
        args.out,
        args.num_images,
        shard_size=args.shard_size,
        workers=args.workers,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
    )
    print(json.dumps({"compute_s": manifest["runs"][-1]["seconds"]}))


def _child(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONHASHSEED="0")
    )


def _finish(procs: list[subprocess.Popen], started: float) -> tuple[float, list[dict]]:
    reports = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark process failed (exit {p.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return time.perf_counter() - started, reports


def run_row(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict, np.ndarray]:
    common = [
        "--bundle",
        str(args.bundle),
        "--num-images",
        str(args.num_images),
        "--steps",
        str(args.steps),
        "--scheduler",
        args.scheduler,
        "--shard-size",
        str(args.shard_size),
    ]
    num_shards = -(-args.num_images // args.shard_size)
    started = time.perf_counter()
    if name.startswith("plain"):
        n = int(name[-1])
        bounds = [round(num_shards * i / n) for i in range(n + 1)]
        outs = [tmp / f"{name}-{i}.npy" for i in range(n)]
        procs = [
            _child(["--_plain", *common, "--shards", str(bounds[i]), str(bounds[i + 1]), "--out", str(outs[i])])
            for i in range(n)
        ]
        wall, reports = _finish(procs, started)
        images = np.concatenate([np.load(o) for o in outs])
        compute = max(r["compute_s"] for r in reports)
    else:
        workers = int(name[-1])
        out = tmp / name
        wall, reports = _finish(
            [_child(["--_generate", *common, "--workers", str(workers), "--out", str(out)])], started
        )
        from deploy_diff.serving.generate import iter_shards

        images = np.concatenate([s["images"] for s in iter_shards(out)])
        compute = reports[0]["compute_s"]
    row = {
        "row": name,
        "processes_or_workers": int(name[-1]),
        "images": args.num_images,
        "wall_s": round(wall, 3),
        "images_per_s": round(args.num_images / wall, 2),
        "compute_s": round(compute, 3),
        "compute_images_per_s": round(args.num_images / compute, 2),
    }
    return row, images


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"generate throughput: {c['num_images']} images, {c['scheduler']} {c['steps']} steps, shards of "
        f"{c['shard_size']}, one thread per process / worker; {result['environment']['cpus']} CPUs "
        f"({result['environment']['cpu_model']}), 1-minute load {result['environment']['load_start']} at the start",
        "",
        "| row | processes / workers | wall s | images/s | compute s | compute images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {r['processes_or_workers']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['compute_s']:.1f} | {r['compute_images_per_s']:.1f} |"
        )
    lines.append("")
    for key, value in result["ratios"].items():
        lines.append(f"- {key}: {value:.3f}")
    if result.get("target") is not None:
        t = result["target"]
        lines.append(
            f"- target generate2 >= {t['min_ratio']}x plain2 (wall images/s): {'met' if t['met'] else 'NOT met'}"
        )
    lines.append(f"- images identical to plain1 in every row: {result['identical']}")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a pixel-space bundle (default: build the digits layout, random weights)")
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--json", help="write the results here (e.g. benchmarks/results/generate_throughput.json)")
    parser.add_argument("--md", help="write a markdown table here (e.g. benchmarks/results/generate_throughput.md)")
    # the child processes' own modes
    parser.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._plain:
        return plain_worker(args)
    if args._generate:
        return generate_worker(args)

    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not rows:
        parser.error(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    with tempfile.TemporaryDirectory(prefix="generate-throughput-") as tmp:
        tmp = Path(tmp)
        if args.bundle is None:
            from pipeline_speed import build  # benchmarks/ is sys.path[0] when run as a script

            args.bundle = build("digits", tmp)
        load_start = round(os.getloadavg()[0], 2)
        results, reference, identical = [], None, True
        for name in rows:
            row, images = run_row(name, args, tmp)
            if reference is None:
                reference = images
            identical = identical and images.shape == reference.shape and bool(np.array_equal(images, reference))
            print(json.dumps(row), flush=True)
            results.append(row)
    by = {r["row"]: r for r in results}
    ratios = {}
    for a, b in (("generate2", "plain2"), ("generate1", "plain1"), ("generate2", "generate1"), ("plain2", "plain1")):
        if a in by and b in by:
            ratios[f"{a} / {b} (wall images/s)"] = round(by[a]["images_per_s"] / by[b]["images_per_s"], 3)
            ratios[f"{a} / {b} (compute images/s)"] = round(
                by[a]["compute_images_per_s"] / by[b]["compute_images_per_s"], 3
            )
    target = None
    if "generate2" in by and "plain2" in by:
        ratio = by["generate2"]["images_per_s"] / by["plain2"]["images_per_s"]
        target = {"min_ratio": TARGET, "ratio": round(ratio, 3), "met": ratio >= TARGET}
    import onnxruntime
    import ray

    result = {
        "config": {
            "bundle": str(args.bundle) if "generate-throughput-" not in str(args.bundle) else "digits layout (built)",
            "num_images": args.num_images,
            "steps": args.steps,
            "scheduler": args.scheduler,
            "shard_size": args.shard_size,
            "rows": rows,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_start": load_start,
            "load_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "versions": {
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "ray": ray.__version__,
            },
        },
        "rows": results,
        "ratios": ratios,
        "target": target,
        "identical": identical,
    }
    print(markdown(result))
    from deploy_diff.runtime._fileio import atomic_write_text

    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.md:
        atomic_write_text(args.md, markdown(result))


if __name__ == "__main__":
    main()
