"""The TensorRT backend: :func:`load_engine` deserializes an engine (``.plan``), :class:`TensorRTRunner` runs it.

The runner follows :mod:`.base` (call contract, input check, batching): batches larger than the engine's
optimization profile allows are split into chunks, smaller ones padded. Device buffers are allocated once, for
the largest batch, and reused; one execution context serves every call, so calls are serialised by a lock.

``tensorrt`` and ``cuda-python`` are imported when an engine is loaded: importing this module needs numpy only.
Written against the TensorRT 10/11 Python API (name-based I/O: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-python's runtime bindings (every call returns ``(err, *results)``; cuda-python
>= 12.6 as ``cuda.bindings.runtime``, older as ``cuda.cudart``).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendUnavailableError, Runner, graph_layout, import_backend_module, run_in_batches

__all__ = [
    "BackendUnavailableError",
    "TensorRTEngine",
    "TensorRTRunner",
    "engine_precision",
    "load_engine",
    "stream_handle",
]

_INSTALL_HINT = "pip install tensorrt cuda-python (needs an NVIDIA GPU and driver)"


_ENGINE_PRECISION = re.compile(r"_(fp32|fp16|bf16)_b\d+-\d+-\d+\.plan$")


def engine_precision(path: str | os.PathLike) -> str | None:
    """The precision an engine file's name states (``..._trt10.3.0_fp16_b1-8-64.plan`` -> ``"fp16"``), or None."""
    match = _ENGINE_PRECISION.search(Path(path).name)
    return match.group(1) if match else None


def _import_backend() -> tuple[Any, Any]:
    """Return ``(tensorrt, cudart)`` or raise :class:`BackendUnavailableError`."""
    trt = import_backend_module("tensorrt", f"the TensorRT backend needs TensorRT: {_INSTALL_HINT}")
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise BackendUnavailableError(f"the TensorRT backend needs cuda-python: {_INSTALL_HINT}") from e
    return trt, cudart


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` address of a cuda-python stream object, as an int.

    cuda-python 13 deprecates ``int(stream)`` in favour of ``cuda.bindings.utils.get_cuda_native_handle``; 12.x
    before that accessor existed (and plain ints) take ``int()``.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    try:
        return int(get_cuda_native_handle(stream))
    except TypeError:  # not a cuda-python object (an int handle already)
        return int(stream)


def cuda_check(cudart: Any, result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple: the value (or a tuple of values, or None), raising
    ``RuntimeError`` with CUDA's description on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        text = cudart.cudaGetErrorString(err)
        text = text[-1] if isinstance(text, tuple) else text
        raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@dataclass
class TensorRTEngine:
    """A deserialized engine with what keeps it alive (its runtime and logger) and the modules that run it."""

    engine: Any
    runtime: Any
    logger: Any
    trt: Any
    cudart: Any
    device_id: int
    source: str


def load_engine(engine: str | os.PathLike | bytes, device_id: int = 0) -> TensorRTEngine:
    """Deserialize an engine (a ``.plan`` path or its bytes) on GPU ``device_id``.

    Raises :class:`BackendUnavailableError` without tensorrt / cuda-python, ``RuntimeError`` when TensorRT
    refuses the engine (built for another GPU or TensorRT version).
    """
    trt, cudart = _import_backend()
    device_id = int(device_id)
    cuda_check(cudart, cudart.cudaSetDevice(device_id))
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if isinstance(engine, bytes | bytearray | memoryview):
        data, source = bytes(engine), "the engine bytes"
    else:
        with open(engine, "rb") as f:
            data, source = f.read(), str(engine)
    deserialized = runtime.deserialize_cuda_engine(data)
    if deserialized is None:
        raise RuntimeError(f"TensorRT could not load {source}: built for another GPU or TensorRT version?")
    return TensorRTEngine(deserialized, runtime, logger, trt, cudart, device_id, source)


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    table = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT32: np.int32,
        trt.DataType.INT64: np.int64,
        trt.DataType.BOOL: np.bool_,
    }
    if dtype not in table:
        raise ValueError(f"engine tensor type {dtype} is not supported (float32, float16, int32, int64, bool)")
    return np.dtype(table[dtype])


class TensorRTRunner(Runner):
    """Run a TensorRT engine on one GPU (see the module docstring and :mod:`.base`).

    Args:
        engine_path: a ``.plan`` path, its bytes, or a :class:`TensorRTEngine` from :func:`load_engine`.
        device_id: the GPU (ignored for a loaded :class:`TensorRTEngine`, which knows its own).
        precision: what the engine computes in (``runner.precision``); default: what the file name states
            (:func:`engine_precision`), else ``"fp32"``.
        unet: the engine is a UNet of the runner protocol (checked: its inputs, one output, only the batch
            dimension dynamic); False: any engine (dynamic dimensions within optimization profile 0, several
            outputs, the first returned), called with ``runner.run({name: array})``.

    Attributes besides the runner protocol: ``output_name``, ``min_batch`` / ``max_batch`` (profile 0),
    ``profile`` (per input: its (min, max) shapes in profile 0).
    """

    def __init__(
        self,
        engine_path: str | os.PathLike | bytes | TensorRTEngine,
        device_id: int = 0,
        precision: str | None = None,
        unet: bool = True,
    ):
        engine = engine_path
        named = engine_precision(engine) if isinstance(engine, (str, os.PathLike)) else None
        self.precision = precision or named or "fp32"
        self._buffers: dict[str, int] = {}
        self._stream = None
        self._context = None
        self._lock = threading.Lock()
        loaded = engine if isinstance(engine, TensorRTEngine) else load_engine(engine, device_id)
        self._loaded, self._cudart, trt, eng = loaded, loaded.cudart, loaded.trt, loaded.engine
        self.unet = bool(unet)
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        self.input_names = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.input_names]
        if self.unet and "out" not in outputs and len(outputs) != 1:
            raise ValueError(f"engine outputs {outputs}: expected one named 'out'")
        if not outputs:
            raise ValueError("the engine has no output")
        self.output_name = "out" if "out" in outputs else outputs[0]
        self._dtypes = {n: _numpy_dtype(trt, eng.get_tensor_dtype(n)) for n in names}
        self.profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for n in self.input_names:
            shape = tuple(int(d) for d in eng.get_tensor_shape(n))
            if not shape or (self.unet and any(d < 0 for d in shape[1:])):
                raise ValueError(f"engine input {n!r} has shape {shape}: only the batch dimension may be dynamic")
            if any(d < 0 for d in shape):
                low, _, high = (tuple(int(d) for d in s) for s in eng.get_tensor_profile_shape(n, 0))
            else:
                low = high = shape
            self.profile[n] = (low, high)
        self.input_shapes = {n: tuple(None if d < 0 else d for d in eng.get_tensor_shape(n)) for n in self.input_names}
        lo = max([1] + [low[0] for low, _ in self.profile.values()])
        hi = min(high[0] for _, high in self.profile.values()) if self.profile else None
        if hi is None or lo > hi:
            raise ValueError(f"engine inputs allow no common batch size (min {lo}, max {hi})")
        self.min_batch, self.max_batch = int(lo), int(hi)
        self.static_batch = self.min_batch if self.min_batch == self.max_batch else None
        self.sample_shape, _ = graph_layout(self.input_shapes, self.unet, "the engine")
        self._allocate(names)

    def _allocate(self, names: list[str]) -> None:
        """The execution context, the stream, and device buffers sized for the largest batch."""
        cudart = self._cudart
        self._context = self._loaded.engine.create_execution_context()
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate())
        self._stream_ptr = stream_handle(self._stream)
        largest = {n: (self.max_batch, *high[1:]) for n, (_, high) in self.profile.items()}
        for n in self.input_names:
            self._set_shape(n, largest[n])
        for n in names:  # inputs sized from the profile, outputs as TensorRT infers them for the largest inputs
            shape = largest[n] if n in largest else self._context.get_tensor_shape(n)
            nbytes = int(np.prod(tuple(shape), dtype=np.int64)) * self._dtypes[n].itemsize
            self._buffers[n] = cuda_check(cudart, cudart.cudaMalloc(max(nbytes, 1)))
            if not self._context.set_tensor_address(n, int(self._buffers[n])):
                raise RuntimeError(f"TensorRT refused the device buffer for {n!r}")

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise RuntimeError(f"TensorRT refused shape {tuple(shape)} for input {name!r}")

    def _execute(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        for name, a in arrays.items():  # the batch is chunked below; every other size must lie in the profile
            low, high = self.profile[name]
            if any(not lo <= d <= hi for d, lo, hi in zip(a.shape[1:], low[1:], high[1:])):
                raise ValueError(
                    f"the engine takes input {name!r} of shape [B, ...] from {list(low[1:])} to {list(high[1:])} "
                    f"(its optimization profile); got {a.shape}"
                )
        with self._lock:
            if self._context is None:
                raise RuntimeError("this TensorRTRunner was closed")
            cuda_check(self._cudart, self._cudart.cudaSetDevice(self._loaded.device_id))
            return run_in_batches(self._run, arrays, min_batch=self.min_batch, max_batch=self.max_batch)

    def _run(self, chunk: dict[str, np.ndarray]) -> np.ndarray:
        """One execution for a chunk of ``min_batch..max_batch`` rows (the caller holds the lock)."""
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in chunk.items():
            arr = np.ascontiguousarray(arr)
            chunk[name] = arr  # the host copy stays alive until the stream is synchronised
            self._set_shape(name, arr.shape)
            cuda_check(
                cudart, cudart.cudaMemcpyAsync(self._buffers[name], arr.ctypes.data, arr.nbytes, h2d, self._stream)
            )
        if not self._context.execute_async_v3(self._stream_ptr):
            raise RuntimeError("TensorRT execution failed (see the messages above)")
        out = np.empty(tuple(self._context.get_tensor_shape(self.output_name)), dtype=self._dtypes[self.output_name])
        cuda_check(
            cudart,
            cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[self.output_name], out.nbytes, d2h, self._stream),
        )
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream))
        return out

    def _release(self) -> None:
        with self._lock:  # not while a call is running
            cudart = self._cudart
            for ptr in self._buffers.values():
                cudart.cudaFree(ptr)
            self._buffers = {}
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._context = None

    def __del__(self):
        try:
            if getattr(self, "_lock", None) is not None and getattr(self, "_cudart", None) is not None:
                self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
