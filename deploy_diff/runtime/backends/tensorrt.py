"""The TensorRT backend: a serialized engine (``.plan``) behind the runtime's runner interface.

``runner(sample float32[B,C,H,W], timestep float32[B], class_labels int64[B] | None) -> float32[B,C_out,H,W]``.
Batches larger than the engine's profile allows are split into chunks, smaller ones padded (the last row
repeated) and the output cropped. Device buffers are allocated once, for the largest batch, and reused; one
execution context serves every call, so calls are serialised by a lock.

``tensorrt`` and ``cuda-python`` are imported lazily, in the constructor: importing this module needs numpy only.
Written against the TensorRT 10 Python API (name-based I/O: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-python's runtime bindings (every call returns ``(err, *results)``).
"""

from __future__ import annotations

import threading

import numpy as np

_INSTALL_HINT = "pip install tensorrt cuda-python (needs an NVIDIA GPU and driver)"


class BackendUnavailableError(RuntimeError):
    """A backend's libraries (here ``tensorrt`` and ``cuda-python``) cannot be imported."""


def _import_backend():
    """Return ``(tensorrt, cudart)`` or raise :class:`BackendUnavailableError`."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(f"the TensorRT backend needs TensorRT: {_INSTALL_HINT}") from e
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise BackendUnavailableError(f"the TensorRT backend needs cuda-python: {_INSTALL_HINT}") from e
    return trt, cudart


class TensorRTRunner:
    """Run a TensorRT engine file on GPU ``device_id``. See the module docstring for the call contract.

    Attributes: ``input_names`` (engine order), ``output_name``, ``min_batch`` / ``max_batch`` (profile 0),
    ``static_batch`` (the batch size when min == max, else None).
    """

    def __init__(self, engine_path, device_id: int = 0):
        self._buffers: dict[str, int] = {}
        self._stream = None
        trt, self._cudart = _import_backend()
        self._device_id = int(device_id)
        self._check(self._cudart.cudaSetDevice(self._device_id))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(engine_path, "rb") as f:
            self._engine = self._runtime.deserialize_cuda_engine(f.read())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path}: built for another GPU or TensorRT version?")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.input_names]
        if "out" not in outputs and len(outputs) != 1:
            raise ValueError(f"engine outputs {outputs}: expected one named 'out'")
        self.output_name = "out" if "out" in outputs else outputs[0]
        self._dtypes = {n: self._numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._trailing: dict[str, tuple[int, ...]] = {}
        lo, hi = 1, None
        for n in self.input_names:
            shape = tuple(engine.get_tensor_shape(n))
            if not shape or any(d < 0 for d in shape[1:]):
                raise ValueError(f"engine input {n!r} has shape {shape}: only the batch dimension may be dynamic")
            self._trailing[n] = shape[1:]
            if shape[0] >= 0:  # static batch
                n_lo = n_hi = shape[0]
            else:
                n_lo, _, n_hi = (tuple(s)[0] for s in engine.get_tensor_profile_shape(n, 0))
            lo, hi = max(lo, n_lo), n_hi if hi is None else min(hi, n_hi)
        if hi is None or lo > hi:
            raise ValueError(f"engine inputs allow no common batch size (min {lo}, max {hi})")
        self.min_batch, self.max_batch = int(lo), int(hi)
        self.static_batch = self.min_batch if self.min_batch == self.max_batch else None

        self._context = engine.create_execution_context()
        self._stream = self._check(self._cudart.cudaStreamCreate())
        for n in self.input_names:
            self._set_shape(n, self.max_batch)
        for n in names:  # size every buffer for the largest batch: inputs from the profile, outputs as inferred
            shape = (self.max_batch, *self._trailing[n]) if n in self._trailing else self._context.get_tensor_shape(n)
            nbytes = int(np.prod(tuple(shape), dtype=np.int64)) * self._dtypes[n].itemsize
            self._buffers[n] = self._check(self._cudart.cudaMalloc(max(nbytes, 1)))
            if not self._context.set_tensor_address(n, int(self._buffers[n])):
                raise RuntimeError(f"TensorRT refused the device buffer for {n!r}")
        self._lock = threading.Lock()

    @staticmethod
    def _numpy_dtype(trt, dtype) -> np.dtype:
        table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
                 trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_}
        if dtype not in table:
            raise ValueError(f"engine tensor type {dtype} is not supported (float32, float16, int32, int64, bool)")
        return np.dtype(table[dtype])

    def _check(self, result):
        """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            text = self._cudart.cudaGetErrorString(err)
            text = text[-1] if isinstance(text, tuple) else text
            raise RuntimeError(f"CUDA error {err}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _set_shape(self, name: str, batch: int) -> None:
        if not self._context.set_input_shape(name, (batch, *self._trailing[name])):
            raise RuntimeError(f"TensorRT refused batch {batch} for input {name!r}")

    def _validate(self, sample, timestep, class_labels) -> tuple[dict[str, np.ndarray], int]:
        """Host arrays by input name, cast to the engine's dtypes; raise ValueError on a mismatch."""
        if "sample" not in self._trailing:
            raise ValueError(f"engine inputs are {self.input_names}: expected 'sample' among them")
        sample = np.asarray(sample)
        if sample.ndim != 1 + len(self._trailing["sample"]):
            raise ValueError(f"sample must be [B, *{self._trailing['sample']}], got shape {sample.shape}")
        batch = sample.shape[0]
        timestep = np.asarray(timestep)
        timestep = np.broadcast_to(timestep, (batch,)) if timestep.ndim == 0 else timestep  # one t for all rows
        given = {"sample": sample, "timestep": timestep}
        if class_labels is not None:
            given["class_labels"] = np.asarray(class_labels)
        missing, extra = set(self.input_names) - set(given), set(given) - set(self.input_names)
        if missing or extra:
            raise ValueError(f"engine inputs are {self.input_names}; missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)} (class_labels is for class-conditional models only)")
        arrays = {}
        for name, arr in given.items():
            want = (batch, *self._trailing[name])
            if arr.shape != want:
                raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
            dtype = self._dtypes[name]
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise ValueError(f"{name} has dtype {arr.dtype}, which does not cast to the engine's {dtype}")
            arrays[name] = np.ascontiguousarray(arr, dtype=dtype)
        return arrays, batch

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray | None = None
                 ) -> np.ndarray:
        arrays, batch = self._validate(sample, timestep, class_labels)
        if batch == 0:
            raise ValueError("empty batch")
        with self._lock:
            if self._context is None:
                raise RuntimeError("this TensorRTRunner was closed")
            self._check(self._cudart.cudaSetDevice(self._device_id))
            outs = [self._run({k: v[i:i + self.max_batch] for k, v in arrays.items()})
                    for i in range(0, batch, self.max_batch)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def _run(self, chunk: dict[str, np.ndarray]) -> np.ndarray:
        """One execution for a chunk of at most ``max_batch`` rows, padded up to ``min_batch``."""
        cudart, n = self._cudart, len(next(iter(chunk.values())))
        size = max(n, self.min_batch)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in chunk.items():
            if size > n:
                arr = np.ascontiguousarray(np.concatenate([arr, np.repeat(arr[-1:], size - n, axis=0)]))
            chunk[name] = arr  # keep the host copy alive until the stream is synchronised
            self._set_shape(name, size)
            self._check(cudart.cudaMemcpyAsync(self._buffers[name], arr.ctypes.data, arr.nbytes, h2d, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execution failed (see the messages above)")
        out = np.empty(tuple(self._context.get_tensor_shape(self.output_name)), dtype=self._dtypes[self.output_name])
        self._check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[self.output_name], out.nbytes, d2h,
                                           self._stream))
        self._check(cudart.cudaStreamSynchronize(self._stream))
        return out[:n]

    def close(self) -> None:
        """Free the device buffers and the stream; the runner cannot be called afterwards."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        lock = getattr(self, "_lock", None)
        if lock is not None:  # not while a call is running
            with lock:
                self._free(cudart)
        else:
            self._free(cudart)

    def _free(self, cudart) -> None:
        for ptr in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
