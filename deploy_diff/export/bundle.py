"""Write a bundle: export, validate, hash, then rename into place.

Everything is built in a hidden temporary folder beside ``out`` and renamed into place only when every graph
has passed validation, so an interrupted or failed export leaves nothing half-written. An existing bundle at
``out`` is replaced (the old one is renamed aside first and removed after); an existing folder that is not a
bundle is never touched.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import __version__
from ..runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    GRAPH_FILES,
    MANIFEST_NAME,
    SCHEDULER_FILE,
    is_bundle,
    sha256_file,
)
from .onnx import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, MIN_OPSET, convert_to_fp16, export_onnx, save_onnx
from .optimize import count_fused_attention, optimize_graph
from .sources import ExportError, ExportSource, example_inputs
from .validate import ValidationError, check_graph, validate

__all__ = ["check_destination", "export_bundle"]


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_destination(out: Path) -> None:
    """Refuse to write over anything that is not a bundle (an empty folder is fine)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} exists and is not a folder; refusing to overwrite it")
    if out.is_dir() and not is_bundle(out) and any(out.iterdir()):
        raise ExportError(f"--out {out} is a folder that is not a bundle (no {MANIFEST_NAME}); refusing to "
                          "overwrite it. Choose a new path or an existing bundle")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_leftovers(out: Path) -> None:
    """A killed export (SIGKILL, power loss) cannot clean up: remove the hidden ``.NAME.partial-PID-*`` and
    ``.NAME.old-PID-*`` folders beside ``out`` whose process is gone. A kill between the two renames of
    :func:`_install` leaves the previous bundle in an ``old`` folder and none at ``out``: it is moved back."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("partial", "old") and pid.isdigit() and p.is_dir() and not _pid_alive(int(pid)):
            if kind == "old" and not out.exists() and is_bundle(p / "bundle"):
                os.replace(p / "bundle", out)  # killed between the two renames: put the previous bundle back
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an existing bundle (checked again right before)."""
    check_destination(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
        os.replace(out, old / "bundle")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "bundle", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _io_spec(src: ExportSource, batch: int | str) -> tuple[dict, dict]:
    h, w = src.sample_size
    inputs = {"sample": {"dtype": "float32", "shape": [batch, src.in_channels, h, w]},
              "timestep": {"dtype": "float32", "shape": [batch]}}
    if src.conditional:
        inputs["class_labels"] = {"dtype": "int64", "shape": [batch]}
    outputs = {"out": {"dtype": "float32", "shape": [batch, src.out_channels, h, w]}}
    return inputs, outputs


def export_bundle(src: ExportSource, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                  static_batch: int | None = None, validation_batches: Sequence[int] = (1, 2, 5),
                  tensorrt: bool = False, tensorrt_max_batch: int = 16,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, optimize: bool = True,
                  log: Callable[[str], Any] | None = _log_stderr, _tamper: Callable[[Path], Any] | None = None
                  ) -> dict[str, Any]:
    """Export ``src`` to a validated bundle at ``out``; return the manifest.

    ``static_batch`` fixes every shape (needed for CUDA graph capture); ``fp16`` adds ``unet.fp16.onnx``;
    ``tensorrt`` builds an engine under ``engines/`` (needs TensorRT and a GPU). ``optimize`` fuses the fp32
    graph's attention into ONNX Runtime's ``MultiHeadAttention`` (see :mod:`.optimize`; off with ``tensorrt``,
    which parses standard ONNX only); the fused graph is kept only if it passes validation, else the plain one
    is written and validated instead. ``_tamper`` is for tests: it is called on the temporary folder after the
    graphs are written, before validation.
    """
    out = Path(out)
    log = log or (lambda _msg: None)
    if static_batch is not None and (isinstance(static_batch, bool) or int(static_batch) < 1):
        raise ExportError(f"--static-batch must be a positive integer; got {static_batch!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"--opset must be an integer >= {MIN_OPSET}; got {opset!r}")
    check_destination(out)
    trt = None
    if tensorrt:
        from .tensorrt import require_tensorrt
        trt = require_tensorrt()
    out.parent.mkdir(parents=True, exist_ok=True)
    num_train_timesteps = int(src.scheduler_config.get("num_train_timesteps", 1000))
    input_names = ["sample", "timestep"] + (["class_labels"] if src.conditional else [])
    batches = [int(static_batch)] if static_batch else [int(b) for b in validation_batches]
    timings: dict[str, float] = {}
    _remove_stale_leftovers(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        t0 = time.perf_counter()
        shapes = f"static batch {static_batch}" if static_batch else "dynamic batch"
        log(f"exporting to ONNX (opset {opset}, {shapes})")
        example = example_inputs(src, static_batch or 2, num_train_timesteps=num_train_timesteps)
        model = export_onnx(src.module, example, input_names, opset=opset, dynamic_batch=static_batch is None)
        model16 = convert_to_fp16(model) if fp16 else None   # before saving: external-data saving edits `model`
        optimization: dict[str, Any] = {"attention_fused": 0, "kept": False}
        fused = None
        if optimize and not tensorrt:
            fused = optimize_graph(model)
            optimization["attention_fused"] = count_fused_attention(fused)
            if not optimization["attention_fused"]:
                fused = None
        save_onnx(fused if fused is not None else model, tmp / GRAPH_FILES["fp32"], external_data_threshold)
        if model16 is not None:
            save_onnx(model16, tmp / GRAPH_FILES["fp16"], external_data_threshold)
            del model16
        timings["export_s"] = time.perf_counter() - t0
        if _tamper is not None:
            _tamper(tmp)
        validation: dict[str, Any] = {}
        for precision in ("fp32", "fp16") if fp16 else ("fp32",):
            t1 = time.perf_counter()
            graph = tmp / GRAPH_FILES[precision]
            log(f"validating {graph.name} against torch at batch sizes {batches}")
            try:
                check_graph(graph)
                validation[precision] = validate(src, graph, precision, batches, num_train_timesteps)
                optimization["kept"] = optimization["kept"] or (precision == "fp32" and fused is not None)
            except ValidationError as e:
                if precision != "fp32" or fused is None:
                    raise
                # the optimisation broke something: fall back to the graph as exported, which must pass
                log(f"  the fused graph failed validation ({e}); writing the unfused graph instead")
                optimization["rejected"] = str(e)
                fused = None
                for stale in tmp.glob(GRAPH_FILES["fp32"] + "*"):
                    stale.unlink()
                save_onnx(model, graph, external_data_threshold)
                check_graph(graph)
                validation[precision] = validate(src, graph, precision, batches, num_train_timesteps)
            timings[f"validate_{precision}_s"] = time.perf_counter() - t1
            log(f"  max error {validation[precision]['max_error']:.2e} "
                f"(tolerance {validation[precision]['tolerance']:g})")
        del model, fused
        (tmp / SCHEDULER_FILE).write_text(json.dumps(src.scheduler_config, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
        engines = []
        if trt is not None:
            from .tensorrt import build_engine
            t1 = time.perf_counter()
            sb = static_batch
            engine = build_engine(tmp / GRAPH_FILES["fp32"], tmp / "engines", min_batch=sb or 1, opt_batch=sb or 1,
                                  max_batch=sb or tensorrt_max_batch, fp16=fp16, static_batch=sb, log=log)
            engines.append({"file": engine.relative_to(tmp).as_posix(), "precision": "fp16" if fp16 else "fp32",
                            "tensorrt_version": getattr(trt, "__version__", None)})
            timings["tensorrt_s"] = time.perf_counter() - t1
        files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        inputs, outputs = _io_spec(src, static_batch or "batch")
        timings["total_s"] = time.perf_counter() - t0
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
            "model": {"sample_size": list(src.sample_size), "in_channels": src.in_channels,
                      "out_channels": src.out_channels, "num_classes": src.num_classes,
                      "null_class_label": src.null_class_label, "prediction_type": src.prediction_type,
                      "static_batch": static_batch, "inputs": inputs, "outputs": outputs,
                      "class_names": src.class_names, "source": src.source},
            "graphs": {p: GRAPH_FILES[p] for p in validation},
            "files": files,
            "engines": engines,
            "export": {"opset": opset, "precisions": list(validation), "validation": validation,
                       "optimization": optimization,
                       "seconds": {k: round(v, 3) for k, v in timings.items()},
                       "deploy_diff_version": __version__, "torch_version": torch.__version__,
                       "onnx_version": onnx.__version__, "onnxruntime_version": _ort_version(),
                       "python": platform.python_version(),
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        _fsync_tree(tmp)
        _install(tmp, out)
        log(f"wrote {out} ({', '.join(files)}) in {timings['total_s']:.1f} s")
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ort_version() -> str | None:
    try:
        import onnxruntime
        return onnxruntime.__version__
    except ImportError:
        return None
