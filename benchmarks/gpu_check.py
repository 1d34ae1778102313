"""GPU check: a static-batch fp16 bundle on ONNX Runtime's CUDA provider against torch, on one lent GPU machine.

How to run it on a lent GPU machine (the `device` tool; ../shared/device/README.md). Here, once, in the repo root:

    ../shared/device/prepare-ort-gpu.sh            # onnxruntime-gpu 1.31.1 (CUDA 13) in five parts .ortgpu0..4
    grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        diffusers==0.42.1 importlib_metadata==8.7.1 onnxconverter-common==1.16.0
    du -sm .ortgpu* .whl                           # each call carries < 64 MiB with the working tree

(importlib_metadata 8.7.1, not 10.x: 10.x also needs lazy-importer. onnxconverter-common is the fp16 converter
the exporter imports; the machine has onnx, onnxscript, torch, safetensors, huggingface-hub already.)
Then six `run` calls back to back (the machine goes back after 30 idle seconds). The wheels travel alone first:
one ~49 MiB ORT part plus the ~6 MiB wheels plus the working tree would come too close to the 64 MiB limit.

    1. carry [".whl"], timeout_s 300:
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/whlsite .whl/*.whl
       && nvidia-smi -L
    2. carry [".ortgpu0"]: cat .ortgpu0/part > /root/ort.part && cp .ortgpu0/name /root/ort.name
    3. carry [".ortgpu1"]: cat .ortgpu1/part >> /root/ort.part
    4. carry [".ortgpu2"]: cat .ortgpu2/part >> /root/ort.part
    5. carry [".ortgpu3"]: cat .ortgpu3/part >> /root/ort.part
    6. carry [".ortgpu4"], timeout_s 480:
       cat .ortgpu4/part >> /root/ort.part && mv /root/ort.part /root/$(cat /root/ort.name)
       && python3 -m pip install -q --no-index --no-deps --target /tmp/ortsite /root/onnxruntime_gpu-*.whl
       && export PYTHONPATH=/tmp/ortsite:/tmp/whlsite PYTHONUNBUFFERED=1
       && set -o pipefail && python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log

    (each command on one line; /tmp/ortsite comes first so its onnxruntime shadows the image's CPU build)
    A rerun on the same warm machine: export PYTHONPATH=/tmp/ortsite:/tmp/whlsite PYTHONUNBUFFERED=1;
    python3 benchmarks/gpu_check.py --out $OUT --quick 2>&1 | tee $OUT/gpu_check.log
    Then give_back. Results: $OUT/gpu_check.json (everything) and $OUT/gpu_check.md (tables).

What it does (the script's own budget, --budget-s, defaults to 285 s; stages past it are skipped and recorded):
  1. builds the CIFAR-size diffusers UNet2DModel (35.7M parameters, torch.manual_seed(0), conv_out scaled by 0.02
     as benchmarks/pipeline_speed.py does so DDIM stays well-posed), saves it as a DDPMPipeline folder, and
     exports it with `export_bundle(..., fp16=True, static_batch=B)` for each batch B (validation runs on ONNX
     Runtime's CPU provider at batch B: it cannot be skipped for a static-batch export, so it is measured);
  2. per batch, on the same random inputs (timesteps 999, 500, 10, ...), times one UNet call (median and min
     over 50 calls after 10 warm-up calls; --quick: 20 after 5; at most ~15 s of calls per variant) and measures
     max|x - torch| / max(1, max|torch|) against torch fp32 (TF32 off) and torch in the same precision, for:
       torch eager fp32 (TF32 off), torch eager fp16, torch CUDA graph fp16 (static buffers, side-stream warm-up);
       our OnnxRuntimeRunner (host arrays in and out, so its time includes the host<->device copies) in fp16 with
       IO binding + CUDA graph, fp16 IO binding alone, fp32 with use_tf32=0 (and, without --quick, fp32 + CUDA
       graph and fp32 with ORT's default TF32);
       raw ONNX Runtime with every tensor resident on the device (OrtValues bound once, run_with_iobinding only,
       no host copies): fp16 + CUDA graph and fp16 (and fp32 no-TF32 without --quick): the pure model latency.
     The first case captures the CUDA graphs; the later cases replay them after `update_inplace`.
  3. end to end: `Pipeline.from_bundle(..., device="cuda", precision="fp16", cuda_graph=True, scheduler="ddim")`
     for --steps DDIM steps, beside diffusers' DDIMPipeline in fp16 on the same GPU (same seed; max |diff|).
  4. writes OUT/gpu_check.json and OUT/gpu_check.md after every stage, so a run cut short keeps what it measured.

    python benchmarks/gpu_check.py --out DIR [--quick] [--batches 1,64] [--steps 50] [--budget-s 285]
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --out DIR --cpu-smoke    # tiny model, CPU provider only

--cpu-smoke runs the whole control flow on a CPU-only machine with a tiny UNet2DModel (8x8, channels (32, 64));
the CUDA-only variants are skipped with a recorded reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import gc
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python3 benchmarks/gpu_check.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
TINY = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
METRIC = "max|x - ref| / max(1, max|ref|)"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape {x.shape} != reference shape {ref.shape}")
    if not (np.isfinite(x).all() and np.isfinite(ref).all()):
        return float("inf")
    return float(np.abs(x - ref).max() / max(1.0, float(np.abs(ref).max())))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return repr(obj)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


class Report:
    """Everything measured; written as JSON and markdown after every stage."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out = out
        self.data: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "args": vars(args), "metric": METRIC,
                                     "env": {}, "model": {}, "stages": [], "export": [], "latency": [],
                                     "end_to_end": [], "notes": []}

    def note(self, text: str) -> None:
        log(f"note: {text}")
        self.data["notes"].append(text)

    def stage(self, name: str, fn, *args, budget_s: float | None = None, reserve_s: float = 0.0, **kwargs):
        """Run ``fn``; record ok / error / seconds; never raise (KeyboardInterrupt aside)."""
        rec: dict[str, Any] = {"stage": name, "started_s": round(elapsed(), 2)}
        self.data["stages"].append(rec)
        if budget_s is not None and elapsed() + reserve_s > budget_s:
            rec.update(ok=False, skipped=f"time budget: {elapsed():.0f} s used, {reserve_s:.0f} s needed, "
                                         f"budget {budget_s:.0f} s")
            log(f"SKIP {name}: {rec['skipped']}")
            self.save()
            return None
        log(f"stage {name} ...")
        t = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            rec.update(ok=True, seconds=round(time.perf_counter() - t, 3))
            log(f"stage {name} ok ({rec['seconds']:.1f} s)")
            return result
        except Exception as e:
            rec.update(ok=False, seconds=round(time.perf_counter() - t, 3), error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=12))
            log(f"stage {name} FAILED after {rec['seconds']:.1f} s: {type(e).__name__}: {e}")
            return None
        finally:
            self.save()

    def skip(self, name: str, reason: str) -> None:
        self.data["stages"].append({"stage": name, "ok": False, "skipped": reason, "started_s": round(elapsed(), 2)})
        log(f"SKIP {name}: {reason}")
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(elapsed(), 2)
        try:
            _write(self.out / "gpu_check.json", json.dumps(_jsonable(self.data), indent=2) + "\n")
            _write(self.out / "gpu_check.md", self.markdown())
        except Exception as e:  # a report that cannot be written must not stop the measurements
            log(f"could not write the report: {type(e).__name__}: {e}")

    def markdown(self) -> str:
        d = self.data
        env = d["env"]
        lines = ["# deploy-diff GPU check", ""]
        lines.append(f"- mode: {'cpu-smoke' if d['args'].get('cpu_smoke') else 'gpu'}"
                     f"{' (quick)' if d['args'].get('quick') else ''}; elapsed {d.get('elapsed_s')} s")
        lines.append(f"- device: {env.get('gpu_name') or env.get('device')}; driver {env.get('driver_version')}; "
                     f"torch {env.get('torch_version')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); "
                     f"onnxruntime {env.get('ort_version')} ({env.get('ort_device')}, providers "
                     f"{env.get('ort_available_providers')})")
        m = d["model"]
        if m:
            lines.append(f"- model: {m.get('kind')} {m.get('config_name')}, {m.get('parameters_m')} M parameters")
        lines.append(f"- error metric: {METRIC}; the reference is torch fp32 on the same device with TF32 off "
                     "(`err fp32`), and torch in the variant's own precision (`err same prec.`)")
        key = ("ort_runner_fp16_iobinding_cudagraph", "ort_raw_fp16_iobinding_cudagraph", "torch_eager_fp16",
               "torch_cudagraph_fp16", "torch_eager_fp32_notf32")
        rows = {(r["variant"], r["batch"]): r for r in d["latency"] if r.get("median_ms") is not None}
        summary = []
        for b in sorted({r["batch"] for r in d["latency"]}):
            parts = [f"{v} {rows[(v, b)]['median_ms']:.3f} ms" for v in key if (v, b) in rows]
            if parts:
                summary.append(f"- batch {b} (median per call): " + "; ".join(parts))
        if summary:
            lines += ["", "## Summary", ""] + summary
        lines += ["", "## One UNet call", "",
                  "| variant | batch | median ms | min ms | err fp32 | err same prec. | host copies | notes |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in d["latency"]:
            notes = r.get("error") or r.get("skipped") or r.get("note") or ""
            copies = "-" if "includes_host_copies" not in r else "yes" if r["includes_host_copies"] else "no"
            lines.append(f"| {r['variant']} | {r['batch']} | {_fmt(r.get('median_ms'))} | {_fmt(r.get('min_ms'))} | "
                         f"{_fmt(r.get('max_error_vs_torch_fp32'), '.2e')} | "
                         f"{_fmt(r.get('max_error_vs_torch_same_precision'), '.2e')} | {copies} | {_md_cell(notes)} |")
        lines += ["", "## Export (`export_bundle(..., fp16=True, static_batch=B)`, validation on ORT CPU)", "",
                  "| batch | wall s | export s | validate fp32 s | validate fp16 s | fp32 max err | fp16 max err | "
                  "validation provider | fp32 optimization | error |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for r in d["export"]:
            s = r.get("seconds") or {}
            v = r.get("validation") or {}
            lines.append(f"| {r['batch']} | {_fmt(r.get('wall_s'), '.1f')} | {_fmt(s.get('export_s'), '.1f')} | "
                         f"{_fmt(s.get('validate_fp32_s'), '.1f')} | {_fmt(s.get('validate_fp16_s'), '.1f')} | "
                         f"{_fmt((v.get('fp32') or {}).get('max_error'), '.2e')} | "
                         f"{_fmt((v.get('fp16') or {}).get('max_error'), '.2e')} | "
                         f"{(v.get('fp32') or {}).get('provider', '-')} | "
                         f"{_md_cell(json.dumps(r.get('optimization')))} | {_md_cell(r.get('error') or '')} |")
        lines += ["", "## End-to-end DDIM sampling", "",
                  "| pipeline | batch | steps | best s | median s | ms / step | max abs diff vs diffusers | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in d["end_to_end"]:
            notes = r.get("error") or r.get("skipped") or r.get("note") or ""
            lines.append(f"| {r['pipeline']} | {r['batch']} | {r.get('steps')} | {_fmt(r.get('best_s'))} | "
                         f"{_fmt(r.get('median_s'))} | {_fmt(r.get('ms_per_step'), '.2f')} | "
                         f"{_fmt(r.get('max_abs_diff_vs_diffusers'), '.2e')} | {_md_cell(notes)} |")
        lines += ["", "## Stages", "", "| stage | ok | seconds | error / skipped |", "|---|---|---:|---|"]
        for r in d["stages"]:
            lines.append(f"| {r['stage']} | {'yes' if r.get('ok') else 'NO'} | {_fmt(r.get('seconds'), '.1f')} | "
                         f"{_md_cell(r.get('error') or r.get('skipped') or '')} |")
        if d["notes"]:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in d["notes"]]
        return "\n".join(lines) + "\n"


def _md_cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# environment

def setup_onnxruntime(rep: Report) -> Any:
    """Import onnxruntime and call preload_dlls() before any session (../shared/device/README.md: with it the CUDA
    provider found the CUDA 13 libraries that torch's packages bring)."""
    env = rep.data["env"]
    import onnxruntime as ort

    env["ort_version"] = ort.__version__
    env["ort_file"] = ort.__file__
    env["ort_device"] = ort.get_device()
    env["ort_available_providers"] = ort.get_available_providers()
    env["ort_package_name"] = getattr(ort, "package_name", None)
    env["ort_build_cuda_version"] = getattr(ort, "cuda_version", None)
    if hasattr(ort, "preload_dlls"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ort.preload_dlls()
        env["ort_preload_dlls"] = "called" + (f"; printed: {buf.getvalue().strip()}" if buf.getvalue().strip() else "")
    else:
        env["ort_preload_dlls"] = "onnxruntime has no preload_dlls"
    log(f"onnxruntime {ort.__version__} from {ort.__file__}; providers {env['ort_available_providers']}; "
        f"{env['ort_preload_dlls']}")
    return ort


def setup_torch(rep: Report, cuda: bool) -> Any:
    env = rep.data["env"]
    import torch

    env["torch_version"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["torch_cuda_available"] = torch.cuda.is_available()
    env["torch_threads"] = torch.get_num_threads()
    if cuda and not torch.cuda.is_available():
        rep.note("torch sees no CUDA device: the CUDA variants are skipped and the rest runs on the CPU")
        cuda = False
    if cuda:
        env["gpu_name"] = torch.cuda.get_device_name()
        env["gpu_capability"] = list(torch.cuda.get_device_capability())
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_multiprocessors"] = props.multi_processor_count
        env["cudnn"] = torch.backends.cudnn.version()
        # fp32 comparisons without TF32 on both sides (the CUDA provider gets use_tf32=0); cuDNN autotuning on, as
        # ONNX Runtime's CUDA provider searches conv algorithms exhaustively by default
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        except Exception as e:  # a torch that refuses the legacy flags: the fp32 rows then say so
            rep.note(f"could not turn TF32 off in torch ({type(e).__name__}: {e}); fp32 errors include TF32")
        torch.backends.cudnn.benchmark = True
        env["torch_settings"] = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                                 "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn.benchmark": True,
                                 "float32_matmul_precision": torch.get_float32_matmul_precision()}
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        if smi.returncode == 0 and smi.stdout.strip():
            env["driver_version"] = smi.stdout.strip().splitlines()[0].split(",")[1].strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {type(e).__name__}: {e}"
    for name in ("diffusers", "onnx", "onnxscript", "onnxconverter_common", "numpy"):
        try:
            mod = __import__(name)
            env[f"{name}_version"] = getattr(mod, "__version__", "?")
        except Exception as e:
            env[f"{name}_version"] = f"unavailable: {type(e).__name__}: {e}"
    env["python"] = platform.python_version()
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); device {env.get('gpu_name') or env.get('device')}; "
        f"driver {env.get('driver_version')}")
    return torch


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
    model.update(kind="diffusers UNet2DModel", config={k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in cfg.items()},
                 parameters=params, parameters_m=round(params / 1e6, 2), folder=str(folder),
                 note="torch.manual_seed(0); conv_out weight and bias scaled by 0.02 (as benchmarks/pipeline_speed.py)")
    log(f"model: UNet2DModel {params / 1e6:.2f}M parameters, saved to {folder}")
    return src


def _fallback_source(rep: Report, smoke: bool) -> Any:
    import torch
    from torch import nn

    from deploy_diff.export import ExportSource
    from deploy_diff.runtime.schedulers import DDPMScheduler
    from deploy_diff.train.unet import UNet, UNetConfig

    if smoke:
        cfg = UNetConfig(sample_size=8, in_channels=3, out_channels=3, base_channels=32, channel_mult=(1, 2),
                         layers_per_block=1, attention_resolutions=(4,))
    else:
        cfg = UNetConfig(sample_size=32, in_channels=3, out_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                         layers_per_block=2, attention_resolutions=(16,))
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
    rep.data["model"].update(kind="deploy-diff UNet (fallback: no diffusers)", config=cfg.to_dict(), parameters=params,
                             parameters_m=round(params / 1e6, 2))
    return ExportSource(module=Wrapped(unet).eval(), sample_size=(cfg.sample_size, cfg.sample_size),
                        in_channels=3, out_channels=3, num_classes=0, null_class_label=None,
                        prediction_type="epsilon",
                        scheduler_config=dict(DDPMScheduler().config, _class_name="DDPMScheduler"),
                        source={"kind": "gpu_check fallback"})


def export_one(rep: Report, src: Any, root: Path, batch: int) -> Path:
    from deploy_diff.export import export_bundle

    out = root / f"bundle-b{batch}"
    rec: dict[str, Any] = {"batch": batch, "bundle": str(out)}
    rep.data["export"].append(rec)
    t = time.perf_counter()
    try:
        manifest = export_bundle(src, out, fp16=True, static_batch=batch, log=lambda m: log(f"  export b{batch}: {m}"))
    except Exception as e:
        rec.update(wall_s=round(time.perf_counter() - t, 2), error=f"{type(e).__name__}: {e}")
        raise
    exp = manifest["export"]
    rec.update(wall_s=round(time.perf_counter() - t, 2), seconds=exp.get("seconds"), validation=exp.get("validation"),
               optimization=exp.get("optimization"), onnxruntime_version=exp.get("onnxruntime_version"),
               opset=exp.get("opset"),
               files={k: v.get("bytes") for k, v in manifest.get("files", {}).items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# inputs, timing

def make_cases(batch: int, shape: tuple[int, int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batch 1: three calls at t = 999, 500, 10. Larger batches: two calls, timesteps 999, 500, 10 then uniform
    (fractional) ones, the second call with other noise and reversed timesteps."""
    rng = np.random.RandomState(0)
    if batch == 1:
        return [(rng.standard_normal((1, *shape)).astype(np.float32), np.array([t], dtype=np.float32))
                for t in (999.0, 500.0, 10.0)]
    cases = []
    for _ in range(2):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        t = (rng.uniform(0, 999, size=batch)).astype(np.float32)
        t[:3] = np.array([999.0, 500.0, 10.0], dtype=np.float32)[:batch]
        cases.append((x, t))
    cases[1] = (cases[1][0], cases[1][1][::-1].copy())
    return cases


def time_fn(fn, warmup: int, iters: int, sync=None, max_s: float = 15.0) -> dict[str, Any]:
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_s:
            break
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "mean_ms": float(ms.mean()),
            "max_ms": float(ms.max()), "n": len(times), "warmup": warmup}


# ---------------------------------------------------------------------------------------------------------------
# the per-batch measurements

class BatchCheck:
    def __init__(self, rep: Report, args: argparse.Namespace, torch: Any, src: Any, batch: int,
                 bundle: Path | None, cuda: bool, models: dict[str, Any]):
        self.rep, self.args, self.torch, self.src, self.batch, self.bundle, self.cuda = \
            rep, args, torch, src, batch, bundle, cuda
        self.models = models
        self.dev = "cuda" if cuda else "cpu"
        self.cases = make_cases(batch, (src.in_channels, *src.sample_size))
        self._pristine = [(x.copy(), t.copy()) for x, t in self.cases]   # to catch a variant writing into them
        self.ref: dict[str, list[np.ndarray]] = {}   # precision -> torch outputs per case
        self.sessions: dict[str, Any] = {}            # variant -> live runner, reused by the raw variants
        self._keep: Any = None                        # the torch CUDA graph and its buffers
        self.reserve_later_s = 0.0                    # time the optional variants leave to later batches

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def record(self, variant: str, precision: str, host_copies: bool, fn, note: str = "", optional: bool = False
               ) -> None:
        """Run ``fn() -> (outputs per case, timing dict, extra)`` as its own stage and record one latency row.
        ``optional`` variants also leave time for the later batches' main variants (``reserve_later_s``)."""
        row: dict[str, Any] = {"variant": variant, "batch": self.batch, "precision": precision,
                               "includes_host_copies": host_copies, "note": note}
        self.rep.data["latency"].append(row)

        def run():
            try:
                outs, timing, extra = fn()
            finally:
                changed = [i for i, ((x, t), (x0, t0)) in enumerate(zip(self.cases, self._pristine))
                           if not (np.array_equal(x, x0) and np.array_equal(t, t0))]
                self.cases = [(x.copy(), t.copy()) for x, t in self._pristine]
            if changed:
                raise RuntimeError(f"{variant} wrote into its input arrays (cases {changed}); results discarded")
            row.update(timing)
            row.update(extra or {})
            if "fp32" in self.ref:
                row["max_error_vs_torch_fp32"] = max(rel_err(o, r) for o, r in zip(outs, self.ref["fp32"]))
            if precision in self.ref and precision != "fp32":
                row["max_error_vs_torch_same_precision"] = max(rel_err(o, r) for o, r in zip(outs, self.ref[precision]))
            elif precision == "fp32" and "fp32" in self.ref:
                row["max_error_vs_torch_same_precision"] = row["max_error_vs_torch_fp32"]
            row["errors_per_case_vs_torch_fp32"] = [rel_err(o, r) for o, r in zip(outs, self.ref.get("fp32", []))]
            log(f"  {variant} b{self.batch}: median {row['median_ms']:.3f} ms, min {row['min_ms']:.3f} ms, "
                f"err fp32 {row.get('max_error_vs_torch_fp32', float('nan')):.2e}")

        reserve = 5 + (self.reserve_later_s if optional else 0)
        self.rep.stage(f"b{self.batch}:{variant}", run, budget_s=self.args.budget_s, reserve_s=reserve)
        rec = self.rep.data["stages"][-1]
        if not rec.get("ok"):
            row["error" if "error" in rec else "skipped"] = rec.get("error") or rec.get("skipped")

    def skip(self, variant: str, precision: str, reason: str) -> None:
        self.rep.data["latency"].append({"variant": variant, "batch": self.batch, "precision": precision,
                                         "skipped": reason})
        self.rep.skip(f"b{self.batch}:{variant}", reason)

    def _sync(self):
        return self.torch.cuda.synchronize if self.cuda else None

    # -- torch ---------------------------------------------------------------------------------------------
    def torch_eager(self, precision: str):
        torch = self.torch
        model = self.models[precision]
        dtype = torch.float16 if precision == "fp16" else torch.float32
        xs = [torch.from_numpy(x).to(self.dev, dtype) for x, _ in self.cases]
        ts = [torch.from_numpy(t).to(self.dev) for _, t in self.cases]
        with torch.no_grad():
            outs = [model(x, t).float().cpu().numpy() for x, t in zip(xs, ts)]
            self.ref[precision] = outs
            timing = time_fn(lambda: model(xs[0], ts[0]), self.args.warmup, self.args.iters, self._sync())
        return outs, timing, {}

    def torch_cuda_graph(self):
        """torch.cuda.CUDAGraph of the fp16 forward: static buffers, warm-up on a side stream, capture, replay."""
        torch = self.torch
        model = self.models["fp16"]
        xs = [torch.from_numpy(x).to("cuda", torch.float16) for x, _ in self.cases]
        ts = [torch.from_numpy(t).to("cuda") for _, t in self.cases]
        static_x, static_t = xs[0].clone(), ts[0].clone()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(static_x, static_t)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_x, static_t)
        outs = []
        for x, t in zip(xs, ts):
            static_x.copy_(x)
            static_t.copy_(t)
            graph.replay()
            outs.append(static_out.float().cpu().numpy())
        static_x.copy_(xs[0])
        static_t.copy_(ts[0])
        timing = time_fn(graph.replay, self.args.warmup, self.args.iters, torch.cuda.synchronize)
        self._keep = (graph, static_x, static_t, static_out)  # alive until the batch is done
        return outs, timing, {}

    # -- ONNX Runtime through our runner -----------------------------------------------------------------
    def providers(self, tf32: bool | None, graph: bool) -> list | None:
        """Explicit CUDA provider options. Note: OnnxRuntimeRunner adds enable_cuda_graph only to the providers
        it builds itself (providers=None), so it is set here whenever the runner gets cuda_graph=True."""
        if not self.cuda:
            return ["CPUExecutionProvider"]
        opts = {"device_id": "0"}
        if tf32 is False:
            opts["use_tf32"] = "0"
        if graph:
            opts["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]

    def _check_cuda_session(self, session: Any) -> list[str]:
        active = session.get_providers()
        if self.cuda and (not active or active[0] != "CUDAExecutionProvider"):
            raise RuntimeError(f"the session runs on {active}: the CUDA provider is not active (fell back to CPU?)")
        return active

    def ort_runner(self, variant: str, precision: str, graph: bool, tf32: bool | None):
        from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner

        path = self.bundle / ("unet.fp16.onnx" if precision == "fp16" else "unet.onnx")
        providers = None if (tf32 is None and self.cuda) else self.providers(tf32, graph)
        t = time.perf_counter()
        runner = OnnxRuntimeRunner(path, device=self.dev, cuda_graph=graph, providers=providers)
        create_s = time.perf_counter() - t
        active = self._check_cuda_session(runner.session)
        t = time.perf_counter()
        outs = [runner(x, t_) for x, t_ in self.cases]   # the first call captures the graph, the rest replay it
        first_s = time.perf_counter() - t
        x0, t0 = self.cases[0]
        timing = time_fn(lambda: runner(x0, t0), self.args.warmup, self.args.iters)
        self.sessions[variant] = runner
        extra = {"session_create_s": round(create_s, 3), "first_calls_s": round(first_s, 3), "providers": active,
                 "provider_options": _provider_options(runner.session),
                 "graph": str(path.name), "runner_cuda_graph": graph}
        return outs, timing, extra

    # -- raw ONNX Runtime: everything on the device -------------------------------------------------------
    def ort_raw(self, precision: str, graph: bool, tf32: bool | None, reuse: str | None = None):
        ort = __import__("onnxruntime")
        path = self.bundle / ("unet.fp16.onnx" if precision == "fp16" else "unet.onnx")
        create_s = None
        if reuse is not None and reuse in self.sessions:
            session = self.sessions[reuse].session
        elif reuse is not None:
            raise RuntimeError(f"the session of {reuse} to reuse is not there (that variant failed)")
        else:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            t = time.perf_counter()
            # enable_fallback=0: a CUDA session that cannot be made (e.g. graph capture refused because a node is
            # not on the CUDA provider) raises its own error here instead of quietly becoming a CPU session
            session = ort.InferenceSession(str(path), opts, providers=self.providers(tf32, graph), enable_fallback=0)
            create_s = time.perf_counter() - t
        active = self._check_cuda_session(session)
        out_meta = session.get_outputs()[0]
        out_dtype = np.float16 if out_meta.type == "tensor(float16)" else np.float32
        in_types = {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32) for i in session.get_inputs()}
        x0, t0 = self.cases[0]
        # copies: on "cpu" an OrtValue wraps the numpy array's memory, and update_inplace would then overwrite it
        xv = ort.OrtValue.ortvalue_from_numpy(np.array(x0, dtype=in_types["sample"], copy=True), self.dev, 0)
        tv = ort.OrtValue.ortvalue_from_numpy(np.array(t0, dtype=in_types["timestep"], copy=True), self.dev, 0)
        yv = ort.OrtValue.ortvalue_from_shape_and_type([self.batch, self.src.out_channels, *self.src.sample_size],
                                                       out_dtype, self.dev, 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input("sample", xv)
        binding.bind_ortvalue_input("timestep", tv)
        binding.bind_ortvalue_output(out_meta.name, yv)
        outs = []
        for i, (x, t) in enumerate(self.cases):
            if i:
                xv.update_inplace(np.array(x, dtype=in_types["sample"], copy=True))
                tv.update_inplace(np.array(t, dtype=in_types["timestep"], copy=True))
            session.run_with_iobinding(binding)   # the first run of a graph session captures; later ones replay
            outs.append(yv.numpy().astype(np.float32))
        xv.update_inplace(np.array(x0, dtype=in_types["sample"], copy=True))
        tv.update_inplace(np.array(t0, dtype=in_types["timestep"], copy=True))
        timing = time_fn(lambda: session.run_with_iobinding(binding), self.args.warmup, self.args.iters)
        self.sessions[f"_raw_{precision}_{graph}_{reuse}"] = (session, binding, xv, tv, yv)
        extra = {"providers": active, "provider_options": _provider_options(session), "graph": path.name,
                 "session_create_s": None if create_s is None else round(create_s, 3),
                 "reuses_session_of": reuse}
        return outs, timing, extra

    # -- all of it ------------------------------------------------------------------------------------------
    def run_all(self) -> None:
        a, cuda = self.args, self.cuda
        no_cuda = "needs CUDA (cpu-smoke run)" if a.cpu_smoke else "needs CUDA (no CUDA device in this run)"
        self.record("torch_eager_fp32" + ("_notf32" if cuda else ""), "fp32", False, lambda: self.torch_eager("fp32"),
                    note="reference; TF32 off" if cuda else "reference")
        self.record("torch_eager_fp16", "fp16", False, lambda: self.torch_eager("fp16"))
        if cuda:
            self.record("torch_cudagraph_fp16", "fp16", False, self.torch_cuda_graph)
        else:
            self.skip("torch_cudagraph_fp16", "fp16", no_cuda)
        if self.bundle is None:
            self.rep.skip(f"b{self.batch}:onnxruntime", "no bundle (the export failed or was skipped)")
            return
        rn = "ort_runner"
        if cuda:
            self.record(f"{rn}_fp16_iobinding_cudagraph", "fp16", True,
                        lambda: self.ort_runner(f"{rn}_fp16_iobinding_cudagraph", "fp16", True, None),
                        note="OnnxRuntimeRunner(cuda_graph=True), default providers")
        else:
            self.skip(f"{rn}_fp16_iobinding_cudagraph", "fp16", no_cuda)
        self.record(f"{rn}_fp16_iobinding" if cuda else f"{rn}_fp16_cpu", "fp16", True,
                    lambda: self.ort_runner(f"{rn}_fp16", "fp16", False, None if cuda else False))
        self.record(f"{rn}_fp32_iobinding_notf32" if cuda else f"{rn}_fp32_cpu", "fp32", True,
                    lambda: self.ort_runner(f"{rn}_fp32", "fp32", False, False),
                    note="use_tf32=0" if cuda else "")
        if not a.quick:
            if cuda:
                self.record(f"{rn}_fp32_iobinding_cudagraph_notf32", "fp32", True,
                            lambda: self.ort_runner(f"{rn}_fp32_graph", "fp32", True, False),
                            note="use_tf32=0, enable_cuda_graph=1 passed explicitly", optional=True)
                self.record(f"{rn}_fp32_iobinding_tf32default", "fp32", True,
                            lambda: self.ort_runner(f"{rn}_fp32_tf32", "fp32", False, None),
                            note="ORT's default provider options (TF32 on)", optional=True)
            else:
                self.skip(f"{rn}_fp32_iobinding_cudagraph_notf32", "fp32", no_cuda)
        if cuda:
            self.record("ort_raw_fp16_iobinding_cudagraph", "fp16", False, lambda: self.ort_raw("fp16", True, None),
                        note="OrtValues on the device, run_with_iobinding only")
        else:
            self.skip("ort_raw_fp16_iobinding_cudagraph", "fp16", no_cuda)
        self.record("ort_raw_fp16_iobinding" if cuda else "ort_raw_fp16_cpu", "fp16", False,
                    lambda: self.ort_raw("fp16", False, None, reuse=f"{rn}_fp16"),
                    note="session of the fp16 runner, own device-resident binding")
        if not a.quick:
            self.record("ort_raw_fp32_iobinding_notf32" if cuda else "ort_raw_fp32_cpu", "fp32", False,
                        lambda: self.ort_raw("fp32", False, False, reuse=f"{rn}_fp32"),
                        note="session of the fp32 no-TF32 runner", optional=True)

    def close(self) -> None:
        self.sessions.clear()
        self._keep = None
        gc.collect()
        if self.cuda:
            with contextlib.suppress(Exception):
                self.torch.cuda.synchronize()
                self.torch.cuda.empty_cache()


def _provider_options(session: Any) -> Any:
    try:
        opts = session.get_provider_options()
        keep = ("device_id", "use_tf32", "enable_cuda_graph", "cudnn_conv_algo_search", "arena_extend_strategy")
        return {p: {k: v for k, v in o.items() if k in keep} for p, o in opts.items()}
    except Exception as e:
        return f"unavailable: {type(e).__name__}"


# ---------------------------------------------------------------------------------------------------------------
# end to end

def end_to_end(rep: Report, args: argparse.Namespace, torch: Any, src: Any, batch: int, bundle: Path | None,
               cuda: bool) -> None:
    precision = "fp16" if cuda else "fp32"
    steps = args.steps
    images: dict[str, np.ndarray] = {}
    dev = "cuda" if cuda else "cpu"

    def ours():
        from deploy_diff.runtime import Pipeline

        row = {"pipeline": f"deploy-diff Pipeline (ORT {'CUDA fp16, IO binding + CUDA graph' if cuda else 'CPU'})",
               "batch": batch, "steps": steps, "precision": precision, "scheduler": "ddim"}
        rep.data["end_to_end"].append(row)
        if bundle is None:
            row["skipped"] = "no bundle"
            raise RuntimeError("no bundle (the export failed or was skipped)")
        t = time.perf_counter()
        pipe = Pipeline.from_bundle(bundle, device=dev, precision=precision, cuda_graph=cuda, scheduler="ddim")
        row["load_s"] = round(time.perf_counter() - t, 3)
        if cuda:
            row["providers"] = pipe.runner.session.get_providers()
            if row["providers"][0] != "CUDAExecutionProvider":
                raise RuntimeError(f"the pipeline's session runs on {row['providers']}")
        t = time.perf_counter()
        pipe(num_images=batch, num_inference_steps=2, seed=0)   # warm-up (captures the CUDA graph)
        row["warmup_s"] = round(time.perf_counter() - t, 3)
        runs = []
        for _ in range(args.e2e_repeats):
            t = time.perf_counter()
            out = pipe(num_images=batch, num_inference_steps=steps, seed=0)
            runs.append(time.perf_counter() - t)
        images["ours"] = out
        row.update(best_s=min(runs), median_s=float(np.median(runs)), runs_s=runs,
                   ms_per_step=1e3 * min(runs) / steps, finite=bool(np.isfinite(out).all()))
        log(f"  ours b{batch}: {row['best_s']:.3f} s for {steps} steps ({row['ms_per_step']:.2f} ms/step)")

    def theirs():
        row: dict[str, Any] = {"pipeline": f"diffusers DDIMPipeline (torch {dev} {precision})", "batch": batch,
                               "steps": steps, "precision": precision, "scheduler": "ddim"}
        rep.data["end_to_end"].append(row)
        folder = rep.data["model"].get("folder")
        if not folder:
            row["skipped"] = "the model is not a diffusers pipeline (diffusers unavailable)"
            raise RuntimeError(row["skipped"])
        from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

        dtype = torch.float16 if precision == "fp16" else torch.float32
        unet = UNet2DModel.from_pretrained(Path(folder) / "unet", torch_dtype=dtype).to(dev).eval()
        sched = DDIMScheduler.from_pretrained(Path(folder) / "scheduler")
        pipe = DDIMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)

        def call(n):
            out = pipe(batch_size=batch, num_inference_steps=n, generator=torch.Generator().manual_seed(0),
                       output_type="np")
            if cuda:
                torch.cuda.synchronize()
            return out.images

        call(2)
        runs = []
        for _ in range(args.e2e_repeats):
            t = time.perf_counter()
            out = call(steps)
            runs.append(time.perf_counter() - t)
        images["diffusers"] = np.asarray(out, dtype=np.float32)
        row.update(best_s=min(runs), median_s=float(np.median(runs)), runs_s=runs, ms_per_step=1e3 * min(runs) / steps,
                   note="cudnn.benchmark on, TF32 off; diffusers draws its latents in the UNet's dtype (fp16), ours "
                        "in float32, so the images may differ by more than the model error" if cuda else "")
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

def main(argv: list[str] | None = None) -> int:
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
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.steps = args.steps or (5 if smoke else 50)
    args.budget_s = args.budget_s or (900.0 if smoke else 285.0)
    args.warmup, args.iters = (1, 3) if smoke else (5, 20) if args.quick else (10, 50)
    args.e2e_repeats = 1 if smoke else 2 if args.quick else 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)

    faulthandler.enable()
    faulthandler.dump_traceback_later(args.budget_s + 120, exit=True)   # a hang dumps stacks instead of timing out
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    rep = Report(out, args)
    rep.data["env"]["mode"] = "cpu-smoke" if smoke else "gpu"
    rep.data["env"]["timing"] = {"warmup": args.warmup, "iters": args.iters, "e2e_repeats": args.e2e_repeats,
                                 "clock": "time.perf_counter around each call, torch.cuda.synchronize after torch "
                                          "calls; ORT calls return after the run (runner: host arrays)"}
    log(f"mode {'cpu-smoke' if smoke else 'gpu'}{' quick' if args.quick else ''}; batches {batches}; work {work}; "
        f"out {out}; budget {args.budget_s:.0f} s")
    rep.save()

    # torch first, so its CUDA 13 libraries are the ones in the process; then preload_dlls() before any session
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
        bundle = rep.stage(f"b{batch}:export", export_one, rep, src, work, batch, budget_s=args.budget_s,
                           reserve_s=30 if not smoke else 0)
        if models:
            check = BatchCheck(rep, args, torch, src, batch, bundle, cuda, models)
            check.reserve_later_s = 0.0 if smoke else 100.0 * (len(batches) - 1 - i)
            try:
                check.run_all()
            finally:
                check.close()
        else:
            rep.skip(f"b{batch}:latency", "the torch models could not be built")
        end_to_end(rep, args, torch, src, batch, bundle, cuda)

    def ort_debug_info():
        import onnxruntime as ort

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ort.print_debug_info()   # packages, and the CUDA / cuDNN libraries loaded in this process
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
