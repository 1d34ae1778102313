"""Sampling benchmarks: our runtime against the diffusers pipeline on torch, measured in the same run.

Used by ``deploy-diff bench BUNDLE`` and ``benchmarks/pipeline_speed.py``. The runtime side never needs torch;
the baseline imports torch and diffusers lazily. Timings are the minimum over repeats (the least disturbed run
on a shared machine), after one warm-up call.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TimedRunner",
    "Timing",
    "cold_start",
    "diffusers_baseline",
    "dumps",
    "image_diff",
    "run_child",
    "sample_for_quality",
    "time_call",
    "time_pipeline",
]

BASELINE_SCHEDULERS = ("ddim", "ddpm")  # the schedulers that have a diffusers pipeline of their own


@dataclass
class Timing:
    seconds: float  # best wall time of one call
    model_seconds: float = float("nan")  # of which inside the runner
    runs: list[float] = field(default_factory=list)

    @property
    def other_seconds(self) -> float:
        return self.seconds - self.model_seconds


class TimedRunner:
    """Wraps a runner and adds up the time spent inside it."""

    def __init__(self, runner: Callable[..., np.ndarray]):
        self.runner = runner
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, sample, timestep, class_labels=None):
        t0 = time.perf_counter()
        try:
            return self.runner(sample, timestep, class_labels)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float], Any]:
    for _ in range(warmup):
        out = fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), runs, out


def time_pipeline(pipe, num_images: int, steps: int, repeats: int = 3, seed: int = 0, **kwargs) -> tuple[Timing, Any]:
    """Time ``pipe(num_images, steps, seed)``; split the best run into model time and everything else."""
    from ..runtime.pipeline import Pipeline

    timed = TimedRunner(pipe.runner)
    tp = Pipeline(timed, pipe.model, pipe.scheduler_config, scheduler=pipe.scheduler, bundle=pipe.bundle)
    best, model_at_best, runs, out = float("inf"), float("nan"), [], None
    tp(num_images=num_images, num_inference_steps=steps, seed=seed, **kwargs)  # warm-up
    for _ in range(repeats):
        timed.seconds = 0.0
        t0 = time.perf_counter()
        out = tp(num_images=num_images, num_inference_steps=steps, seed=seed, **kwargs)
        elapsed = time.perf_counter() - t0
        runs.append(elapsed)
        if elapsed < best:
            best, model_at_best = elapsed, timed.seconds
    return Timing(best, model_at_best, runs), out


def _diffusers_unet_folder(source: dict[str, Any]) -> Path | None:
    path = Path(source.get("path", ""))
    if source.get("kind") != "diffusers" or not path.is_dir():
        return None
    return path / "unet" if (path / "model_index.json").is_file() else path


def diffusers_baseline(bundle, scheduler: str, threads: int | None = None, bf16: bool = False, compiled: bool = False):
    """A callable ``f(num_images, steps, seed) -> images`` running the diffusers pipeline on torch for the
    UNet the bundle was exported from, or a string saying why there is none.

    Eager fp32 by default (the baseline); ``bf16=True``: the UNet in channels_last, called under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``; ``compiled=True``: the UNet wrapped in
    ``torch.compile(dynamic=False)`` (the compile happens at the first call)."""
    source = bundle.manifest["model"].get("source") or {}
    unet_dir = _diffusers_unet_folder(source)
    if unet_dir is None:
        return "no diffusers baseline: the bundle was not exported from a diffusers folder that still exists"
    if scheduler not in BASELINE_SCHEDULERS:
        return f"no diffusers baseline for {scheduler!r}: diffusers has pipelines for {BASELINE_SCHEDULERS} only"
    if bundle.model.conditional:
        return "no diffusers baseline: diffusers' DDPM/DDIM pipelines are unconditional"
    try:
        import torch
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError:
        return "no diffusers baseline: torch and diffusers are not installed (pip install 'deploy-diff[diffusers]')"
    if threads:
        torch.set_num_threads(threads)
    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
    if bf16:
        unet = unet.to(memory_format=torch.channels_last)
    config = bundle.scheduler_config()
    if scheduler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config))
    if compiled:
        pipe.unet = torch.compile(unet, dynamic=False)
    pipe.set_progress_bar_config(disable=True)

    def run(num_images: int, steps: int, seed: int = 0) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return pipe(
                batch_size=num_images,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            ).images

    return run


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report its
# (large) parent's peak; VmHWM belongs to the new address space.
PEAK_RSS_SOURCE = """
def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

_COLD_OURS = """
import sys, time
t0 = time.perf_counter()
from deploy_diff.runtime import Pipeline
pipe = Pipeline.from_bundle(
    sys.argv[1], scheduler="ddim", num_threads={threads}, backend=sys.argv[2], precision=sys.argv[3]
)
pipe(num_images=1, num_inference_steps=1, seed=0, class_labels=0 if pipe.model.conditional else None)
elapsed = time.perf_counter() - t0
print(elapsed, peak_rss(), "torch" in sys.modules, type(pipe.runner).__name__, getattr(pipe.runner, "precision", "-"))
"""

_COLD_DIFFUSERS = """
import sys, time
t0 = time.perf_counter()
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
{threads_line}
unet = UNet2DModel.from_pretrained(sys.argv[1], low_cpu_mem_usage=False).eval()
pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(sys.argv[2]))
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    pipe(batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
elapsed = time.perf_counter() - t0
print(elapsed, peak_rss(), True)
"""


def run_child(code: str, *args: str) -> tuple[str, float]:
    """Run ``code`` (which may call ``peak_rss()``) in a fresh Python with ``args``; its last line of output and the
    process's whole wall time in seconds (interpreter start included). ``RuntimeError`` if it fails."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SOURCE + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip().splitlines()[-1], process_s


def _child(code: str, *args: str) -> dict[str, Any]:
    seconds, rss, torch_loaded, *runner = run_child(code, *args)[0].split()
    out = {"seconds": float(seconds), "peak_rss_bytes": int(rss), "torch_imported": torch_loaded == "True"}
    if runner:  # ours: which runner ran, and the precision it computes in
        out["runner"], out["runner_precision"] = runner
    return out


def cold_start(
    bundle,
    repeats: int = 3,
    threads: int | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    baseline: bool = True,
) -> dict[str, Any]:
    """Fresh process: import + load + one sampling step, and its peak RSS; ours (``backend`` at ``precision``)
    and, with ``baseline`` when the bundle came from a diffusers folder, diffusers' (fp32 on torch). Best of
    ``repeats`` fresh processes."""
    out: dict[str, Any] = {"backend": backend, "precision": precision, "threads": threads}
    code = _COLD_OURS.replace("{threads}", str(threads))
    runs = [_child(code, str(bundle.path), backend, precision) for _ in range(repeats)]
    out["ours"] = min(runs, key=lambda r: r["seconds"])
    out["ours"]["peak_rss_bytes"] = min(r["peak_rss_bytes"] for r in runs)
    unet_dir = _diffusers_unet_folder(bundle.manifest["model"].get("source") or {})
    if baseline and unet_dir is not None and not bundle.model.conditional:
        sched_dir = unet_dir.parent / "scheduler" if (unet_dir.parent / "scheduler").is_dir() else bundle.path
        code = _COLD_DIFFUSERS.replace("{threads_line}", f"torch.set_num_threads({threads})" if threads else "")
        try:
            runs = [_child(code, str(unet_dir), str(sched_dir)) for _ in range(repeats)]
        except RuntimeError as e:
            out["diffusers_error"] = str(e)
        else:
            out["diffusers"] = min(runs, key=lambda r: r["seconds"])
            out["diffusers"]["peak_rss_bytes"] = min(r["peak_rss_bytes"] for r in runs)
            out.update(against_cold_baseline(out["ours"], out["diffusers"]))
    return out


def against_cold_baseline(ours: dict[str, Any], diffusers: dict[str, Any]) -> dict[str, float]:
    """``speedup`` (diffusers' cold-start seconds / ours) and ``rss_ratio`` (their peak RSS / ours)."""
    return {
        "speedup": diffusers["seconds"] / ours["seconds"],
        "rss_ratio": diffusers["peak_rss_bytes"] / ours["peak_rss_bytes"],
    }


def image_diff(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far ``images`` are from ``reference`` (float images in [0, 1], the same shape): ``max_abs``,
    ``mean_abs`` and ``psnr_db`` (peak 1.0; ``inf`` when they are equal)."""
    a = np.asarray(images, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of shape {a.shape} cannot be compared with a reference of shape {b.shape}")
    d = np.abs(a - b)
    mse = float(np.mean(d**2))
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "psnr_db": math.inf if mse == 0 else float(-10 * math.log10(mse)),
    }


def sample_for_quality(pipe, num_images: int, steps: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """``num_images`` images from ``pipe`` for a quality score: image ``i`` has seed ``i`` (its own generator, so
    it does not depend on the chunking) and, for a class-conditional model, class ``i % num_classes``. Sampled in
    calls of at most ``chunk`` images. Returns the images and the labels (None for an unconditional model)."""
    if num_images < 1 or chunk < 1:
        raise ValueError(f"num_images and chunk must be >= 1; got {num_images} and {chunk}")
    m = pipe.model
    labels = np.arange(num_images) % m.num_classes if m.conditional else None
    parts = []
    for start in range(0, num_images, chunk):
        ids = list(range(start, min(num_images, start + chunk)))
        kw = {"class_labels": labels[ids]} if labels is not None else {}
        parts.append(pipe(num_images=len(ids), num_inference_steps=steps, seed=ids, **kw))
    return np.concatenate(parts), labels


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Indented JSON that any parser reads: ``inf`` and ``nan`` (e.g. the PSNR of equal images) become ``null``."""
    return json.dumps(
        _finite_or_none(obj),
        indent=2,
        allow_nan=False,
        default=lambda o: _finite_or_none(o.__dict__) if hasattr(o, "__dict__") else str(o),
    )
