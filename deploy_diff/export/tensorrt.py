"""Build TensorRT engines (``.plan`` files) from a bundle's ONNX graph, validated against ONNX Runtime.

An engine is specific to one GPU model and one TensorRT version, so its file name says both, plus the precision
and the batch range of its optimization profile: ``nvidia-h100-80gb-hbm3_trt10.3.0_fp16_b1-8-64.plan``. Beside
it, ``<same name>.json`` states how it was built (precision, whether TF32 was allowed, the validation errors).

Precision: TensorRT 10 takes the ``FP16`` / ``BF16`` builder flags and picks reduced-precision kernels itself.
TensorRT 11 removed those flags: networks are strongly typed, so an fp16 engine is built from the fp16 ONNX graph
(``unet.fp16.onnx``, whose mixed precision export already decided) with no precision flag. Engines of both
versions are built from the graph of their precision. TF32 (fp32 matrix math in reduced precision on Ampere and
newer GPUs) is off unless ``tf32=True``, so an fp32 engine computes in fp32 unless it says otherwise.

Before an engine is written, it runs on random inputs beside ONNX Runtime (CPU) running the same ONNX graph; an
error above the tolerance of its precision (``relative_error``, as for the ONNX graphs) discards it.

``tensorrt`` is imported lazily: this module imports (and checks arguments) without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploy_diff.runtime._fileio import atomic_write_bytes
from deploy_diff.runtime._numeric import relative_error
from deploy_diff.runtime.backends.base import BackendUnavailableError, import_backend_module
from deploy_diff.runtime.bundle import GRAPH_FILES

__all__ = [
    "ENGINE_TOLERANCES",
    "TensorRTUnavailableError",
    "build_bundle_engine",
    "build_engine",
    "engine_filename",
    "gpu_name",
    "require_tensorrt",
    "validate_engine",
]

_INSTALL_HINT = "pip install tensorrt (needs an NVIDIA GPU and driver); the ONNX bundle works without it"
#: the largest relative_error an engine may show against ONNX Runtime, by the precision it computes in
ENGINE_TOLERANCES = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2, "bf16": 5e-2}

#: the export side's name for :class:`BackendUnavailableError` (the same class)
TensorRTUnavailableError = BackendUnavailableError


def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module, or raise :class:`BackendUnavailableError` saying how to get it."""
    return import_backend_module("tensorrt", f"TensorRT is not installed: {_INSTALL_HINT}")


def _slug(text: str) -> str:
    """Lowercase; every run of characters other than [a-z0-9] becomes one '-'; no leading/trailing '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (min_batch, opt_batch, max_batch)):
        raise ValueError(f"batch sizes must be integers, got {min_batch!r}, {opt_batch!r}, {max_batch!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")


def engine_filename(
    gpu_name: str, trt_version: str, precision: str, min_batch: int, opt_batch: int, max_batch: int
) -> str:
    """The engine's file name: ``{gpu slug}_trt{version}_{precision}_b{min}-{opt}-{max}.plan``.

    >>> engine_filename("NVIDIA H100 80GB HBM3", "10.3.0", "fp16", 1, 8, 64)
    'nvidia-h100-80gb-hbm3_trt10.3.0_fp16_b1-8-64.plan'
    """
    _check_batches(min_batch, opt_batch, max_batch)
    gpu = _slug(gpu_name) or "gpu"
    version = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version).strip("-") or "unknown"
    prec = _slug(precision)
    if not prec:
        raise ValueError(f"precision must name a precision such as 'fp32' or 'fp16', got {precision!r}")
    return f"{gpu}_trt{version}_{prec}_b{min_batch}-{opt_batch}-{max_batch}.plan"


def gpu_name(device_id: int = 0) -> str:
    """The GPU's marketing name: from cuda-python if installed, else ``nvidia-smi``, else ``"gpu"``."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(device_id)
        if err == cudart.cudaError_t.cudaSuccess:
            name = props.name
            name = name.decode("utf-8", "replace") if isinstance(name, bytes | bytearray) else str(name)
            name = name.split("\x00", 1)[0].strip()
            if name:
                return name
    except Exception:  # cuda-python absent or broken: try the driver's tool
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and lines:
            return lines[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "gpu"


def _trt_major(trt: Any) -> int:
    match = re.match(r"\d+", str(getattr(trt, "__version__", "")))
    return int(match.group()) if match else 0


def _graph_float_types(onnx_path: Path) -> set[str]:
    """The reduced float types (``"fp16"``, ``"bf16"``) that the ONNX graph's weights or casts use."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    found = {names[t.data_type] for t in model.graph.initializer if t.data_type in names}
    for node in model.graph.node:
        if node.op_type == "Cast":
            found |= {names[a.i] for a in node.attribute if a.name == "to" and a.i in names}
    return found


def _input_profile(network, batches: tuple[int, int, int]) -> list[tuple[str, tuple, tuple, tuple]]:
    """(name, min, opt, max) shapes for each network input with a dynamic batch (dim 0); other dims must be
    static. An input whose batch is static already must match ``batches`` and needs no profile entry."""
    shapes = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tensor.shape)
        if not dims:
            raise ValueError(f"input {tensor.name!r} is a scalar; every input needs a leading batch dimension")
        if any(d < 0 for d in dims[1:]):
            raise ValueError(f"input {tensor.name!r} has shape {dims}: only the batch dimension may be dynamic")
        if dims[0] >= 0 and batches != (dims[0],) * 3:
            raise ValueError(
                f"input {tensor.name!r} has a static batch of {dims[0]}: build with static_batch={dims[0]}"
            )
        if dims[0] < 0:
            shapes.append((tensor.name, *((b, *dims[1:]) for b in batches)))
    return shapes


def _set_precision(trt: Any, config: Any, onnx_path: Path, precision: str, tf32: bool) -> None:
    """Builder flags for ``precision``: FP16 / BF16 on TensorRT 10; on TensorRT >= 11 (strongly typed) none, and
    the graph must already hold the reduced type. TF32 is set or cleared explicitly where the flag exists."""
    if precision != "fp32":
        if _trt_major(trt) >= 11:
            if precision not in _graph_float_types(onnx_path):
                raise ValueError(
                    f"TensorRT {trt.__version__} builds strongly typed networks: {precision} needs an "
                    f"ONNX graph already in {precision} (the bundle's {GRAPH_FILES['fp16']} for fp16); "
                    f"{onnx_path.name} has no {precision} tensors"
                )
        else:
            flag = getattr(trt.BuilderFlag, precision.upper(), None)
            if flag is None:
                raise ValueError(f"TensorRT {trt.__version__} has no {precision.upper()} builder flag")
            config.set_flag(flag)
    if hasattr(trt.BuilderFlag, "TF32"):
        (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)


def build_engine(
    onnx_path: str | os.PathLike,
    engines_dir: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 16,
    fp16: bool = False,
    bf16: bool = False,
    tf32: bool = False,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    static_batch: int | None = None,
    validate: bool = True,
    num_labels: int = 1,
    num_train_timesteps: int = 1000,
    log: Callable[[str], object] = print,
) -> Path:
    """Build a TensorRT engine from ``onnx_path`` into ``engines_dir`` and return the ``.plan`` file's path.

    One optimization profile covers batch sizes ``min_batch..max_batch`` (tuned for ``opt_batch``) on every input;
    ``static_batch=N`` builds for exactly N. ``fp16`` / ``bf16`` (one at most) build a reduced-precision engine:
    pass the graph of that precision (required on TensorRT >= 11). ``tf32`` allows TF32 math in fp32 layers.
    The timing cache (default ``engines_dir/timing.cache``) is loaded when present and saved after the build, so
    rebuilding a similar engine on the same GPU is fast. External weights next to the ONNX file are found because
    the parser reads the file by path.

    ``validate`` (default on) compares the engine with ONNX Runtime on the same graph (:func:`validate_engine`;
    class labels are drawn from ``0..num_labels-1``, timesteps from ``0..num_train_timesteps-1``) before anything
    is written. The engine's build facts and validation go to ``<plan name>.json`` beside it.
    """
    if static_batch is not None:  # min/opt/max left at their defaults, or all equal to static_batch
        if (min_batch, opt_batch, max_batch) not in {(1, 1, 16), (static_batch,) * 3}:
            raise ValueError(
                f"static_batch={static_batch} contradicts min/opt/max_batch="
                f"{min_batch}/{opt_batch}/{max_batch}: give static_batch alone, or all four equal"
            )
        min_batch = opt_batch = max_batch = static_batch
    _check_batches(min_batch, opt_batch, max_batch)
    if fp16 and bf16:
        raise ValueError("choose one of fp16=True or bf16=True, not both")
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib must be positive, got {workspace_gib!r}")
    onnx_path, engines_dir = Path(onnx_path), Path(engines_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    cache_path = Path(timing_cache) if timing_cache is not None else engines_dir / "timing.cache"
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    legacy = _trt_major(trt) < 10  # TensorRT 8/9 need the explicit-batch flag; 10 and later ignore it
    network = builder.create_network(1 << int(explicit) if legacy and explicit is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  - {parser.get_error(i)}" for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}:\n{errors or '  (no parser errors recorded)'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    dynamic = _input_profile(network, (min_batch, opt_batch, max_batch))
    if dynamic:
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in dynamic:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    _set_precision(trt, config, onnx_path, precision, tf32)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    name = engine_filename(gpu_name(), trt.__version__, precision, min_batch, opt_batch, max_batch)
    log(f"building TensorRT engine {name} from {onnx_path.name} (this can take minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path} (see the messages above; "
            f"if they mention memory, raise workspace_gib={workspace_gib})"
        )
    facts: dict[str, Any] = {
        "precision": precision,
        "tf32": bool(tf32),
        "tensorrt_version": trt.__version__,
        "onnx": onnx_path.name,
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch},
    }
    if validate:
        facts["validation"] = validate_engine(
            bytes(serialized),
            onnx_path,
            "tf32" if tf32 and not fp16 and not bf16 else precision,
            batches=sorted({min_batch, opt_batch, max_batch}),
            num_labels=num_labels,
            num_train_timesteps=num_train_timesteps,
        )
        log(
            f"  engine max error {facts['validation']['max_error']:.2e} against ONNX Runtime "
            f"(tolerance {facts['validation']['tolerance']:g})"
        )
    out = engines_dir / name
    atomic_write_bytes(out, bytes(serialized))
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(facts, indent=2) + "\n").encode())
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); timing cache {cache_path}")
    return out


def _engine_inputs(
    names: Sequence[str],
    sample_shape: Sequence[int],
    batch: int,
    rng: np.random.Generator,
    num_labels: int,
    num_train_timesteps: int,
) -> dict[str, np.ndarray]:
    """Random inputs for one validation batch: the ends of the schedule and fractional timesteps between."""
    t = rng.uniform(0, num_train_timesteps - 1, batch).astype(np.float32)
    t[0] = 0.0
    if batch > 1:
        t[-1] = float(num_train_timesteps - 1)
    inputs = {"sample": rng.standard_normal((batch, *sample_shape)).astype(np.float32), "timestep": t}
    if "class_labels" in names:
        inputs["class_labels"] = rng.integers(0, max(1, num_labels), batch).astype(np.int64)
    return inputs


def validate_engine(
    engine: bytes | str | os.PathLike,
    onnx_path: str | os.PathLike,
    precision: str = "fp32",
    *,
    batches: Sequence[int] = (1, 2),
    num_labels: int = 1,
    num_train_timesteps: int = 1000,
    tolerance: float | None = None,
    seed: int = 0,
    device_id: int = 0,
) -> dict[str, Any]:
    """Run ``engine`` (bytes or a ``.plan`` path) and ONNX Runtime's CPU provider over ``onnx_path`` on the same
    random inputs; return the errors, or raise ``ValidationError`` when one exceeds the tolerance.

    ``precision`` ("fp32", "tf32", "fp16", "bf16") picks the tolerance from :data:`ENGINE_TOLERANCES` unless
    ``tolerance`` is given. The error of a batch is ``relative_error(engine, onnxruntime)``; a non-finite engine
    output counts as an infinite error.
    """
    from deploy_diff.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from deploy_diff.runtime.backends.tensorrt import TensorRTRunner

    from .validate import ValidationError

    tol = ENGINE_TOLERANCES[precision] if tolerance is None else float(tolerance)
    rng = np.random.default_rng(seed)
    cases = []
    with OnnxRuntimeRunner(onnx_path) as reference, TensorRTRunner(engine, device_id=device_id) as runner:
        if set(runner.input_names) != set(reference.input_names):
            raise ValidationError(
                f"the engine's inputs {list(runner.input_names)} differ from the graph's {list(reference.input_names)}"
            )
        for batch in batches:
            inputs = _engine_inputs(
                reference.input_names, runner.sample_shape, int(batch), rng, num_labels, num_train_timesteps
            )
            want = reference(inputs["sample"], inputs["timestep"], inputs.get("class_labels"))
            got = runner(inputs["sample"], inputs["timestep"], inputs.get("class_labels"))
            err = relative_error(got, want) if np.isfinite(got).all() else float("inf")
            cases.append(
                {"batch": int(batch), "timesteps": [round(float(v), 4) for v in inputs["timestep"]], "max_error": err}
            )
    worst = max(cases, key=lambda c: c["max_error"])
    report = {
        "metric": "max|engine - onnxruntime| / max(1, max|onnxruntime|)",
        "reference": "onnxruntime CPUExecutionProvider",
        "tolerance": tol,
        "max_error": worst["max_error"],
        "cases": cases,
    }
    if not worst["max_error"] <= tol:
        raise ValidationError(
            f"engine validation failed: the {precision} engine differs from ONNX Runtime by "
            f"{worst['max_error']:.3g} (tolerance {tol:g}) at batch {worst['batch']}, timesteps "
            f"{worst['timesteps']}; the engine was discarded"
        )
    return report


def build_bundle_engine(
    staging: str | os.PathLike,
    *,
    fp16: bool = False,
    static_batch: int | None = None,
    max_batch: int = 16,
    tf32: bool = False,
    num_labels: int = 1,
    num_train_timesteps: int = 1000,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Build, validate and write the engine of a bundle being exported into ``staging/engines/``; return its
    manifest entry (``file``, ``precision``, ``tensorrt_version``, ``tf32``, ``validation``).

    The engine is built from the graph of its precision (``unet.fp16.onnx`` when ``fp16``, else ``unet.onnx``),
    which export wrote and validated into ``staging`` already.
    """
    staging = Path(staging)
    graph = staging / GRAPH_FILES["fp16" if fp16 else "fp32"]
    sb = static_batch
    plan = build_engine(
        graph,
        staging / "engines",
        min_batch=sb or 1,
        opt_batch=sb or 1,
        max_batch=sb or max_batch,
        fp16=fp16,
        tf32=tf32,
        static_batch=sb,
        num_labels=num_labels,
        num_train_timesteps=num_train_timesteps,
        log=log,
    )
    facts = json.loads(plan.with_suffix(".json").read_text(encoding="utf-8"))
    return {
        "file": plan.relative_to(staging).as_posix(),
        "precision": facts["precision"],
        "tensorrt_version": facts["tensorrt_version"],
        "tf32": facts["tf32"],
        "validation": facts.get("validation"),
    }
