"""The GPU check's report and environment probes (used by ``benchmarks/gpu_check.py``; see docs/gpu.md).

``Report`` holds everything measured and rewrites ``gpu_check.json`` and ``gpu_check.md`` atomically after every
stage, so a run cut short (a time limit, a crash in a CUDA library) keeps what it had measured. ``Report.stage``
runs one step, records ok / error / skipped and seconds, and never raises. ``setup_torch`` and
``setup_onnxruntime`` record versions, the device and the settings the comparisons depend on (TF32 off).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from deploy_diff.runtime._fileio import atomic_write_text
from deploy_diff.runtime._numeric import RELATIVE_ERROR_METRIC

T0 = time.perf_counter()


def elapsed() -> float:
    """Seconds since this module was imported (the check's clock for its own time budget)."""
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[gpu_check {elapsed():7.1f}s] {msg}", flush=True)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays as Python values, inf/nan as strings, anything else as repr."""
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


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _md_cell(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Report:
    """Everything measured; written as JSON and markdown under ``out`` after every stage."""

    def __init__(self, out: Path, args: Any):
        self.out = out
        self.data: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py",
            "args": vars(args),
            "metric": RELATIVE_ERROR_METRIC,
            "env": {},
            "model": {},
            "stages": [],
            "export": [],
            "latency": [],
            "end_to_end": [],
            "notes": [],
        }

    def note(self, text: str) -> None:
        log(f"note: {text}")
        self.data["notes"].append(text)

    def stage(self, name: str, fn, *args, budget_s: float | None = None, reserve_s: float = 0.0, **kwargs):
        """Run ``fn(*args, **kwargs)`` and return its result; record ok / error / seconds; never raise (an
        interrupt aside). Skipped (None returned) when ``reserve_s`` more seconds would pass ``budget_s``."""
        rec: dict[str, Any] = {"stage": name, "started_s": round(elapsed(), 2)}
        self.data["stages"].append(rec)
        if budget_s is not None and elapsed() + reserve_s > budget_s:
            rec.update(
                ok=False,
                skipped=f"time budget: {elapsed():.0f} s used, {reserve_s:.0f} s needed, budget {budget_s:.0f} s",
            )
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
            rec.update(
                ok=False,
                seconds=round(time.perf_counter() - t, 3),
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc(limit=12),
            )
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
            atomic_write_text(self.out / "gpu_check.json", json.dumps(_jsonable(self.data), indent=2) + "\n")
            atomic_write_text(self.out / "gpu_check.md", self.markdown())
        except Exception as e:  # a report that cannot be written must not stop the measurements
            log(f"could not write the report: {type(e).__name__}: {e}")

    # -- markdown -------------------------------------------------------------------------------------------
    def markdown(self) -> str:
        d = self.data
        env = d["env"]
        lines = ["# deploy-diff GPU check", ""]
        lines.append(
            f"- mode: {'cpu-smoke' if d['args'].get('cpu_smoke') else 'gpu'}"
            f"{' (quick)' if d['args'].get('quick') else ''}; elapsed {d.get('elapsed_s')} s"
        )
        lines.append(
            f"- device: {env.get('gpu_name') or env.get('device')}; driver {env.get('driver_version')}; "
            f"torch {env.get('torch_version')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); "
            f"onnxruntime {env.get('ort_version')} ({env.get('ort_device')}, providers "
            f"{env.get('ort_available_providers')})"
        )
        m = d["model"]
        if m:
            lines.append(f"- model: {m.get('kind')} {m.get('config_name')}, {m.get('parameters_m')} M parameters")
        lines.append(
            f"- error metric: {RELATIVE_ERROR_METRIC}; the reference is torch fp32 on the same device with "
            "TF32 off (`err fp32`), and torch in the variant's own precision (`err same prec.`)"
        )
        lines += self._summary() + self._latency_table() + self._export_table() + self._e2e_table()
        lines += ["", "## Stages", "", "| stage | ok | seconds | error / skipped |", "|---|---|---:|---|"]
        for r in d["stages"]:
            lines.append(
                f"| {r['stage']} | {'yes' if r.get('ok') else 'NO'} | {_fmt(r.get('seconds'), '.1f')} | "
                f"{_md_cell(r.get('error') or r.get('skipped') or '')} |"
            )
        if d["notes"]:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in d["notes"]]
        return "\n".join(lines) + "\n"

    def _summary(self) -> list[str]:
        key = (
            "ort_runner_fp16_iobinding_cudagraph",
            "ort_raw_fp16_iobinding_cudagraph",
            "torch_eager_fp16",
            "torch_cudagraph_fp16",
            "torch_eager_fp32_notf32",
        )
        lat = self.data["latency"]
        rows = {(r["variant"], r["batch"]): r for r in lat if r.get("median_ms") is not None}
        summary = []
        for b in sorted({r["batch"] for r in lat}):
            parts = [f"{v} {rows[(v, b)]['median_ms']:.3f} ms" for v in key if (v, b) in rows]
            if parts:
                summary.append(f"- batch {b} (median per call): " + "; ".join(parts))
        return ["", "## Summary", ""] + summary if summary else []

    def _latency_table(self) -> list[str]:
        lines = [
            "",
            "## One UNet call",
            "",
            "| variant | batch | median ms | min ms | err fp32 | err same prec. | host copies | notes |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in self.data["latency"]:
            notes = r.get("error") or r.get("skipped") or r.get("note") or ""
            copies = "-" if "includes_host_copies" not in r else "yes" if r["includes_host_copies"] else "no"
            lines.append(
                f"| {r['variant']} | {r['batch']} | {_fmt(r.get('median_ms'))} | {_fmt(r.get('min_ms'))} | "
                f"{_fmt(r.get('max_error_vs_torch_fp32'), '.2e')} | "
                f"{_fmt(r.get('max_error_vs_torch_same_precision'), '.2e')} | {copies} | "
                f"{_md_cell(notes)} |"
            )
        return lines

    def _export_table(self) -> list[str]:
        lines = [
            "",
            "## Export (`export_bundle(..., fp16=True, static_batch=B)`, validation on ORT CPU)",
            "",
            "| batch | wall s | export s | validate fp32 s | validate fp16 s | fp32 max err | fp16 max err | "
            "validation provider | fp32 optimization | error |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for r in self.data["export"]:
            s = r.get("seconds") or {}
            v32 = (r.get("validation") or {}).get("fp32") or {}
            v16 = (r.get("validation") or {}).get("fp16") or {}
            lines.append(
                f"| {r['batch']} | {_fmt(r.get('wall_s'), '.1f')} | {_fmt(s.get('export_s'), '.1f')} | "
                f"{_fmt(s.get('validate_fp32_s'), '.1f')} | {_fmt(s.get('validate_fp16_s'), '.1f')} | "
                f"{_fmt(v32.get('max_error'), '.2e')} | {_fmt(v16.get('max_error'), '.2e')} | "
                f"{v32.get('provider', '-')} | {_md_cell(json.dumps(r.get('optimization')))} | "
                f"{_md_cell(r.get('error') or '')} |"
            )
        return lines

    def _e2e_table(self) -> list[str]:
        lines = [
            "",
            "## End-to-end DDIM sampling",
            "",
            "| pipeline | batch | steps | best s | median s | ms / step | model s (best run) | "
            "max abs diff vs diffusers | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.data["end_to_end"]:
            notes = r.get("error") or r.get("skipped") or r.get("note") or ""
            lines.append(
                f"| {r['pipeline']} | {r['batch']} | {r.get('steps')} | {_fmt(r.get('best_s'))} | "
                f"{_fmt(r.get('median_s'))} | {_fmt(r.get('ms_per_step'), '.2f')} | "
                f"{_fmt(r.get('model_s'))} | {_fmt(r.get('max_abs_diff_vs_diffusers'), '.2e')} | "
                f"{_md_cell(notes)} |"
            )
        return lines


# ---------------------------------------------------------------------------------------------------------------
# environment


def setup_onnxruntime(rep: Report) -> Any:
    """Import onnxruntime and call ``preload_dlls()`` before any session: it loads the CUDA and cuDNN libraries
    that torch's ``nvidia-*`` packages bring, which the CUDA provider of onnxruntime-gpu needs (docs/gpu.md)."""
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
        printed = buf.getvalue().strip()
        env["ort_preload_dlls"] = "called" + (f"; printed: {printed}" if printed else "")
    else:
        env["ort_preload_dlls"] = "onnxruntime has no preload_dlls"
    log(
        f"onnxruntime {ort.__version__} from {ort.__file__}; providers {env['ort_available_providers']}; "
        f"{env['ort_preload_dlls']}"
    )
    return ort


def setup_torch(rep: Report, cuda: bool) -> Any:
    """Import torch, record the device; on CUDA turn TF32 off (fp32 comparisons are exact on both sides: the CUDA
    provider gets ``use_tf32=0``) and cuDNN autotuning on (ONNX Runtime's CUDA provider searches conv algorithms
    exhaustively by default)."""
    env = rep.data["env"]
    import torch

    env.update(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        torch_cuda_available=torch.cuda.is_available(),
        torch_threads=torch.get_num_threads(),
    )
    if cuda and not torch.cuda.is_available():
        rep.note("torch sees no CUDA device: the CUDA variants are skipped and the rest runs on the CPU")
        cuda = False
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu_name=torch.cuda.get_device_name(),
            gpu_capability=list(torch.cuda.get_device_capability()),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        except Exception as e:  # a torch that refuses the legacy flags: the fp32 rows then say so
            rep.note(f"could not turn TF32 off in torch ({type(e).__name__}: {e}); fp32 errors include TF32")
        torch.backends.cudnn.benchmark = True
        env["torch_settings"] = {
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn.benchmark": True,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        if smi.returncode == 0 and smi.stdout.strip():
            env["driver_version"] = smi.stdout.strip().splitlines()[0].split(",")[1].strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {type(e).__name__}: {e}"
    for name in ("diffusers", "onnx", "onnxscript", "onnxconverter_common", "numpy"):
        try:
            env[f"{name}_version"] = getattr(__import__(name), "__version__", "?")
        except Exception as e:
            env[f"{name}_version"] = f"unavailable: {type(e).__name__}: {e}"
    env["python"] = platform.python_version()
    log(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); device {env.get('gpu_name') or env.get('device')}; "
        f"driver {env.get('driver_version')}"
    )
    return torch
