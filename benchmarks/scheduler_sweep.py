"""Wall time and sample quality against the number of steps, for each runtime scheduler, on a digits bundle.

How many steps each scheduler needs (DDPM's hundreds against the ODE solvers' tens), measured.

    .venv/bin/python benchmarks/scheduler_sweep.py BUNDLE [--schedulers ddpm,ddim,dpmsolver++,unipc,euler,euler_a,heun]
        [--steps 5,10,20,50,100] [--ddpm-steps 50,100,250,1000] [--num-images 500] [--batch 250] [--seed 0]
        [--threads N] [--guidance G] [--per-image-seeds] [--out benchmarks/results/scheduler_sweep] [--quick]
        [--note TEXT]

For every scheduler and step count, samples ``--num-images`` digits from the bundle through the torch-free
runtime (``Pipeline``, ONNX Runtime on the CPU) and scores them with
:class:`deploy_diff.analysis.quality.DigitsQuality`. DDPM takes its step counts from ``--ddpm-steps`` (it needs
many more steps than the ODE solvers); every other scheduler from ``--steps``. ``--quick`` is a smoke run:
ddim and dpmsolver++ at 5 and 20 steps, 100 images.

Columns of the table:

* ``model calls``: UNet evaluations per image (steps, except Heun: 2 per step but the last); counted by wrapping
  the runner, not computed. With ``--guidance`` each call runs the conditional and the null half in one batch.
* ``wall s``: seconds to sample all ``--num-images`` images (all chunks; the quality scoring is not included).
  One untimed warm-up call runs first, so session start-up is not charged to the first row.
* ``ms/image``: ``wall s`` / ``--num-images``, in milliseconds.
* ``FD``: Frechet distance between the samples and the real digits' train split, in the feature space of a small
  digits classifier. ``FD ratio``: FD / the real-data floor (real held-out digits against the same train split,
  printed in the header). Lower is better; 1.0 is as good as real held-out digits. FD is biased upwards at small
  sample counts, so compare ratios only at one ``--num-images``.
* ``class agreement`` (conditional bundles): how often the classifier names the requested class. Labels are
  ``arange(n) % num_classes``; no guidance unless ``--guidance`` is given.

Seeds: sampling runs in chunks of ``--batch`` images, chunk ``[i, i + batch)`` drawing from one torch-compatible
generator seeded ``seed + i`` (as ``Pipeline(seed=int)``). So every scheduler of a sweep starts from the same
initial noise, but the images (and FD) change with ``--batch``: compare rows only at one ``--batch``.
``--per-image-seeds`` gives image i its own generator seeded ``seed + i`` instead, so the images do not depend
on ``--batch``; it is not the default because drawing the per-step noise of the stochastic schedulers (ddpm,
euler_a, sde-dpmsolver++) image by image costs extra time (measured: ~35 us per image and step, about 7% of a
step of the 8x8 digits model on one thread), which would bias their wall times.

Writes ``<out>.md`` (the table with a header naming the setup: the bundle's scheduler config, the machine's load
average, since wall times on a shared machine are upper bounds, and ``--note``), ``<out>.json`` (the raw rows and
the setup), both rewritten after every row so an interrupted sweep keeps what it measured, then ``<out>.png`` (FD
ratio against steps and against wall time, one line per scheduler) and ``<out>_samples.png`` (the first images of
every row, one grid row per table row, in table order). The table is also printed to stdout as rows complete.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploy_diff.analysis.quality import DigitsQuality
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime._fileio import atomic_open
from deploy_diff.runtime.images import image_grid, save_png, to_uint8
from deploy_diff.runtime.sampling import NonFiniteError
from deploy_diff.runtime.schedulers import SCHEDULER_NAMES

DEFAULT_SCHEDULERS = "ddpm,ddim,dpmsolver++,unipc,euler,euler_a,heun"
DEFAULT_STEPS = "5,10,20,50,100"
DEFAULT_DDPM_STEPS = "50,100,250,1000"
DEFAULT_OUT = "benchmarks/results/scheduler_sweep"
QUICK = {"schedulers": "ddim,dpmsolver++", "steps": "5,20", "num_images": 100}
STRIP = 10  # images per row of the sample grid


class CountingRunner:
    """Wraps a runner; counts its calls (UNet evaluations) and the batch rows it ran."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.calls = 0
        self.rows = 0

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray | None = None):
        self.calls += 1
        self.rows += int(sample.shape[0])
        return self.runner(sample, timestep, class_labels)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be positive integers; got {text!r}")
    return sorted(set(values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="an exported bundle folder (deploy-diff export)")
    parser.add_argument(
        "--schedulers",
        default=None,
        help=f"comma-separated, from {','.join(SCHEDULER_NAMES)} (default {DEFAULT_SCHEDULERS})",
    )
    parser.add_argument(
        "--steps", default=None, help=f"step counts of every scheduler but ddpm (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--ddpm-steps", default=DEFAULT_DDPM_STEPS, help="step counts of ddpm (default %(default)s)")
    parser.add_argument("--num-images", type=int, default=None, help="images per row (default 500)")
    parser.add_argument("--batch", type=int, default=250, help="images per Pipeline call (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the chunk starting at image i is seeded seed + i (default %(default)s)"
    )
    parser.add_argument(
        "--per-image-seeds",
        action="store_true",
        help="one generator per image (seed + i): images independent of --batch, slower noise",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: its own choice, one per physical core)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (conditional bundles with a null label; default none)",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="output prefix: <out>.md, .json, .png, _samples.png (default %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ddim,dpmsolver++ at 5,20 steps, 100 images (explicit options still win)",
    )
    parser.add_argument(
        "--note", default=None, help="a sentence for the table's header, e.g. what else ran on the machine"
    )
    args = parser.parse_args(argv)

    quick = QUICK if args.quick else {}
    args.schedulers = args.schedulers or quick.get("schedulers", DEFAULT_SCHEDULERS)
    args.steps = args.steps or quick.get("steps", DEFAULT_STEPS)
    args.num_images = args.num_images or quick.get("num_images", 500)
    try:
        args.steps = _int_list(args.steps, "--steps")
        args.ddpm_steps = _int_list(args.ddpm_steps, "--ddpm-steps")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    names = [s.strip().lower() for s in args.schedulers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCHEDULER_NAMES]
    if unknown or not names:
        parser.error(f"unknown scheduler(s) {unknown}; expected names from {list(SCHEDULER_NAMES)}")
    args.schedulers = list(dict.fromkeys(names))
    if args.num_images < 2:
        parser.error("--num-images must be at least 2 (a Frechet distance needs a covariance)")
    if args.batch < 1:
        parser.error("--batch must be positive")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    return args


# -- sampling ---------------------------------------------------------------------------------------------
def run_row(
    pipe: Pipeline,
    num_images: int,
    steps: int,
    batch: int,
    seed: int,
    labels: np.ndarray | None,
    guidance: float | None,
    per_image_seeds: bool = False,
) -> tuple[np.ndarray, float, int]:
    """Sample ``num_images`` images in chunks; return (images float32 [N, H, W, C], seconds, model calls per
    image)."""
    counter = pipe.runner
    assert isinstance(counter, CountingRunner)
    counter.calls = counter.rows = 0
    out = []
    chunks = 0
    start = time.perf_counter()
    for i in range(0, num_images, batch):
        n = min(batch, num_images - i)
        seeds = [seed + i + k for k in range(n)] if per_image_seeds else seed + i
        out.append(
            pipe(
                num_images=n,
                num_inference_steps=steps,
                seed=seeds,
                class_labels=None if labels is None else labels[i : i + n],
                guidance_scale=guidance,
                output_type="np",
            )
        )
        chunks += 1
    seconds = time.perf_counter() - start
    if counter.calls % chunks:
        raise RuntimeError(f"{counter.calls} model calls over {chunks} chunks: not the same per chunk")
    return np.concatenate(out), seconds, counter.calls // chunks


# -- output -----------------------------------------------------------------------------------------------
def _columns(conditional: bool, num_images: int) -> list[str]:
    cols = ["scheduler", "steps", "model calls", f"wall s ({num_images} img)", "ms/image", "FD", "FD ratio"]
    return cols + ["class agreement"] if conditional else cols


def _fmt_row(row: dict[str, Any], conditional: bool) -> str:
    def num(v: Any, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    cells = [
        row["scheduler"],
        str(row["steps"]),
        num(row["model_calls"], "d"),
        num(row["wall_s"], ".2f"),
        num(row["ms_per_image"], ".2f"),
        num(row["fd"], ".3f"),
        num(row["fd_ratio"], ".2f"),
    ]
    if conditional:
        cells.append(num(row.get("class_agreement"), ".3f"))
    line = "| " + " | ".join(cells) + " |"
    return line + (f" <!-- {row['error']} -->" if row.get("error") else "")


def table_lines(conditional: bool, num_images: int) -> list[str]:
    cols = _columns(conditional, num_images)
    align = ["---", "---:"] + ["---:"] * (len(cols) - 2)
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]


def _config_line(config: dict[str, Any] | None) -> list[str]:
    """The bundle's scheduler settings every row starts from (clip_sample decides DDIM's behaviour at many steps)."""
    if config is None:
        return []
    keys = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "clip_sample")
    cells = [f"{k} {config[k]}" for k in keys if k in config]
    if "clip_sample" not in config:
        cells.append("clip_sample not set (DDPM and DDIM then default to True)")
    return ["Scheduler config of the bundle (scheduler_config.json): " + ", ".join(cells) + ".", ""]


def _load_lines(meta: dict[str, Any]) -> list[str]:
    """The machine's load around the sweep (wall times on a shared machine are upper bounds) and ``--note``."""
    parts = []
    if meta.get("load_average_start") is not None:
        end = meta.get("load_average_end")
        at_end = f" and {end:.1f} at the end" if end is not None else ""
        parts.append(
            f"1-minute load average {meta['load_average_start']:.1f} at the start{at_end}, {meta['cpu_count']} CPUs."
        )
    if meta.get("note"):
        parts.append(str(meta["note"]))
    return [" ".join(parts), ""] if parts else []


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cond = meta["conditional"]
    threads = meta["threads"] if meta["threads"] is not None else "ORT default"
    kind = f"conditional, {meta['num_classes']} classes" if cond else "unconditional"
    lines = [
        "# Scheduler sweep",
        "",
        f"Bundle `{meta['bundle']}` ({kind}, {meta['sample_size'][0]}x{meta['sample_size'][1]}x{meta['in_channels']}, "
        f"{meta['prediction_type']}), ONNX Runtime {meta['onnxruntime']} on the CPU ({meta['cpu_count']} CPUs, "
        f"{threads} intra-op threads), {meta['platform']}, {meta['date']}.",
        "",
        f"{meta['num_images']} images per row in chunks of {meta['batch']}, "
        + (
            f"image i seeded {meta['seed']} + i"
            if meta["per_image_seeds"]
            else f"the chunk from image i seeded {meta['seed']} + i"
        )
        + (f", labels arange(n) % {meta['num_classes']}" if cond else "")
        + (f", guidance {meta['guidance']}" if meta["guidance"] is not None else ", no guidance")
        + ". "
        f"FD: Frechet distance to real digits in a digits classifier's feature space; real-data floor "
        f"{meta['floor']:.3f} (held-out real digits), FD ratio = FD / floor (1.0 = as good as real data). "
        "Model calls: UNet evaluations per image. Wall s: all images, sampling only.",
        "",
        *_config_line(meta.get("scheduler_config")),
        *_load_lines(meta),
        *table_lines(cond, meta["num_images"]),
        *(_fmt_row(r, cond) for r in rows),
        "",
    ]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text.encode("utf-8"))


def write_reports(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    write_text(out.with_name(out.name + ".md"), markdown(meta, rows))
    write_text(out.with_name(out.name + ".json"), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def plot(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r["fd_ratio"] is not None and math.isfinite(r["fd_ratio"]) and r["fd_ratio"] > 0]
    fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in dict.fromkeys(r["scheduler"] for r in ok):
        rs = sorted((r for r in ok if r["scheduler"] == name), key=lambda r: r["steps"])
        kw = {"marker": "o", "label": name}
        ax_steps.plot([r["steps"] for r in rs], [r["fd_ratio"] for r in rs], **kw)
        ax_time.plot([r["wall_s"] for r in rs], [r["fd_ratio"] for r in rs], **kw)
    ratios = [r["fd_ratio"] for r in ok]
    log_y = bool(ratios) and max(ratios) / min(ratios) > 10
    for ax in (ax_steps, ax_time):
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="real data (ratio 1)")
        ax.set_ylabel("FD ratio (FD / real-data floor, lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    all_steps = sorted({r["steps"] for r in ok})
    if all_steps:
        ax_steps.set_xticks(all_steps, [str(v) for v in all_steps])
        ax_steps.minorticks_off()
    # plain numbers (0.3, 2, 50) rather than 3x10^-1 on the log axes
    axes = [ax_time.xaxis] + ([ax_steps.yaxis, ax_time.yaxis] if log_y else [])

    def minor(v: float, _pos: Any) -> str:  # label 2x and 5x of each decade
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    for axis in axes:
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))
    ax_steps.set_xlabel("inference steps")
    ax_steps.set_title("quality vs steps")
    ax_time.set_xlabel(f"wall seconds for {meta['num_images']} images")
    ax_time.set_title("quality vs wall time")
    ax_steps.legend(fontsize=8)
    threads = meta["threads"] if meta["threads"] is not None else "default"
    fig.suptitle(
        f"{Path(meta['bundle']).name}: {meta['num_images']} images, batch {meta['batch']}, ORT CPU "
        f"threads {threads}" + (f", guidance {meta['guidance']}" if meta["guidance"] is not None else ""),
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_open(path) as f:
        f.write(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import onnxruntime

    base = Pipeline.from_bundle(args.bundle, num_threads=args.threads)
    model = base.model
    if args.guidance is not None and not (model.conditional and model.null_class_label is not None):
        sys.exit("--guidance needs a class-conditional bundle trained with label dropout (a null label)")
    labels = np.arange(args.num_images) % model.num_classes if model.conditional else None
    counter = CountingRunner(base.runner)
    quality = DigitsQuality()

    out = Path(args.out)
    meta: dict[str, Any] = {
        "bundle": str(args.bundle),
        "conditional": model.conditional,
        "num_classes": model.num_classes,
        "sample_size": list(model.sample_size),
        "in_channels": model.in_channels,
        "prediction_type": model.prediction_type,
        "num_images": args.num_images,
        "batch": args.batch,
        "seed": args.seed,
        "per_image_seeds": args.per_image_seeds,
        "guidance": args.guidance,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "floor": quality.floor,
        "classifier_test_accuracy": quality.test_accuracy,
        "schedulers": args.schedulers,
        "steps": args.steps,
        "ddpm_steps": args.ddpm_steps,
        "scheduler_config": dict(base.scheduler_config),
        "load_average_start": os.getloadavg()[0],
        "note": args.note,
    }

    # untimed warm-up at the chunk size: session start-up and arena growth are not charged to the first row
    warm = Pipeline(counter, model, base.scheduler_config, scheduler="ddim")
    warm_n = min(args.batch, args.num_images)
    warm(
        num_images=warm_n,
        num_inference_steps=1,
        seed=0,
        guidance_scale=args.guidance,
        class_labels=None if labels is None else labels[:warm_n],
    )

    rows: list[dict[str, Any]] = []
    pipe_shape = (*model.sample_size, model.in_channels)
    strips: list[np.ndarray] = []
    print(
        f"floor {quality.floor:.3f} (real held-out digits); {args.num_images} images per row, batch {args.batch}",
        flush=True,
    )
    for line in table_lines(model.conditional, args.num_images):
        print(line, flush=True)
    for name in args.schedulers:
        pipe = Pipeline(counter, model, base.scheduler_config, scheduler=name, bundle=base.bundle)
        for steps in args.ddpm_steps if name == "ddpm" else args.steps:
            row: dict[str, Any] = {"scheduler": name, "steps": steps}
            try:
                images, seconds, calls = run_row(
                    pipe, args.num_images, steps, args.batch, args.seed, labels, args.guidance, args.per_image_seeds
                )
            except NonFiniteError as e:
                row.update(
                    model_calls=None,
                    wall_s=None,
                    ms_per_image=None,
                    fd=None,
                    fd_ratio=None,
                    error=f"{type(e).__name__}: {e}",
                )
                strips.append(np.zeros((0, *pipe_shape), dtype=np.float32))  # a blank grid row
            else:
                score = quality.score(images, labels)
                row.update(
                    model_calls=calls,
                    wall_s=seconds,
                    ms_per_image=1000 * seconds / args.num_images,
                    fd=score["fd"],
                    fd_ratio=score["ratio"],
                )
                if "class_agreement" in score:
                    row["class_agreement"] = score["class_agreement"]
                strips.append(images[:STRIP])
            rows.append(row)
            print(_fmt_row(row, model.conditional), flush=True)
            write_reports(out, meta, rows)

    meta["load_average_end"] = os.getloadavg()[0]
    write_reports(out, meta, rows)
    plot(out.with_name(out.name + ".png"), meta, rows)
    if strips:
        tiles = np.concatenate([np.pad(s, ((0, STRIP - len(s)), (0, 0), (0, 0), (0, 0))) for s in strips])
        scale = max(1, 32 // max(model.sample_size))
        save_png(
            image_grid(to_uint8(tiles), nrow=STRIP, padding=2, scale=scale), out.with_name(out.name + "_samples.png")
        )
    print(f"wrote {out}.md, {out}.json, {out}.png, {out}_samples.png", flush=True)


if __name__ == "__main__":
    main()
