"""The ONNX Runtime backend: :func:`load_session` builds an ``InferenceSession``, :class:`OnnxRuntimeRunner` runs it.

The runner follows :mod:`.base` (call contract, input check, batching). CPU: ``session.run``, which is
thread-safe, so one runner serves several threads at once. CUDA: IO binding into device-resident output buffers;
with ``cuda_graph=True`` (static-batch graphs only) the first call captures a CUDA graph over fixed input/output
buffers and later calls replay it. ONNX Runtime keeps captured graphs per thread, so capture and replays all run
on one worker thread owned by the runner, which also queues calls from any number of threads.

A CUDA session never falls back to the CPU silently: it is created with ``enable_fallback=0``, so an error of the
CUDA provider (a CUDA graph it cannot capture, a missing library) is raised with its own message.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import Runner, check_num_threads, graph_layout, import_backend_module, parse_device, run_in_batches

__all__ = ["OnnxRuntimeRunner", "default_providers", "load_session", "preload_cuda_libraries"]

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}
_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}
# the order in which nvidia wheels' library folders are preloaded: dependencies first
_NVIDIA_ORDER = ("cuda_runtime", "cuda_nvrtc", "nvjitlink", "cublas", "curand", "cufft", "cudnn")
_preloaded: set[str] = set()


def _import_ort():
    return import_backend_module(
        "onnxruntime",
        "the ONNX Runtime backend needs onnxruntime: pip install 'deploy-diff[cpu]' (or '[gpu]' for onnxruntime-gpu)",
    )


def default_providers(device: str, device_id: int | None = None) -> list:
    """Execution providers for ``device`` ("cpu", "cuda" or "cuda:N"); ``device_id`` overrides N."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    return [
        ("CUDAExecutionProvider", {"device_id": str(index if device_id is None else int(device_id))}),
        "CPUExecutionProvider",
    ]


def _foreign_nvidia_lib_dirs(ort: Any) -> list[Path]:
    """``nvidia/*/lib`` folders of CUDA wheels installed outside onnxruntime's own site-packages (for example with
    ``pip install --target DIR``), dependencies first. ``onnxruntime.preload_dlls()`` searches only its own."""
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return []
    own = Path(ort.__file__).resolve().parent.parent
    dirs = [
        lib
        for root in getattr(nvidia, "__path__", [])
        if Path(root).resolve().parent != own
        for lib in sorted(Path(root).glob("*/lib"))
        if lib.is_dir()
    ]
    rank = {name: i for i, name in enumerate(_NVIDIA_ORDER)}
    return sorted(dirs, key=lambda d: rank.get(d.parent.name, len(rank)))


def preload_cuda_libraries(directories: Sequence[str | os.PathLike] | None = None) -> str:
    """Load CUDA / cuDNN libraries for onnxruntime-gpu from ``directories`` (default: the ``nvidia/*/lib`` folders
    of CUDA wheels installed outside onnxruntime's site-packages); return what ``preload_dlls`` printed.

    ``onnxruntime.preload_dlls(directory=...)`` loads the libraries found directly in ``directory``; it is called
    once per folder, before the first CUDA session. A folder already loaded is skipped. Without ``preload_dlls``
    (onnxruntime < 1.21) or without such folders, nothing is done.
    """
    ort = _import_ort()
    if not hasattr(ort, "preload_dlls"):
        return ""
    dirs = [Path(d) for d in directories] if directories is not None else _foreign_nvidia_lib_dirs(ort)
    printed = io.StringIO()
    for d in dirs:
        if str(d) in _preloaded:
            continue
        if not d.is_dir():
            raise FileNotFoundError(f"no CUDA library folder at {d}")
        with contextlib.redirect_stdout(printed):  # it prints each library it could not load
            ort.preload_dlls(directory=str(d))
        _preloaded.add(str(d))
    return printed.getvalue().strip()


def _cuda_options(providers: list, cuda_graph: bool) -> tuple[list, int | None]:
    """Providers with ``enable_cuda_graph`` added to the CUDA provider's options; the CUDA device id (None
    without the CUDA provider)."""
    out, device_id = [], None
    for p in providers:
        name, opts = (p, {}) if isinstance(p, str) else (p[0], dict(p[1]))
        if name == "CUDAExecutionProvider":
            if cuda_graph:
                opts["enable_cuda_graph"] = "1"
            device_id = int(opts.get("device_id", 0))
            p = (name, opts)
        out.append(p)
    return out, device_id


def load_session(
    graph: str | os.PathLike,
    device: str = "cpu",
    providers: Sequence[Any] | None = None,
    num_threads: int | None = None,
    cuda_graph: bool = False,
    graph_optimization_level: str = "all",
) -> Any:
    """An ``onnxruntime.InferenceSession`` over ``graph``, with the arguments :class:`OnnxRuntimeRunner` takes.

    Raises ``ValueError`` for bad arguments or a graph ONNX Runtime cannot load, ``RuntimeError`` when a
    requested provider is missing or does not start, :class:`~.base.BackendUnavailableError` without onnxruntime.
    """
    ort = _import_ort()
    path = Path(graph)
    if providers is None:
        providers = default_providers(device)
    else:
        parse_device(device)
    providers, _ = _cuda_options(list(providers), cuda_graph)
    names = [p if isinstance(p, str) else p[0] for p in providers]
    on_cuda = bool(names) and names[0] == "CUDAExecutionProvider"
    if cuda_graph and not on_cuda:
        raise ValueError("cuda_graph=True needs the CUDA execution provider (device='cuda')")
    num_threads = check_num_threads(num_threads)
    if graph_optimization_level not in _LEVELS:
        raise ValueError(f"graph_optimization_level must be one of {sorted(_LEVELS)}; got {graph_optimization_level!r}")
    preloaded = preload_cuda_libraries() if on_cuda else ""
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        hint = (
            " (install onnxruntime-gpu: pip install 'deploy-diff[gpu]')" if "CUDAExecutionProvider" in missing else ""
        )
        raise RuntimeError(f"ONNX Runtime provider(s) {missing} are not available{hint}; available: {available}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization_level])
    opts.log_severity_level = 3
    if num_threads is not None:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {path}")
    try:  # enable_fallback=0: the Python wrapper would otherwise retry on the CPU after any CUDA provider error
        session = ort.InferenceSession(str(path), opts, providers=providers, enable_fallback=0)
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidProtobuf, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if on_cuda and cuda_graph and "cuda graph" in str(e).lower():
            raise ValueError(
                f"ONNX Runtime cannot capture a CUDA graph of {path}: {first} (a CUDA graph needs every "
                "node on the CUDA provider: export_bundle(..., static_batch=B))"
            ) from None
        if on_cuda and "cuda" in str(e).lower():
            raise RuntimeError(
                f"ONNX Runtime could not start the CUDA provider for {path}: {first}"
                + (f"; loading CUDA libraries printed: {preloaded}" if preloaded else "")
            ) from None
        raise ValueError(
            f"ONNX Runtime cannot load {path} (truncated, not an ONNX graph, or made for a newer "
            f"ONNX Runtime?): {first}"
        ) from None
    active = session.get_providers()
    if on_cuda and (not active or active[0] != "CUDAExecutionProvider"):
        raise RuntimeError(
            f"ONNX Runtime could not start the CUDA provider (the session runs on {active}); check "
            "the CUDA/cuDNN libraries onnxruntime-gpu needs (preload_cuda_libraries(directories) "
            "loads them from a folder)"
        )
    return session


@dataclass
class _CudaGraphBuffers:
    """The fixed device buffers a captured CUDA graph reads and writes, and the binding that names them."""

    binding: Any
    inputs: dict[str, Any]
    output: Any


class OnnxRuntimeRunner(Runner):
    """A runner over one ONNX graph (see the module docstring and :mod:`.base`).

    Args:
        graph: path of the ``.onnx`` file (external data beside it is found automatically).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``; when ``providers`` is given they decide, and ``device``
            need only be one of these strings.
        providers: explicit ONNX Runtime providers (names or ``(name, options)`` pairs).
        num_threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
        cuda_graph: capture a CUDA graph on the first call (CUDA, static-batch graphs only).
        graph_optimization_level: ``"all"`` (default; export validated the graph at this level), ``"extended"``,
            ``"basic"`` or ``"disabled"``.
        precision: what the graph computes in (``runner.precision``), as its bundle names it: ``"fp32"`` for
            ``unet.onnx``, ``"fp16"`` for ``unet.fp16.onnx`` (default: fp16 when the graph's file name or its
            sample input says so, else fp32).
        unet: the graph is a UNet of the runner protocol (checked; ``runner(sample, timestep, class_labels)``);
            False: any graph, called with ``runner.run({name: array})``.
    """

    def __init__(self, graph: str | os.PathLike, device: str = "cpu", providers: Sequence[Any] | None = None,
                 num_threads: int | None = None, cuda_graph: bool = False,
                 graph_optimization_level: str = "all", precision: str | None = None,
                 unet: bool = True):  # fmt: skip
        self.path = Path(graph)
        if providers is None:
            providers = default_providers(device)
        self.session = load_session(
            graph,
            device=device,
            providers=providers,
            num_threads=num_threads,
            cuda_graph=cuda_graph,
            graph_optimization_level=graph_optimization_level,
        )
        _, device_id = _cuda_options(list(providers), False)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device_id = device_id or 0
        inputs = self.session.get_inputs()
        self.unet = bool(unet)
        self.input_names = tuple(i.name for i in inputs)
        self.input_shapes = {
            i.name: tuple(d if isinstance(d, int) and d >= 0 else None for d in i.shape) for i in inputs
        }
        self.sample_shape, self.static_batch = graph_layout(self.input_shapes, self.unet, self.path.name)
        self._dtypes = {i.name: _DTYPES.get(i.type) for i in inputs}
        fp16 = self.path.name.endswith(".fp16.onnx") or self._dtypes.get("sample") == np.float16
        self.precision = precision or ("fp16" if fp16 else "fp32")
        if cuda_graph and self.static_batch is None:
            raise ValueError(
                "cuda_graph=True needs a static-batch bundle (export_bundle(..., static_batch=B)): a "
                "dynamic batch puts shape computations on the CPU, which blocks capture"
            )
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self._out_shape = list(out.shape)
        if cuda_graph and not all(isinstance(d, int) for d in self._out_shape[1:]):
            raise ValueError(
                f"cuda_graph=True needs fixed output sizes; {self.path.name}'s output {out.name!r} has shape "
                f"{self._out_shape}"
            )
        self._out_dtype = _DTYPES.get(out.type, np.float32)
        self.cuda_graph = cuda_graph
        self._graph_buffers: _CudaGraphBuffers | None = None
        # capture and every replay on one worker thread (ONNX Runtime keeps captured graphs per thread); it also
        # serialises the calls that share the fixed buffers
        self._graph_thread = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort-cuda-graph") if cuda_graph else None
        )

    @classmethod
    def from_bundle(cls, bundle, precision: str = "fp32", **kwargs) -> OnnxRuntimeRunner:
        """The runner over ``bundle``'s graph of ``precision`` ("fp32" or "fp16")."""
        return cls(bundle.graph_path(precision), precision=precision, **kwargs)

    def _execute(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sb = self.static_batch
        return run_in_batches(self._run, feeds, min_batch=sb or 1, max_batch=sb)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = self.session
        if session is None:
            raise RuntimeError("this OnnxRuntimeRunner was closed")
        if not self.on_cuda:
            return session.run([self.output_name], feeds)[0]
        if self._graph_thread is not None:
            return self._graph_thread.submit(self._run_cuda_graph, feeds).result()
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run_cuda_graph(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One replay (the first call captures) over fixed device buffers; runs on the runner's worker thread."""
        ort = _import_ort()
        bufs = self._graph_buffers
        if bufs is None:
            binding = self.session.io_binding()
            inputs = {
                name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", self.device_id) for name, value in feeds.items()
            }
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            shape = [self.static_batch] + [int(d) for d in self._out_shape[1:]]
            output = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._out_dtype, "cuda", self.device_id)
            binding.bind_ortvalue_output(self.output_name, output)
            bufs = self._graph_buffers = _CudaGraphBuffers(binding, inputs, output)
        else:
            for name, value in feeds.items():
                bufs.inputs[name].update_inplace(value)
        self.session.run_with_iobinding(bufs.binding)
        return bufs.output.numpy()

    def _release(self) -> None:
        if self._graph_thread is not None:
            self._graph_thread.shutdown(wait=True)  # lets a queued call finish before the buffers go
            self._graph_thread = None
        self._graph_buffers = None
        self.session = None
