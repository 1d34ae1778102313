"""Write a bundle: the ONNX graphs, their validation against torch, the manifest, then rename into place.

:func:`export_bundle` runs three steps inside one :func:`~.staging.staging_folder` (a hidden folder beside ``out``
that is renamed into place only when every step has passed, and removed otherwise, so a failed or interrupted
export leaves nothing half-written):

1. :func:`write_graphs` traces the source to ONNX and writes ``unet.onnx`` (attention fused for ONNX Runtime when
   the fusion applies) and, with ``fp16``, ``unet.fp16.onnx``;
2. :func:`validate_graphs` runs each graph in ONNX Runtime against the torch module; a fused graph that fails is
   replaced by the graph as exported, which must then pass;
3. :func:`write_manifest` writes ``scheduler_config.json`` and ``deploy_diff.json`` (hashes of every file).

With ``tensorrt``, an engine is built (and validated) between steps 2 and 3.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import __version__
from ..runtime.arguments import is_int
from ..runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    GRAPH_FILES,
    MANIFEST_NAME,
    PIXEL_PIPELINE,
    SCHEDULER_FILE,
    sha256_file,
)
from .onnx import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    MIN_OPSET,
    convert_to_fp16,
    export_onnx,
    rename_dims,
    save_onnx,
)
from .optimize import count_fused_attention, optimize_graph
from .sources import ExportError, ExportSource, example_inputs
from .staging import check_destination, staging_folder
from .staging import remove_stale_leftovers as _remove_stale_leftovers  # noqa: F401  (its name before staging.py)
from .validate import ValidationError, check_graph, validate

__all__ = [
    "check_destination",
    "export_bundle",
    "export_facts",
    "file_table",
    "validate_graphs",
    "validate_written",
    "write_component",
    "write_graphs",
    "write_manifest",
]

Log = Callable[[str], Any]


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class WrittenGraphs:
    """What :func:`write_component` wrote into ``folder``, and what validation needs to fall back."""

    folder: Path
    precisions: tuple[str, ...]  # ("fp32",) or ("fp32", "fp16")
    plain: onnx.ModelProto | None  # the fp32 graph as exported, kept while a fused one is written in its place
    external_data_threshold: int
    optimization: dict[str, Any] = field(default_factory=dict)  # the manifest's "optimization" entry
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=lambda: dict(GRAPH_FILES))  # precision -> file name


def write_component(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    input_names: Sequence[str],
    folder: Path,
    files: dict[str, str],
    *,
    output_name: str = "out",
    opset: int,
    fp16: bool,
    optimize: bool,
    external_data_threshold: int,
    dynamic_batch: bool = True,
    dynamic_shapes: dict[str, dict[int, Any]] | None = None,
    dim_names: dict[str, str] | None = None,
) -> WrittenGraphs:
    """Trace ``module(*example)`` to ONNX and write ``files["fp32"]`` (fused attention when ``optimize`` and the
    fusion applies) and, with ``fp16``, ``files["fp16"]`` (converted from the unfused graph) into ``folder``. The
    graph's symbolic dimensions are the batch (``dynamic_batch``) or ``dynamic_shapes`` (see
    :func:`~.onnx.export_onnx`), the inputs' and output's renamed by ``dim_names``."""
    t0 = time.perf_counter()
    model = export_onnx(
        module,
        example,
        input_names,
        output_name=output_name,
        opset=opset,
        dynamic_batch=dynamic_batch,
        dynamic_shapes=dynamic_shapes,
    )
    rename_dims(model, dim_names or {})
    model16 = convert_to_fp16(model) if fp16 else None  # before saving: external-data saving edits `model`
    optimization: dict[str, Any] = {"attention_fused": 0, "kept": False}
    fused = optimize_graph(model) if optimize else None
    if fused is not None:
        optimization["attention_fused"] = count_fused_attention(fused)
        if not optimization["attention_fused"]:
            fused = None
    save_onnx(fused if fused is not None else model, folder / files["fp32"], external_data_threshold)
    if model16 is not None:
        save_onnx(model16, folder / files["fp16"], external_data_threshold)
    return WrittenGraphs(
        folder,
        ("fp32", "fp16") if fp16 else ("fp32",),
        model if fused is not None else None,
        external_data_threshold,
        optimization,
        time.perf_counter() - t0,
        dict(files),
    )


def write_graphs(
    src: ExportSource,
    folder: Path,
    *,
    opset: int,
    fp16: bool,
    static_batch: int | None,
    optimize: bool,
    external_data_threshold: int,
    num_train_timesteps: int,
    log: Log,
) -> WrittenGraphs:
    """Trace ``src`` to ONNX and write ``unet.onnx`` (fused attention when ``optimize`` and the fusion applies) and,
    with ``fp16``, ``unet.fp16.onnx`` (converted from the unfused graph) into ``folder``."""
    log(f"exporting to ONNX (opset {opset}, {f'static batch {static_batch}' if static_batch else 'dynamic batch'})")
    input_names = ["sample", "timestep"] + (["class_labels"] if src.conditional else [])
    example = example_inputs(src, static_batch or 2, num_train_timesteps=num_train_timesteps)
    return write_component(
        src.module,
        example,
        input_names,
        folder,
        GRAPH_FILES,
        opset=opset,
        fp16=fp16,
        optimize=optimize,
        external_data_threshold=external_data_threshold,
        dynamic_batch=static_batch is None,
    )


#: check(graph, precision, consequence) -> the validation report (raises ValidationError ending in consequence)
Check = Callable[[Path, str, str], dict[str, Any]]
FP16_LEFT_OUT = "the fp16 graph was left out of the bundle"


def validate_written(
    graphs: WrittenGraphs, check: Check, log: Log, where: str, fp16_optional: bool = False, prefix: str = ""
) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """Validate every graph in ``graphs`` (``onnx.checker``, then ``check``); return the manifest's ``validation``
    entry (precision -> report), the seconds each took (``{prefix}validate_{precision}_s``) and, when an optional
    fp16 graph failed, why (else None).

    A fused fp32 graph that fails is replaced by the plain one, which must pass (its rejection is recorded in
    ``graphs.optimization``). With ``fp16_optional`` a failing fp16 graph (an overflow, an error above tolerance) is
    deleted and dropped from ``graphs.precisions``; any other failure raises :class:`ValidationError`."""
    validation: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    skipped = None

    def run(graph: Path, precision: str, consequence: str = "the export was discarded") -> dict[str, Any]:
        check_graph(graph)
        return check(graph, precision, consequence)

    for precision in graphs.precisions:
        t0 = time.perf_counter()
        graph = graphs.folder / graphs.files[precision]
        log(f"validating {graph.name} against torch {where}")
        fused = precision == "fp32" and graphs.plain is not None
        optional = precision == "fp16" and fp16_optional
        try:
            validation[precision] = run(graph, precision, FP16_LEFT_OUT if optional else "the export was discarded")
            graphs.optimization["kept"] = graphs.optimization["kept"] or fused
        except ValidationError as e:
            if optional:
                log(f"  {e}")
                skipped = str(e)
                for stale in graphs.folder.glob(graphs.files[precision] + "*"):
                    stale.unlink()
                continue
            if not fused:
                raise
            # the optimisation broke something: fall back to the graph as exported, which must pass
            log(f"  the fused graph failed validation ({e}); writing the unfused graph instead")
            graphs.optimization["rejected"] = str(e)
            for stale in graphs.folder.glob(graphs.files["fp32"] + "*"):
                stale.unlink()
            save_onnx(graphs.plain, graph, graphs.external_data_threshold)
            graphs.plain = None
            validation[precision] = run(graph, precision)
        finally:
            seconds[f"{prefix}validate_{precision}_s"] = time.perf_counter() - t0
        log(f"  max error {validation[precision]['max_error']:.2e} (tolerance {validation[precision]['tolerance']:g})")
    graphs.plain = None  # the plain graph is no longer needed: free it before an engine build
    graphs.precisions = tuple(validation)
    return validation, seconds, skipped


def validate_graphs(
    src: ExportSource, graphs: WrittenGraphs, batches: Sequence[int], num_train_timesteps: int, log: Log
) -> tuple[dict[str, Any], dict[str, float]]:
    """Validate every written graph against ``src.module``; return the manifest's ``validation`` entry and the
    seconds each took. A fused fp32 graph that fails is replaced by the plain one, which must pass (its rejection
    is recorded in ``graphs.optimization``); any other failure raises :class:`ValidationError`."""
    validation, seconds, _ = validate_written(
        graphs,
        lambda graph, precision, _consequence: validate(src, graph, precision, batches, num_train_timesteps),
        log,
        f"at batch sizes {list(batches)}",
    )
    return validation, seconds


def _io_spec(src: ExportSource, batch: int | str) -> tuple[dict, dict]:
    h, w = src.sample_size
    inputs = {
        "sample": {"dtype": "float32", "shape": [batch, src.in_channels, h, w]},
        "timestep": {"dtype": "float32", "shape": [batch]},
    }
    if src.conditional:
        inputs["class_labels"] = {"dtype": "int64", "shape": [batch]}
    outputs = {"out": {"dtype": "float32", "shape": [batch, src.out_channels, h, w]}}
    return inputs, outputs


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def write_manifest(
    src: ExportSource,
    folder: Path,
    *,
    opset: int,
    static_batch: int | None,
    validation: dict[str, Any],
    optimization: dict[str, Any],
    engines: list[dict[str, Any]],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Write ``scheduler_config.json`` and the manifest ``deploy_diff.json`` (size and sha256 of every other file in
    ``folder``, the model's facts, how it was exported and validated); return the manifest."""
    write_json(folder / SCHEDULER_FILE, src.scheduler_config, sort_keys=True)
    inputs, outputs = _io_spec(src, static_batch or "batch")
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "pipeline": PIXEL_PIPELINE,
        "model": {
            "sample_size": list(src.sample_size),
            "in_channels": src.in_channels,
            "out_channels": src.out_channels,
            "num_classes": src.num_classes,
            "null_class_label": src.null_class_label,
            "prediction_type": src.prediction_type,
            "static_batch": static_batch,
            "inputs": inputs,
            "outputs": outputs,
            "class_names": src.class_names,
            "source": src.source,
            # only a model with its own sampling defaults (a distilled student) records them
            **{
                key: value
                for key, value in (
                    ("default_inference_steps", src.default_inference_steps),
                    ("max_inference_steps", src.max_inference_steps),
                )
                if value is not None
            },
        },
        "graphs": {"unet": {"files": {p: GRAPH_FILES[p] for p in validation}, "inputs": inputs, "outputs": outputs}},
        "files": file_table(folder),
        "engines": engines,
        "export": {
            "opset": opset,
            "precisions": list(validation),
            "validation": validation,
            "optimization": optimization,
            **export_facts(seconds),
        },
    }
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: bundle-relative POSIX path -> ``{"sha256", "bytes"}`` of every file in ``folder``."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def export_facts(seconds: dict[str, float]) -> dict[str, Any]:
    """The manifest's ``export`` facts every bundle records: the seconds each step took, the versions, the time."""
    return {
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "deploy_diff_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": _ort_version(),
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    """``data`` as indented JSON (inside the staging folder: the rename makes it visible)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _check_options(opset: Any, static_batch: Any) -> None:
    if static_batch is not None and (not is_int(static_batch) or static_batch < 1):
        raise ExportError(f"static_batch must be a positive integer or None; got {static_batch!r}")
    if not is_int(opset) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET}; got {opset!r}")


def export_bundle(
    src: ExportSource,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    static_batch: int | None = None,
    validation_batches: Sequence[int] = (1, 2, 5),
    tensorrt: bool = False,
    tensorrt_max_batch: int = 16,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    optimize: bool = True,
    log: Log | None = _log_stderr,
) -> dict[str, Any]:
    """Export ``src`` to a validated bundle at ``out``; return the manifest.

    ``static_batch`` fixes every shape (needed for CUDA graph capture); ``fp16`` adds ``unet.fp16.onnx``;
    ``tensorrt`` builds an engine under ``engines/`` (needs TensorRT and a GPU). ``optimize`` fuses the fp32
    graph's attention into ONNX Runtime's ``MultiHeadAttention`` (see :mod:`.optimize`; off with ``tensorrt``,
    which parses standard ONNX only); the fused graph is kept only if it passes validation, else the plain one
    is written and validated instead. An existing bundle at ``out`` is replaced; anything else there is refused.
    """
    out = Path(out)
    log = log or (lambda _msg: None)
    _check_options(opset, static_batch)
    opset, static_batch = int(opset), None if static_batch is None else int(static_batch)
    check_destination(out)
    if tensorrt:
        from .tensorrt import require_tensorrt

        require_tensorrt()  # before any work: a missing TensorRT is known in a second
    num_train_timesteps = int(src.scheduler_config.get("num_train_timesteps", 1000))
    batches = [static_batch] if static_batch else [int(b) for b in validation_batches]
    t0 = time.perf_counter()
    with staging_folder(out) as folder:
        graphs = write_graphs(
            src,
            folder,
            opset=opset,
            fp16=fp16,
            static_batch=static_batch,
            optimize=optimize and not tensorrt,
            external_data_threshold=external_data_threshold,
            num_train_timesteps=num_train_timesteps,
            log=log,
        )
        seconds = {"export_s": graphs.seconds}
        validation, validation_seconds = validate_graphs(src, graphs, batches, num_train_timesteps, log)
        seconds.update(validation_seconds)
        engines = []
        if tensorrt:
            t1 = time.perf_counter()
            engines.append(
                _build_engine(
                    src,
                    folder,
                    fp16=fp16,
                    static_batch=static_batch,
                    max_batch=tensorrt_max_batch,
                    num_train_timesteps=num_train_timesteps,
                    log=log,
                )
            )
            seconds["tensorrt_s"] = time.perf_counter() - t1
        seconds["total_s"] = time.perf_counter() - t0
        manifest = write_manifest(
            src,
            folder,
            opset=opset,
            static_batch=static_batch,
            validation=validation,
            optimization=graphs.optimization,
            engines=engines,
            seconds=seconds,
        )
    log(f"wrote {out} ({', '.join(manifest['files'])}) in {seconds['total_s']:.1f} s")
    return manifest


def _build_engine(
    src: ExportSource,
    folder: Path,
    *,
    fp16: bool,
    static_batch: int | None,
    max_batch: int,
    num_train_timesteps: int,
    log: Log,
) -> dict[str, Any]:
    """Build and validate the TensorRT engine from the graph of its precision; return its manifest entry."""
    from .tensorrt import build_bundle_engine

    num_labels = src.num_classes + (1 if src.null_class_label is not None else 0)
    return build_bundle_engine(
        folder,
        fp16=fp16,
        static_batch=static_batch,
        max_batch=max_batch,
        num_labels=max(1, num_labels),
        num_train_timesteps=num_train_timesteps,
        log=log,
    )
