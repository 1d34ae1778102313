"""Build TensorRT engines (``.plan`` files) from a bundle's ONNX graph.

An engine is specific to one GPU model and one TensorRT version, so its file name says both, plus the precision
and the batch range of its optimization profile: ``nvidia-h100-80gb-hbm3_trt10.3.0_fp16_b1-8-64.plan``.

``tensorrt`` is imported lazily: this module imports (and validates arguments) without it. Written against the
TensorRT 10 Python API (``Builder``, ``OnnxParser.parse_from_file``, ``IBuilderConfig``, one
``IOptimizationProfile`` over the batch dimension, ``build_serialized_network``).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from deploy_diff.runtime._fileio import atomic_write_bytes

_INSTALL_HINT = "pip install tensorrt (needs an NVIDIA GPU and driver); the ONNX bundle works without it"


class TensorRTUnavailableError(RuntimeError):
    """TensorRT's Python package cannot be imported."""


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise :class:`TensorRTUnavailableError` saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:  # also raised when sys.modules["tensorrt"] is None
        raise TensorRTUnavailableError(f"TensorRT is not installed: {_INSTALL_HINT}") from e
    return tensorrt


def _slug(text: str) -> str:
    """Lowercase; every run of characters other than [a-z0-9] becomes one '-'; no leading/trailing '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (min_batch, opt_batch, max_batch)):
        raise ValueError(f"batch sizes must be integers, got {min_batch!r}, {opt_batch!r}, {max_batch!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")


def engine_filename(gpu_name: str, trt_version: str, precision: str, min_batch: int, opt_batch: int,
                    max_batch: int) -> str:
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
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
                             capture_output=True, text=True, timeout=30)
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and lines:
            return lines[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "gpu"


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
            raise ValueError(f"input {tensor.name!r} has a static batch of {dims[0]}: "
                             f"build with static_batch={dims[0]}")
        if dims[0] < 0:
            shapes.append((tensor.name, *((b, *dims[1:]) for b in batches)))
    return shapes


def build_engine(onnx_path: str | os.PathLike, engines_dir: str | os.PathLike, *, min_batch: int = 1,
                 opt_batch: int = 1, max_batch: int = 16, fp16: bool = False, bf16: bool = False,
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float = 4.0,
                 static_batch: int | None = None, log: Callable[[str], object] = print) -> Path:
    """Build a TensorRT engine from ``onnx_path`` into ``engines_dir`` and return the ``.plan`` file's path.

    One optimization profile covers batch sizes ``min_batch..max_batch`` (tuned for ``opt_batch``) on every input;
    ``static_batch=N`` builds for exactly N. ``fp16`` / ``bf16`` allow reduced-precision kernels (one of them at
    most). The timing cache (default ``engines_dir/timing.cache``) is loaded when present and saved after the
    build, so rebuilding a similar engine on the same GPU is fast. External weights next to the ONNX file are
    found because the parser reads the file by path.
    """
    if static_batch is not None:  # min/opt/max left at their defaults, or all equal to static_batch
        if (min_batch, opt_batch, max_batch) not in {(1, 1, 16), (static_batch,) * 3}:
            raise ValueError(f"static_batch={static_batch} contradicts min/opt/max_batch="
                             f"{min_batch}/{opt_batch}/{max_batch}: give static_batch alone, or all four equal")
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
    legacy = int(trt.__version__.split(".")[0]) < 10  # TensorRT 8/9 need the explicit-batch flag; 10 ignores it
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
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise ValueError(f"TensorRT {trt.__version__} has no BF16 builder flag (needs TensorRT >= 9)")
        config.set_flag(trt.BuilderFlag.BF16)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    name = engine_filename(gpu_name(), trt.__version__, precision, min_batch, opt_batch, max_batch)
    log(f"building TensorRT engine {name} from {onnx_path.name} (this can take minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the messages above; "
                           f"if they mention memory, raise workspace_gib={workspace_gib})")
    out = engines_dir / name
    atomic_write_bytes(out, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); timing cache {cache_path}")
    return out
