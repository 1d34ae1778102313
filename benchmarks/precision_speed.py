"""End-to-end DDIM sampling per image, by backend and precision, against diffusers' DDIMPipeline on torch.

    .venv/bin/python benchmarks/precision_speed.py [--models digits,cifar] [--batch digits=1,4,8 --batch cifar=1,8]
        [--threads 1,2] [--steps 50] [--repeats 2] [--warmup-steps 2] [--torch-compile [fp32,bf16]]
        [--cold-repeats 3] [--no-cold-start]
        [--json benchmarks/results/precision_speed.json] [--md benchmarks/results/precision_speed.md]

Smoke run (seconds): ``--models digits --steps 2 --repeats 1 --batch 1 --cold-repeats 1``. The full run takes
about 15-20 minutes on 2 cores; run it on a quiet machine, the timings are minima over ``--repeats``.

Models (random weights, built by ``benchmarks/pipeline_speed.py``'s ``build()``: a diffusers pipeline folder
exported with ``export_bundle``; speed does not depend on the values):
  digits  the small UNet2DModel, 1x8x8, block_out_channels (32, 64)
  cifar   the google/ddpm-cifar10-32 layout, 3x32x32, 35.7M parameters

``--batch`` is ``1,4,8`` (every model) or ``MODEL=1,4,8``, repeatable; default digits 1,4,8 and cifar 1,8.

Rows, for every (model, batch, threads); ``torch.set_num_threads(threads)`` for torch, ``num_threads=threads``
for ours:
  diffusers fp32            DDIMPipeline, eager fp32: the baseline every speedup is measured against (same run,
                            same model, batch and threads)
  diffusers bf16 autocast   the same pipeline with ``unet.to(memory_format=torch.channels_last)``, called under
                            ``torch.autocast("cpu", dtype=torch.bfloat16)``; the sample stays as DDIMPipeline
                            makes it (conv_in's channels_last weight makes every later activation channels_last;
                            converting the sample too measured no faster)
  diffusers ... compiled    with ``--torch-compile``: the row above with ``torch.compile(unet, dynamic=False)``;
                            the compile (minutes) happens in the warm-up and is reported as warmup_s
  ours ORT fp32             ``Pipeline.from_bundle(backend="onnxruntime")``
  ours OpenVINO fp32        ``backend="openvino", precision="fp32"``
  ours OpenVINO bf16        ``backend="openvino", precision="bf16"``; skipped (with the reason) where OpenVINO
                            is missing or the CPU has no bf16
Each row: seconds per image (best call / batch), the speedup over diffusers fp32 and the largest absolute
difference of its images from diffusers fp32's (images on [0, 1]; our Pipeline with seed=0 is the DDIMPipeline
with ``generator=torch.Generator().manual_seed(0)``). "exact" means max|diff| <= 1e-4. Before timing, every
row runs once at ``--warmup-steps`` steps at the same batch size (so OpenVINO's compile for that batch shape
and oneDNN's primitive creation are not timed). The models have random weights and a shrunken output layer
(see ``build()``), so the bf16 rows' image differences say little about bf16 quality on a trained model (a
question for ``deploy_diff.analysis.quality.DigitsQuality`` on the digits model).

Cold start (digits bundle, fresh process each, best of ``--cold-repeats``): ``from deploy_diff.runtime import
Pipeline``, ``Pipeline.from_bundle(...)`` (OpenVINO is imported and the model compiled here), then the first
image, once with 1 step and once with ``--steps`` steps; for ORT fp32, OpenVINO fp32 and bf16 (without and with
a primed ``cache_dir``), and diffusers fp32 for reference. ``seconds`` is timed inside the child from before the
first import; ``process_s`` is the child's whole life timed by the parent (interpreter start included).

Machine caveat: OpenVINO bf16 (and torch's bf16 autocast) is fast only where the CPU computes bf16 natively:
AMX (Intel Sapphire Rapids and later) is far faster than avx512_bf16 (AMD Zen 4, Intel Cooper Lake); without
either, bf16 is emulated or refused. The JSON and markdown record the CPU model, its bf16/AMX flags and
OpenVINO's OPTIMIZATION_CAPABILITIES. Absolute times depend on the machine and its load (the load average at the
start and the end is recorded); ratios within one run are the comparable figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pipeline_speed import MODELS, build  # benchmarks/ is sys.path[0] when run as a script

from deploy_diff.analysis.bench import TimedRunner, diffusers_baseline, image_diff, run_child, time_call
from deploy_diff.runtime import Pipeline
from deploy_diff.runtime._fileio import atomic_write_text
from deploy_diff.runtime.backends.openvino import bf16_supported, openvino_available
from deploy_diff.runtime.bundle import load_bundle

EXACT_TOL = 1e-4  # max |diff| on [0, 1] under which images count as equal (the CLI bench test's bound)
DEFAULT_BATCH = {"digits": [1, 4, 8], "cifar": [1, 8]}
OURS = (  # row id, label, backend, precision
    ("ort-fp32", "ours ORT fp32", "onnxruntime", "fp32"),
    ("ov-fp32", "ours OpenVINO fp32", "openvino", "fp32"),
    ("ov-bf16", "ours OpenVINO bf16", "openvino", "bf16"),
)
COLD = (  # row id, label, backend, precision, with a primed cache_dir
    ("ort-fp32", "ours ORT fp32", "onnxruntime", "fp32", False),
    ("ov-fp32", "ours OpenVINO fp32", "openvino", "fp32", False),
    ("ov-bf16", "ours OpenVINO bf16", "openvino", "bf16", False),
    ("ov-fp32-cache", "ours OpenVINO fp32, cache_dir primed", "openvino", "fp32", True),
    ("ov-bf16-cache", "ours OpenVINO bf16, cache_dir primed", "openvino", "bf16", True),
)


# ----------------------------------------------------------------------------------------------- machine


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "model": model,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
    }


def openvino_info() -> dict[str, Any] | None:
    if not openvino_available():
        return None
    import openvino as ov

    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {"version": ov.get_version(), "cpu_capabilities": caps, "bf16": bf16_supported(core)}


def versions() -> dict[str, str | None]:
    import diffusers
    import onnxruntime

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    try:
        from importlib.metadata import version

        out["openvino"] = version("openvino")
    except Exception:
        out["openvino"] = None
    return out


def machine_info(ov: dict[str, Any] | None) -> dict[str, Any]:
    """The ``machine`` entry of a benchmark's results: CPU, OpenVINO (``ov``: :func:`openvino_info`), versions,
    platform and the load average at the start."""
    return {
        "cpu": cpu_info(),
        "openvino": ov,
        "versions": versions(),
        "platform": platform.platform(),
        "load_start": loadavg(),
    }


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------- torch peers


def torch_peers(bundle, compile_variants: list[str]) -> list[tuple[str, str, str, bool, Any]]:
    """(row id, label, precision, compiled, f) for every torch row; the first is the fp32 baseline."""
    baseline = diffusers_baseline(bundle, "ddim")
    if isinstance(baseline, str):
        raise RuntimeError(baseline)
    peers = [
        ("diffusers-fp32", "diffusers fp32", "fp32", False, baseline),
        ("diffusers-bf16", "diffusers bf16 autocast + channels_last", "bf16", False, None),
    ]
    for variant in compile_variants:
        peers.append(
            (
                f"diffusers-{variant}-compiled",
                f"diffusers {'bf16 autocast + channels_last' if variant == 'bf16' else 'fp32'}, torch.compile",
                variant,
                True,
                None,
            )
        )
    return [
        (rid, label, prec, compiled, f or diffusers_baseline(bundle, "ddim", bf16=prec == "bf16", compiled=compiled))
        for rid, label, prec, compiled, f in peers
    ]


# ----------------------------------------------------------------------------------------------- ours


def open_ours(bundle, backend: str, precision: str, threads: int, ov: dict | None) -> tuple[Any, str | None, float]:
    """(pipeline or None, why it was skipped, load seconds)."""
    if backend == "openvino" and ov is None:
        return None, "openvino is not installed", 0.0
    if backend == "openvino" and precision == "bf16" and not ov["bf16"]:
        return None, f"this CPU has no bf16 for OpenVINO (OPTIMIZATION_CAPABILITIES {ov['cpu_capabilities']})", 0.0
    t0 = time.perf_counter()
    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, precision=precision, scheduler="ddim", num_threads=threads)
    except (ValueError, ImportError) as e:  # an unsupported backend/precision: the runtime says which are
        return None, f"{type(e).__name__}: {e}", 0.0
    load_s = time.perf_counter() - t0
    computed = getattr(pipe.runner, "precision", precision)
    if computed != precision:
        close(pipe)
        return None, f"asked for {precision}, the runner computes {computed}", 0.0
    return pipe, None, load_s


def close(pipe) -> None:
    closer = getattr(pipe.runner, "close", None)
    if closer is not None:
        closer()


def time_ours(pipe, batch: int, steps: int, repeats: int, warmup_steps: int) -> dict[str, Any]:
    """Best of ``repeats`` calls after a ``warmup_steps`` call at the same batch size; the model's share of the
    best call from a :class:`TimedRunner` around the runner (as ``time_pipeline`` does)."""
    timed = TimedRunner(pipe.runner)
    tp = Pipeline(timed, pipe.model, pipe.scheduler_config, scheduler=pipe.scheduler, bundle=pipe.bundle)
    t0 = time.perf_counter()
    tp(num_images=batch, num_inference_steps=warmup_steps, seed=0)
    warmup_s = time.perf_counter() - t0
    model_s: list[float] = []

    def call():
        timed.seconds = 0.0
        out = tp(num_images=batch, num_inference_steps=steps, seed=0)
        model_s.append(timed.seconds)
        return out

    best, runs, images = time_call(call, repeats=repeats, warmup=0)
    return {
        "seconds": best,
        "runs": runs,
        "warmup_s": warmup_s,
        "model_share": model_s[runs.index(best)] / best,
        "images": images,
    }


def time_torch(f, batch: int, steps: int, repeats: int, warmup_steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    f(batch, warmup_steps, 0)
    warmup_s = time.perf_counter() - t0
    best, runs, images = time_call(lambda: f(batch, steps, 0), repeats=repeats, warmup=0)
    return {"seconds": best, "runs": runs, "warmup_s": warmup_s, "images": images}


# ----------------------------------------------------------------------------------------------- cold start


_COLD_OURS = """
import json, sys, time
t0 = time.perf_counter()
from deploy_diff.runtime import Pipeline
t1 = time.perf_counter()
bundle, backend, precision, threads, steps, cache_dir = sys.argv[1:7]
kw = {"cache_dir": cache_dir} if cache_dir else {}
__import__(backend)  # what from_bundle would import first, timed on its own
t1b = time.perf_counter()
pipe = Pipeline.from_bundle(
    bundle, backend=backend, precision=precision, scheduler="ddim", num_threads=int(threads), **kw
)
t2 = time.perf_counter()
pipe(num_images=1, num_inference_steps=int(steps), seed=0)
t3 = time.perf_counter()
print(json.dumps({
    "seconds": t3 - t0, "import_s": t1 - t0, "backend_import_s": t1b - t1, "load_s": t2 - t1b,
    "first_image_s": t3 - t2,
    "peak_rss_bytes": peak_rss(), "torch_imported": "torch" in sys.modules,
    "computed_precision": getattr(pipe.runner, "precision", None),
}))
"""

_COLD_DIFFUSERS = """
import json, sys, time
t0 = time.perf_counter()
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
t1 = time.perf_counter()
folder, threads, steps = sys.argv[1:4]
torch.set_num_threads(int(threads))
unet = UNet2DModel.from_pretrained(folder + "/unet", low_cpu_mem_usage=False).eval()
pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(folder + "/scheduler"))
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
with torch.no_grad():
    pipe(batch_size=1, num_inference_steps=int(steps), generator=torch.Generator().manual_seed(0), output_type="np")
t3 = time.perf_counter()
print(json.dumps({
    "seconds": t3 - t0, "import_s": t1 - t0, "backend_import_s": 0.0, "load_s": t2 - t1,
    "first_image_s": t3 - t2, "peak_rss_bytes": peak_rss(), "torch_imported": True, "computed_precision": "fp32",
}))
"""


def child(code: str, *args: str) -> dict[str, Any]:
    line, process_s = run_child(code, *args)
    out = json.loads(line)
    out["process_s"] = process_s
    return out


def best_child(repeats: int, code: str, *args: str) -> dict[str, Any]:
    runs = [child(code, *args) for _ in range(repeats)]
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["runs"] = [r["seconds"] for r in runs]
    best["process_s"] = min(r["process_s"] for r in runs)
    return best


def cold_starts(
    bundle_dir: Path, folder: Path, steps: int, threads: int, repeats: int, ov: dict | None, tmp: Path
) -> list[dict[str, Any]]:
    rows = []
    step_counts = sorted({1, steps})
    for rid, label, backend, precision, cached in COLD:
        row: dict[str, Any] = {"row": rid, "label": label, "backend": backend, "precision": precision}
        row["cache_dir"] = cached
        skip = None
        if backend == "openvino" and ov is None:
            skip = "openvino is not installed"
        elif backend == "openvino" and precision == "bf16" and not ov["bf16"]:
            skip = "this CPU has no bf16 for OpenVINO"
        if skip:
            rows.append({**row, "skipped": skip})
            print(f"cold start {label}: skipped ({skip})", flush=True)
            continue
        cache = ""
        if cached:
            cache = str(tmp / f"ov-cache-{rid}")
            child(_COLD_OURS, str(bundle_dir), backend, precision, str(threads), "1", cache)  # primes the cache
        try:
            for n in step_counts:
                row[f"steps_{n}"] = best_child(
                    repeats, _COLD_OURS, str(bundle_dir), backend, precision, str(threads), str(n), cache
                )
        except RuntimeError as e:
            rows.append({**row, "skipped": str(e)})
            print(f"cold start {label}: skipped ({e})", flush=True)
            continue
        rows.append(row)
        print_cold(row, step_counts)
    row = {"row": "diffusers-fp32", "label": "diffusers fp32", "backend": "torch", "precision": "fp32"}
    for n in step_counts:
        row[f"steps_{n}"] = best_child(repeats, _COLD_DIFFUSERS, str(folder), str(threads), str(n))
    rows.append(row)
    print_cold(row, step_counts)
    return rows


def print_cold(row: dict[str, Any], step_counts: list[int]) -> None:
    parts = []
    for n in step_counts:
        r = row[f"steps_{n}"]
        parts.append(
            f"{n} step{'s' if n > 1 else ''}: {r['seconds']:.2f} s (import {r['import_s']:.2f} + backend import "
            f"{r['backend_import_s']:.2f} + load {r['load_s']:.2f} + image {r['first_image_s']:.2f}; process "
            f"{r['process_s']:.2f} s)"
        )
    rss = row[f"steps_{step_counts[-1]}"]["peak_rss_bytes"]
    print(f"cold start {row['label']}: " + "; ".join(parts) + f", peak RSS {rss / 2**20:.0f} MiB", flush=True)


# ----------------------------------------------------------------------------------------------- main loop


def run_model(name: str, root: Path, args, batches: list[int], ov: dict | None) -> tuple[list[dict], dict, Path]:
    bundle_dir = build(name, root)
    folder = root / name
    bundle = load_bundle(bundle_dir)
    peers = torch_peers(bundle, args.compile_variants)
    info = {
        "parameters": unet_parameters(folder),
        "sample_shape": [bundle.model.in_channels, *bundle.model.sample_size],
    }
    rows: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        ours = []
        for rid, label, backend, precision in OURS:
            pipe, skip, load_s = open_ours(bundle, backend, precision, threads, ov)
            ours.append((rid, label, backend, precision, pipe, skip, load_s))
        for batch in batches:
            base = dict(model=name, batch=batch, threads=threads, steps=args.steps)
            ref = None
            baseline_s = None
            for rid, label, precision, compiled, f in peers:
                print(f"{name} b{batch} t{threads} {label} ...", end=" ", flush=True)
                t = time_torch(f, batch, args.steps, args.repeats, args.warmup_steps)
                if ref is None:
                    ref, baseline_s = t["images"], t["seconds"]
                row = {
                    **base,
                    "row": rid,
                    "label": label,
                    "side": "diffusers",
                    "backend": "torch",
                    "precision": precision,
                    "computed_precision": "bf16 autocast" if precision == "bf16" else "fp32",
                    "compiled": compiled,
                }
                rows.append(finish(row, t, batch, baseline_s, ref))
            for rid, label, backend, precision, pipe, skip, load_s in ours:
                row = {**base, "row": rid, "label": label, "side": "ours", "backend": backend, "precision": precision}
                row["compiled"] = False
                if pipe is None:
                    rows.append({**row, "skipped": skip})
                    print(f"{name} b{batch} t{threads} {label}: skipped ({skip})", flush=True)
                    continue
                print(f"{name} b{batch} t{threads} {label} ...", end=" ", flush=True)
                t = time_ours(pipe, batch, args.steps, args.repeats, args.warmup_steps)
                row["computed_precision"] = getattr(pipe.runner, "precision", precision)
                row["load_s"] = load_s
                row["model_share"] = t["model_share"]
                rows.append(finish(row, t, batch, baseline_s, ref))
        for *_, pipe, _skip, _load in ours:
            if pipe is not None:
                close(pipe)
    return rows, info, folder


def unet_parameters(folder: Path) -> int:
    from diffusers import UNet2DModel

    return sum(p.numel() for p in UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).parameters())


def finish(row: dict, t: dict, batch: int, baseline_s: float, ref: np.ndarray) -> dict:
    d = image_diff(t["images"], ref)
    diff = d["max_abs"]
    row.update(
        seconds=t["seconds"],
        seconds_per_image=t["seconds"] / batch,
        runs=t["runs"],
        warmup_s=t["warmup_s"],
        speedup=baseline_s / t["seconds"],
        max_abs_diff=diff,
        mean_abs_diff=d["mean_abs"],
        psnr_db=None if math.isinf(d["psnr_db"]) else d["psnr_db"],  # None: equal images
        exact=diff <= EXACT_TOL,
    )
    print(
        f"{row['seconds_per_image']:.4f} s/image, {row['speedup']:.2f}x, max|diff| {diff:.1e} "
        f"(warm-up {row['warmup_s']:.1f} s)",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------------------------- targets


def targets(rows: list[dict], cold: list[dict] | None, steps: int) -> list[dict]:
    def find(model, batch, threads, rid):
        for r in rows:
            if (r["model"], r["batch"], r["threads"], r["row"]) == (model, batch, threads, rid) and "skipped" not in r:
                return r
        return None

    def best_exact(model, batch, threads):
        cands = [
            r
            for r in rows
            if (r["model"], r["batch"], r["threads"]) == (model, batch, threads)
            and r["side"] == "ours"
            and r["precision"] == "fp32"
            and r.get("exact")
        ]
        return max(cands, key=lambda r: r["speedup"]) if cands else None

    out = []

    def add(name, row, value, threshold, upper=False, note=""):
        if row is None:
            out.append({"target": name, "measured": False, "note": note or "not in this run"})
            return
        met = value < threshold if upper else value >= threshold
        out.append({"target": name, "measured": True, "row": row, "value": value, "threshold": threshold, "met": met})

    for model, batch, threads, threshold in (("digits", 4, 1, 2.8), ("cifar", 1, 1, 1.5), ("cifar", 1, 2, 1.5)):
        r = best_exact(model, batch, threads)
        add(
            f"best exact backend vs diffusers fp32, {model} batch {batch}, {threads} thread{'s' * (threads > 1)}",
            r and r["label"],
            r and r["speedup"],
            threshold,
        )
    r = find("cifar", 8, 2, "ov-bf16")
    add("OpenVINO bf16 vs diffusers fp32, cifar batch 8, 2 threads", r and r["label"], r and r["speedup"], 3.5)
    peer = find("cifar", 8, 2, "diffusers-bf16")
    add(
        "OpenVINO bf16 vs diffusers bf16 autocast + channels_last, cifar batch 8, 2 threads",
        r and peer and r["label"],
        r and peer and peer["seconds"] / r["seconds"],
        1.4,
    )
    for c in cold or []:
        if c["backend"] == "openvino" and "skipped" not in c:
            add(
                f"cold start {c['label']}, digits (import + load + first {steps}-step image) under 1 s",
                c["label"],
                c[f"steps_{steps}"]["seconds"],
                1.0,
                upper=True,
            )
    return out


# ----------------------------------------------------------------------------------------------- reports


def fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    ov = m["openvino"]
    lines = [
        "# Precision and backend speed: DDIM end to end against diffusers",
        "",
        f"Written by `benchmarks/precision_speed.py` on {result['created']}. {s['steps']} DDIM steps, best of "
        f"{s['repeats']} calls after a {s['warmup_steps']}-step warm-up at the same batch size; seed 0 on both "
        "sides. Speedup: diffusers eager fp32's seconds over the row's, same model, batch and threads, same run. "
        f"max diff: the largest |difference| of the row's images from diffusers fp32's on [0, 1]; exact means "
        f"<= {EXACT_TOL:g}.",
        "",
        f"CPU: {m['cpu']['model']}, {m['cpu']['cpus']} CPUs, avx512_bf16 {m['cpu']['avx512_bf16']}, AMX "
        f"{m['cpu']['amx_bf16']}. OpenVINO "
        + (f"{ov['version']}, CPU capabilities {', '.join(ov['cpu_capabilities'])}" if ov else "not installed")
        + ". "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "python")
        + f", Python {m['versions']['python']}, {m['platform']}. 1-minute load average {fmt(m['load_start'])} at the "
        f"start, {fmt(m['load_end'])} at the end. bf16 speed depends on the CPU: AMX is much faster than avx512_bf16.",
        "",
        "| model | batch | threads | row | s/image | speedup | max diff | exact | computes | model % | warm-up s |",
        "|---|---:|---:|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['batch']} | {r['threads']} | {r['label']} |"
        if "skipped" in r:
            lines.append(head + f" skipped: {r['skipped']} | | | | | | |")
            continue
        share = f"{100 * r['model_share']:.0f}" if "model_share" in r else ""
        lines.append(
            head + f" {r['seconds_per_image']:.4f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} | "
            f"{'yes' if r['exact'] else 'no'} | {r['computed_precision']} | {share} | {r['warmup_s']:.1f} |"
        )
    cold = result.get("cold_start")
    if cold:
        steps = sorted({1, s["steps"]})
        lines += [
            "",
            f"## Cold start, {cold['model']} bundle, {cold['threads']} thread(s), best of {cold['repeats']} fresh "
            "processes",
            "",
            "seconds: from before `from deploy_diff.runtime import Pipeline` (diffusers: `import torch`) to the end "
            "of the first image, timed in the child: that import, then `import onnxruntime` / `import openvino` "
            "(which `from_bundle` would do), `Pipeline.from_bundle` (bundle check, graph load and compile), the "
            "image. process: the child's whole life timed by the parent (interpreter start included).",
            "",
            "| row | "
            + " | ".join(
                f"{n} step{'s' * (n > 1)}: s (import + backend import + load + image) | process s" for n in steps
            )
            + " | peak RSS MiB |",
            "|---|" + "---:|---:|" * len(steps) + "---:|",
        ]
        for c in cold["rows"]:
            if "skipped" in c:
                lines.append(f"| {c['label']} | skipped: {c['skipped']} |" + " |" * (2 * len(steps)))
                continue
            cells = []
            for n in steps:
                x = c[f"steps_{n}"]
                cells.append(
                    f"{x['seconds']:.2f} ({x['import_s']:.2f} + {x['backend_import_s']:.2f} + {x['load_s']:.2f} + "
                    f"{x['first_image_s']:.2f}) | "
                    f"{x['process_s']:.2f}"
                )
            rss = c[f"steps_{steps[-1]}"]["peak_rss_bytes"]
            lines.append(f"| {c['label']} | " + " | ".join(cells) + f" | {rss / 2**20:.0f} |")
    lines += [
        "",
        "## Targets (issue 11)",
        "",
        "| target | row | measured | threshold | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        if not t["measured"]:
            lines.append(f"| {t['target']} | | {t['note']} | | |")
            continue
        unit = " s" if t["target"].startswith("cold") else "x"
        bound = "<" if t["target"].startswith("cold") else ">="
        lines.append(
            f"| {t['target']} | {t['row']} | {t['value']:.2f}{unit} | {bound} {t['threshold']:g}{unit} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<7} {'batch':>5} {'thr':>3}  {'row':<56} {'s/image':>9} {'speedup':>8} {'max|diff|':>9}")
    for r in rows:
        head = f"{r['model']:<7} {r['batch']:>5} {r['threads']:>3}  {r['label']:<56}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
        else:
            print(f"{head} {r['seconds_per_image']:>9.4f} {r['speedup']:>7.2f}x {r['max_abs_diff']:>9.1e}")


# ----------------------------------------------------------------------------------------------- arguments


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive ints, got {text!r}")
    return values


def parse_batches(specs: list[str] | None, models: list[str]) -> dict[str, list[int]]:
    out = {m: list(DEFAULT_BATCH.get(m, [1, 8])) for m in models}
    for spec in specs or []:
        if "=" in spec:
            model, _, values = spec.partition("=")
            if model not in models:
                raise SystemExit(f"--batch {spec}: {model!r} is not one of --models {models}")
            out[model] = int_list(values)
        else:
            out = {m: int_list(spec) for m in models}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,cifar", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument(
        "--batch",
        action="append",
        help="1,4,8 for every model or MODEL=1,4,8 (repeatable); default "
        + " ".join(f"{m}={','.join(map(str, b))}" for m, b in DEFAULT_BATCH.items()),
    )
    parser.add_argument("--threads", type=int_list, default=[1, 2], help="thread counts, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed call before each row")
    parser.add_argument(
        "--torch-compile",
        nargs="?",
        const="fp32,bf16",
        default="",
        help="also time torch.compile'd diffusers (fp32 and/or bf16: the peers compiled; takes minutes)",
    )
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh processes per cold-start figure")
    parser.add_argument("--cold-threads", type=int, default=1)
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--json", help="write the results here (e.g. benchmarks/results/precision_speed.json)")
    parser.add_argument("--md", help="write a markdown table here (e.g. benchmarks/results/precision_speed.md)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected some of {sorted(MODELS)}")
    args.compile_variants = [v for v in args.torch_compile.split(",") if v]
    if any(v not in ("fp32", "bf16") for v in args.compile_variants):
        parser.error(f"--torch-compile takes fp32 and/or bf16, got {args.torch_compile!r}")
    if args.steps < 1 or args.repeats < 1 or args.warmup_steps < 1 or args.cold_repeats < 1:
        parser.error("--steps, --repeats, --warmup-steps and --cold-repeats must be >= 1")
    batches = parse_batches(args.batch, models)
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    ov = openvino_info()
    result: dict[str, Any] = {
        "script": "benchmarks/precision_speed.py",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(ov),
        "settings": {
            "models": models,
            "batches": batches,
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "torch_compile": args.compile_variants,
            "scheduler": "ddim",
            "seed": 0,
            "exact_tolerance": EXACT_TOL,
        },
        "models": {},
        "rows": [],
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {}
        for name in models:
            rows, info, folders[name] = run_model(name, root, args, batches[name], ov)
            result["models"][name] = info
            result["rows"] += rows
        cold = None
        if not args.no_cold_start:
            if "digits" not in folders:
                build("digits", root)
            cold = cold_starts(
                root / "digits-bundle", root / "digits", args.steps, args.cold_threads, args.cold_repeats, ov, root
            )
            result["cold_start"] = {
                "model": "digits",
                "threads": args.cold_threads,
                "repeats": args.cold_repeats,
                "rows": cold,
            }
    result["machine"]["load_end"] = loadavg()
    result["total_s"] = time.perf_counter() - t_start
    result["targets"] = targets(result["rows"], cold, args.steps)
    print_table(result["rows"])
    print()
    for t in result["targets"]:
        if t["measured"]:
            print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['row']} {t['value']:.2f} ({t['threshold']:g})")
        else:
            print(f"---- {t['target']}: {t['note']}")
    print(f"total {result['total_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.md, markdown(result))


if __name__ == "__main__":
    main()
