"""ONNX Runtime backend: one runner over an ``InferenceSession``.

``OnnxRuntimeRunner(graph)(sample float32[B,C,H,W], timestep float32[B], class_labels int64[B] | None)
-> float32[B,C_out,H,W]``, the runtime's runner interface. The runner owns batching: a batch larger than a
static-batch graph is split into chunks, a smaller one padded (and the padding dropped from the output).

CPU: ``session.run`` (thread-safe: one runner serves several threads at once). CUDA: IO binding into
device-resident output buffers; with ``cuda_graph=True`` (static-batch graphs only) the first call captures a
CUDA graph over fixed input/output buffers and later calls replay it. ONNX Runtime keeps captured graphs per
thread, so capture and replays all run on one worker thread owned by the runner: calls from any number of
threads are queued there, one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxRuntimeRunner", "default_providers"]

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(double)": np.float64}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX Runtime backend needs onnxruntime: pip install 'deploy-diff[cpu]' "
                          "(or '[gpu]' for onnxruntime-gpu)") from None
    return onnxruntime


def default_providers(device: str, device_id: int = 0) -> list:
    """Execution providers for ``device`` ("cpu" or "cuda[:N]")."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        return [("CUDAExecutionProvider", {"device_id": str(device_id)}), "CPUExecutionProvider"]
    raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'); got {device!r}")


class OnnxRuntimeRunner:
    """A runner over one ONNX graph (see the module docstring).

    Args:
        graph: path of the ``.onnx`` file (external data beside it is found automatically).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; ignored when ``providers`` is given.
        providers: explicit ONNX Runtime providers (names or ``(name, options)`` pairs).
        num_threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
        cuda_graph: capture a CUDA graph on the first call (CUDA, static-batch graphs only).
        graph_optimization_level: ``"all"`` (default; export validated the graph at this level), ``"extended"``,
            ``"basic"`` or ``"disabled"``.
    """

    def __init__(self, graph: str | os.PathLike, device: str = "cpu", providers: Sequence[Any] | None = None,
                 num_threads: int | None = None, cuda_graph: bool = False, graph_optimization_level: str = "all"):
        ort = _import_ort()
        self.path = Path(graph)
        device = str(device)
        device_id = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        providers = default_providers(device, device_id) if providers is None else list(providers)
        for i, p in enumerate(providers):  # cuda_graph and the device id live in the CUDA provider's options
            name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
            if name == "CUDAExecutionProvider":
                if cuda_graph:
                    opts["enable_cuda_graph"] = "1"
                device_id = int(opts.get("device_id", device_id))
                providers[i] = (name, opts)
        names = [p if isinstance(p, str) else p[0] for p in providers]
        available = ort.get_available_providers()
        missing = [n for n in names if n not in available]
        if missing:
            hint = " (install onnxruntime-gpu: pip install 'deploy-diff[gpu]')" if "CUDAExecutionProvider" in missing \
                else ""
            raise RuntimeError(f"ONNX Runtime provider(s) {missing} are not available{hint}; available: {available}")
        self.on_cuda = names[0] == "CUDAExecutionProvider"
        self.device_id = device_id
        if cuda_graph and not self.on_cuda:
            raise ValueError("cuda_graph=True needs the CUDA execution provider (device='cuda')")
        if num_threads is not None and (isinstance(num_threads, bool) or int(num_threads) < 1):
            raise ValueError(f"num_threads must be a positive integer or None; got {num_threads!r}")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if graph_optimization_level not in levels:
            raise ValueError(f"graph_optimization_level must be one of {sorted(levels)}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[graph_optimization_level]
        opts.log_severity_level = 3
        if num_threads is not None:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX graph at {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own types (Fail, InvalidProtobuf, ...) for bad graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"ONNX Runtime cannot load {self.path} (truncated, not an ONNX graph, or made for "
                             f"a newer ONNX Runtime?): {first}") from None
        active = self.session.get_providers()
        if self.on_cuda and (not active or active[0] != "CUDAExecutionProvider"):
            raise RuntimeError(f"ONNX Runtime could not start the CUDA provider (the session fell back to {active}); "
                               "check the CUDA/cuDNN libraries onnxruntime-gpu needs (onnxruntime.preload_dlls() "
                               "can load those of an installed torch)")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._in_types = {i.name: _DTYPES.get(i.type) for i in self.session.get_inputs()}
        self._in_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self._out_shape = list(out.shape)
        if "sample" not in self.input_names or "timestep" not in self.input_names:
            raise ValueError(f"{self.path.name} has inputs {list(self.input_names)}; a UNet graph needs `sample` and "
                             "`timestep` (and `class_labels` when class-conditional)")
        batch = self._in_shapes["sample"][0]
        self.static_batch = batch if isinstance(batch, int) and batch > 0 else None
        if cuda_graph and self.static_batch is None:
            raise ValueError("cuda_graph=True needs a static-batch bundle (export with --static-batch B): a dynamic "
                             "batch puts shape computations on the CPU, which blocks capture")
        self.cuda_graph = cuda_graph
        self.conditional = "class_labels" in self.input_names
        self._bound: dict[str, Any] | None = None  # fixed device buffers of the CUDA graph
        # ONNX Runtime keeps a captured CUDA graph per thread: capture and every replay run on one worker thread,
        # which also serialises the calls that share the fixed buffers
        self._graph_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-cuda-graph") \
            if cuda_graph else None

    @classmethod
    def from_bundle(cls, bundle, precision: str = "fp32", **kwargs) -> OnnxRuntimeRunner:
        return cls(bundle.graph_path(precision), **kwargs)

    @property
    def sample_shape(self) -> tuple:
        """(C, H, W) the graph takes (entries are None where the graph leaves them symbolic)."""
        return tuple(d if isinstance(d, int) else None for d in self._in_shapes["sample"][1:])

    # -- input checks ---------------------------------------------------------------------------------------
    def _prepare(self, sample: Any, timestep: Any, class_labels: Any) -> dict[str, np.ndarray]:
        sample = np.asarray(sample)
        if sample.ndim != 4:
            raise ValueError(f"sample must be a [B, C, H, W] array; got shape {sample.shape}")
        expected = self.sample_shape
        if any(e is not None and e != s for e, s in zip(expected, sample.shape[1:])):
            raise ValueError(f"sample has shape {sample.shape}; this model takes [B, {', '.join(map(str, expected))}]")
        if sample.dtype.kind != "f":
            raise ValueError(f"sample must be a float array; got dtype {sample.dtype}")
        b = sample.shape[0]
        timestep = np.asarray(timestep)
        if timestep.ndim == 0:
            timestep = np.full((b,), timestep)
        if timestep.shape != (b,):
            raise ValueError(f"timestep must have shape [{b}] (one per image) or be a scalar; got {timestep.shape}")
        if timestep.dtype.kind not in "fiu":
            raise ValueError(f"timestep must be numeric; got dtype {timestep.dtype}")
        feeds = {"sample": np.ascontiguousarray(sample, dtype=self._in_types["sample"] or np.float32),
                 "timestep": np.ascontiguousarray(timestep, dtype=self._in_types["timestep"] or np.float32)}
        if self.conditional:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels int64[B]")
            labels = np.asarray(class_labels)
            if labels.shape != (b,) or labels.dtype.kind not in "iu":
                raise ValueError(f"class_labels must be an integer array of shape [{b}]; got {labels.dtype} "
                                 f"{labels.shape}")
            feeds["class_labels"] = np.ascontiguousarray(labels, dtype=self._in_types["class_labels"] or np.int64)
        elif class_labels is not None:
            raise ValueError("this model is unconditional: class_labels must be None")
        return feeds

    # -- execution ------------------------------------------------------------------------------------------
    def __call__(self, sample: Any, timestep: Any, class_labels: Any = None) -> np.ndarray:
        feeds = self._prepare(sample, timestep, class_labels)
        b = feeds["sample"].shape[0]
        sb = self.static_batch
        if sb is None or b == sb:
            return self._run(feeds)
        outs = []
        for start in range(0, b, sb):
            chunk = {k: v[start:start + sb] for k, v in feeds.items()}
            n = chunk["sample"].shape[0]
            if n < sb:  # pad by repeating the last row; the padding's outputs are dropped
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], sb - n, axis=0)]) for k, v in chunk.items()}
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self.on_cuda:
            out = self.session.run([self.output_name], feeds)[0]
        elif self._graph_thread is not None:
            out = self._graph_thread.submit(self._run_cuda_graph, feeds).result()
        else:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(self.output_name, "cuda", self.device_id)
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def _run_cuda_graph(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ort = _import_ort()
        if self._bound is None:
            bound: dict[str, Any] = {}
            binding = self.session.io_binding()
            for name, value in feeds.items():
                bound[name] = ort.OrtValue.ortvalue_from_numpy(value, "cuda", self.device_id)
                binding.bind_ortvalue_input(name, bound[name])
            shape = [self.static_batch] + [int(d) for d in self._out_shape[1:]]
            bound[self.output_name] = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, np.float32 if self.session.get_outputs()[0].type == "tensor(float)" else np.float16,
                "cuda", self.device_id)
            binding.bind_ortvalue_output(self.output_name, bound[self.output_name])
            bound["_binding"] = binding
            self._bound = bound
        else:
            for name, value in feeds.items():
                self._bound[name].update_inplace(value)
        self.session.run_with_iobinding(self._bound["_binding"])
        return self._bound[self.output_name].numpy()
