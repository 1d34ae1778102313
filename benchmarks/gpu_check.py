"""GPU check: a static-batch fp16 bundle on ONNX Runtime's CUDA provider against torch, on one GPU machine.

Builds the CIFAR-size diffusers UNet2DModel, exports it with ``export_bundle(..., fp16=True, static_batch=B)`` for
each batch B, times one UNet call in every variant (``benchmarks/gpu_latency.py``), samples end to end with
``Pipeline.from_bundle(..., device="cuda", precision="fp16", cuda_graph=True)`` beside diffusers' DDIMPipeline,
and writes OUT/gpu_check.json and OUT/gpu_check.md after every stage (``benchmarks/gpu_report.py``).

    python benchmarks/gpu_check.py --out DIR [--quick] [--batches 1,64] [--steps 50] [--budget-s 285]
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --out DIR --cpu-smoke    # tiny model, CPU provider only

docs/gpu.md says what each stage and variant measures, what the machine needs (onnxruntime-gpu, diffusers,
onnxconverter-common; ``benchmarks/prepare_ort_gpu.sh`` prepares them for a machine without network access) and
how to run it there. ``--cpu-smoke`` runs the whole control flow on a CPU-only machine with a tiny model; the
CUDA-only variants are skipped with a recorded reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import gc
import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python3 benchmarks/gpu_check.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from _unet_layouts import CIFAR, DIGITS  # noqa: E402
from gpu_latency import BatchCheck  # noqa: E402  (benchmarks/ is sys.path[0])
from gpu_report import Report, elapsed, log, setup_onnxruntime, setup_torch  # noqa: E402

from deploy_diff.analysis.bench import time_call, time_pipeline  # noqa: E402

TINY = dict(DIGITS, in_channels=3, out_channels=3)  # the --cpu-smoke model: the digits layout, 3 channels


# ---------------------------------------------------------------------------------------------------------------
# model and export


def build_model(rep: Report, root: Path, smoke: bool, no_diffusers: bool) -> Any:
    """A diffusers UNet2DModel saved as a DDPMPipeline folder, loaded back as an ExportSource; without diffusers,
    deploy-diff's own UNet of a similar size (recorded)."""
    import torch

    cfg = TINY if smoke else CIFAR
    model = rep.data["model"]
    model["config_name"] = "tiny (cpu-smoke)" if smoke else "CIFAR (google/ddpm-cifar10-32 layout)"
    try:
        if no_diffusers:
            raise ImportError("--no-diffusers given")
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError as e:
        rep.note(f"diffusers unavailable ({e}); using deploy-diff's own UNet of a similar layout instead")
        return _fallback_source(rep, smoke)
    from deploy_diff.export import load_diffusers_source

    torch.manual_seed(0)
    unet = UNet2DModel(**cfg).eval()
    with torch.no_grad():  # a trained denoiser's output is small and smooth; keeps DDIM's trajectory well-posed
        unet.conv_out.weight.mul_(0.02)
        unet.conv_out.bias.mul_(0.02)
    params = sum(p.numel() for p in unet.parameters())
    folder = root / "pipeline"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    src = load_diffusers_source(folder)
    model.update(
        kind="diffusers UNet2DModel",
        config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        parameters=params,
        parameters_m=round(params / 1e6, 2),
        folder=str(folder),
        note="torch.manual_seed(0); conv_out weight and bias scaled by 0.02 (as benchmarks/pipeline_speed.py)",
    )
    log(f"model: UNet2DModel {params / 1e6:.2f}M parameters, saved to {folder}")
    return src


def _fallback_source(rep: Report, smoke: bool) -> Any:
    import torch
    from torch import nn

    from deploy_diff.export import ExportSource
    from deploy_diff.runtime.schedulers import DDPMScheduler
    from deploy_diff.train.unet import UNet, UNetConfig

    if smoke:
        cfg = UNetConfig(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            base_channels=32,
            channel_mult=(1, 2),
            layers_per_block=1,
            attention_resolutions=(4,),
        )
    else:
        cfg = UNetConfig(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            base_channels=128,
            channel_mult=(1, 2, 2, 2),
            layers_per_block=2,
            attention_resolutions=(16,),
        )
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():  # conv_out starts at zero: give it small random weights so outputs are not trivial
        unet.conv_out.weight.normal_(0, 0.02)
        unet.conv_out.bias.normal_(0, 0.02)

    class Wrapped(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.unet = net

        def forward(self, sample, timestep, class_labels=None):
            if sample.dtype != torch.float16:
                return self.unet(sample, timestep)
            # this UNet's timestep embedding is float32 by design: run the half model under autocast
            with torch.autocast(sample.device.type, dtype=torch.float16):
                return self.unet(sample, timestep)

    params = sum(p.numel() for p in unet.parameters())
    rep.data["model"].update(
        kind="deploy-diff UNet (fallback: no diffusers)",
        config=cfg.to_dict(),
        parameters=params,
        parameters_m=round(params / 1e6, 2),
    )
    return ExportSource(
        module=Wrapped(unet).eval(),
        sample_size=(cfg.sample_size, cfg.sample_size),
        in_channels=3,
        out_channels=3,
        num_classes=0,
        null_class_label=None,
        prediction_type="epsilon",
        scheduler_config=dict(DDPMScheduler().config, _class_name="DDPMScheduler"),
        source={"kind": "gpu_check fallback"},
    )


def export_one(rep: Report, src: Any, root: Path, batch: int) -> Path:
    from deploy_diff.export import export_bundle

    out = root / f"bundle-b{batch}"
    rec: dict[str, Any] = {"batch": batch, "bundle": str(out)}
    rep.data["export"].append(rec)

    def export():
        return export_bundle(src, out, fp16=True, static_batch=batch, log=lambda m: log(f"  export b{batch}: {m}"))

    try:
        wall_s, _, manifest = time_call(export, repeats=1, warmup=0)
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        raise
    exp = manifest["export"]
    rec.update(
        wall_s=round(wall_s, 2),
        seconds=exp.get("seconds"),
        validation=exp.get("validation"),
        optimization=exp.get("optimization"),
        onnxruntime_version=exp.get("onnxruntime_version"),
        opset=exp.get("opset"),
        files={k: v.get("bytes") for k, v in manifest.get("files", {}).items()},
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# end to end


def end_to_end(rep: Report, args: argparse.Namespace, torch: Any, batch: int, bundle: Path | None, cuda: bool) -> None:
    """DDIM for ``args.steps`` steps at ``batch`` images: our Pipeline (timed by the library's ``time_pipeline``,
    which also splits off the time inside the UNet runner), then diffusers' DDIMPipeline on the same device."""
    precision = "fp16" if cuda else "fp32"
    steps = args.steps
    images: dict[str, np.ndarray] = {}
    dev = "cuda" if cuda else "cpu"

    def ours():
        from deploy_diff.runtime import Pipeline

        row = {
            "pipeline": f"deploy-diff Pipeline (ORT {'CUDA fp16, IO binding + CUDA graph' if cuda else 'CPU'})",
            "batch": batch,
            "steps": steps,
            "precision": precision,
            "scheduler": "ddim",
        }
        rep.data["end_to_end"].append(row)
        if bundle is None:
            row["skipped"] = "no bundle"
            raise RuntimeError("no bundle (the export failed or was skipped)")
        load_s, _, pipe = time_call(
            lambda: Pipeline.from_bundle(bundle, device=dev, precision=precision, cuda_graph=cuda, scheduler="ddim"),
            repeats=1,
            warmup=0,
        )
        row["load_s"] = round(load_s, 3)
        row["providers"] = pipe.runner.session.get_providers()  # its loader refused a CPU fallback on CUDA
        # the warm-up call inside time_pipeline captures the CUDA graph; the timed calls replay it
        timing, out = time_pipeline(pipe, num_images=batch, steps=steps, repeats=args.e2e_repeats, seed=0)
        images["ours"] = out
        row.update(
            best_s=timing.seconds,
            median_s=float(np.median(timing.runs)),
            runs_s=timing.runs,
            model_s=timing.model_seconds,
            ms_per_step=1e3 * timing.seconds / steps,
            finite=bool(np.isfinite(out).all()),
        )
        log(f"  ours b{batch}: {row['best_s']:.3f} s for {steps} steps ({row['ms_per_step']:.2f} ms/step)")

    def theirs():
        row: dict[str, Any] = {
            "pipeline": f"diffusers DDIMPipeline (torch {dev} {precision})",
            "batch": batch,
            "steps": steps,
            "precision": precision,
            "scheduler": "ddim",
        }
        rep.data["end_to_end"].append(row)
        folder = rep.data["model"].get("folder")
        if not folder:
            row["skipped"] = "the model is not a diffusers pipeline (diffusers unavailable)"
            raise RuntimeError(row["skipped"])
        from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

        dtype = torch.float16 if precision == "fp16" else torch.float32
        unet = UNet2DModel.from_pretrained(Path(folder) / "unet", torch_dtype=dtype).to(dev).eval()
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(Path(folder) / "scheduler"))
        pipe.set_progress_bar_config(disable=True)

        def call(n):
            out = pipe(
                batch_size=batch, num_inference_steps=n, generator=torch.Generator().manual_seed(0), output_type="np"
            )
            if cuda:
                torch.cuda.synchronize()
            return out.images

        call(2)
        best, runs, out = time_call(lambda: call(steps), repeats=args.e2e_repeats, warmup=0)
        images["diffusers"] = np.asarray(out, dtype=np.float32)
        row.update(
            best_s=best,
            median_s=float(np.median(runs)),
            runs_s=runs,
            ms_per_step=1e3 * best / steps,
            note="cudnn.benchmark on, TF32 off; diffusers draws its latents in the UNet's dtype (fp16), ours "
            "in float32, so the images may differ by more than the model error"
            if cuda
            else "",
        )
        if "ours" in images:
            diff = float(np.abs(images["ours"] - images["diffusers"]).max())
            row["max_abs_diff_vs_ours"] = diff
            for r in rep.data["end_to_end"]:
                if r["batch"] == batch and r["pipeline"].startswith("deploy-diff"):
                    r["max_abs_diff_vs_diffusers"] = diff
        log(f"  diffusers b{batch}: {row['best_s']:.3f} s for {steps} steps ({row['ms_per_step']:.2f} ms/step)")

    rep.stage(f"b{batch}:e2e_ours", ours, budget_s=args.budget_s, reserve_s=10)
    rep.stage(f"b{batch}:e2e_diffusers", theirs, budget_s=args.budget_s, reserve_s=10)
    gc.collect()
    if cuda:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--quick", action="store_true", help="fewer timed calls, fewer variants")
    p.add_argument("--batches", default=None, help="comma-separated static batch sizes (default 1,64; smoke 1,4)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU provider: tests the control flow")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps end to end (default 50; smoke 5)")
    p.add_argument("--budget-s", type=float, default=None, help="skip stages that would start past this (s)")
    p.add_argument("--work", default=None, help="folder for the pipeline and bundles (default: a temp folder)")
    p.add_argument("--no-diffusers", action="store_true", help=argparse.SUPPRESS)  # tests the fallback model
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.batches = args.batches or ("1,4" if smoke else "1,64")
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers; got {args.batches!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--batches must be positive integers; got {args.batches!r}")
    args.steps = args.steps or (5 if smoke else 50)
    args.budget_s = args.budget_s or (900.0 if smoke else 285.0)
    args.warmup, args.iters = (1, 3) if smoke else (5, 20) if args.quick else (10, 50)
    args.e2e_repeats = 1 if smoke else 2 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke, batches = args.cpu_smoke, args.batch_sizes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)

    faulthandler.enable()
    faulthandler.dump_traceback_later(args.budget_s + 120, exit=True)  # a hang dumps stacks instead of timing out
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    rep = Report(out, args)
    rep.data["env"]["mode"] = "cpu-smoke" if smoke else "gpu"
    rep.data["env"]["timing"] = {
        "warmup": args.warmup,
        "iters": args.iters,
        "e2e_repeats": args.e2e_repeats,
        "clock": "deploy_diff.analysis.bench.time_call (time.perf_counter around each call),"
        " torch.cuda.synchronize after torch calls; ORT calls return after the run "
        "(runner: host arrays)",
    }
    log(
        f"mode {'cpu-smoke' if smoke else 'gpu'}{' quick' if args.quick else ''}; batches {batches}; work {work}; "
        f"out {out}; budget {args.budget_s:.0f} s"
    )
    rep.save()

    # torch first, so its CUDA libraries are the ones in the process; then preload_dlls() before any session
    # (whatever it loads by name then resolves to torch's copies rather than to another CUDA on the library path)
    torch = rep.stage("torch", setup_torch, rep, not smoke)
    rep.stage("onnxruntime", setup_onnxruntime, rep)
    if torch is None:
        rep.note("torch is unusable; nothing else can run")
        rep.save()
        return 1
    cuda = not smoke and torch.cuda.is_available()
    src = rep.stage("build_model", build_model, rep, work, smoke, args.no_diffusers)
    if src is None:
        rep.save()
        return 1

    models: dict[str, Any] = {}

    def torch_models():
        dev = "cuda" if cuda else "cpu"
        models["fp32"] = copy.deepcopy(src.module).to(dev).eval()
        models["fp16"] = copy.deepcopy(src.module).to(dev).half().eval()

    rep.stage("torch_models", torch_models)

    for i, batch in enumerate(batches):
        bundle = rep.stage(
            f"b{batch}:export",
            export_one,
            rep,
            src,
            work,
            batch,
            budget_s=args.budget_s,
            reserve_s=30 if not smoke else 0,
        )
        if models:
            check = BatchCheck(rep, args, torch, src, batch, bundle, cuda, models)
            check.reserve_later_s = 0.0 if smoke else 100.0 * (len(batches) - 1 - i)
            try:
                check.run_all()
            finally:
                check.close()
        else:
            rep.skip(f"b{batch}:latency", "the torch models could not be built")
        end_to_end(rep, args, torch, batch, bundle, cuda)

    def ort_debug_info():
        import onnxruntime as ort

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ort.print_debug_info()  # packages, and the CUDA / cuDNN libraries loaded in this process
        rep.data["env"]["ort_debug_info"] = buf.getvalue().splitlines()

    rep.stage("ort_debug_info", ort_debug_info)
    failed = [s["stage"] for s in rep.data["stages"] if not s.get("ok")]
    rep.data["summary"] = {"stages": len(rep.data["stages"]), "failed_or_skipped": failed}
    rep.save()
    faulthandler.cancel_dump_traceback_later()
    log(f"done in {elapsed():.1f} s; {len(failed)} stage(s) failed or skipped: {failed}")
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
