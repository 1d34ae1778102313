"""The OpenVINO backend: :func:`load_model` reads a bundle's ONNX graph, :class:`OpenVINORunner` runs it on the CPU.

OpenVINO reads the fp32 ONNX graph as it is (no conversion step, no torch) and is fast at static shapes, so the
runner compiles one model per input shape it meets (the batch size, for a bundle's fixed-size samples; every
input's shape for a graph opened with ``unet=False``): at most ``max_shapes`` compiled models are kept, the least
recently used is dropped. One runner serves several threads at once: each thread gets its own infer request per
compiled model.

Precision is what is computed, set explicitly and read back from the compiled model (``runner.precision``):

- ``"fp32"`` sets OpenVINO's ``INFERENCE_PRECISION_HINT`` to f32 (its default on CPUs with bf16 arithmetic is
  bf16), and equals ONNX Runtime to float32 rounding.
- ``"bf16"`` computes in bfloat16 (about 2–3% relative error per UNet forward); it needs a CPU with bf16
  arithmetic (AVX512-BF16 or AMX), else a ``ValueError`` says so.

``openvino`` is imported when a runner is built, never at import time of this module.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..precisions import SUPPORTED_PRECISIONS, check_precision
from .base import Runner, check_num_threads, graph_layout, import_backend_module, parse_device, run_in_batches

__all__ = [
    "OPENVINO_PRECISIONS",
    "OpenVINORunner",
    "bf16_supported",
    "load_model",
    "openvino_available",
    "require_precision",
]

#: precision name -> OpenVINO's inference precision (the names are SUPPORTED_PRECISIONS["openvino"])
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
assert tuple(OPENVINO_PRECISIONS) == SUPPORTED_PRECISIONS["openvino"]
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def _import_ov() -> Any:
    return import_backend_module("openvino", "the OpenVINO backend needs openvino: pip install 'deploy-diff[openvino]'")


def openvino_available() -> bool:
    """Whether ``openvino`` can be imported (looked up without importing it)."""
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"] is not None
    return importlib.util.find_spec("openvino") is not None


def bf16_supported(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 on this CPU (AVX512-BF16 or AMX)."""
    core = _import_ov().Core() if core is None else core
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def require_precision(precision: str, core: Any = None) -> Any:
    """An ``openvino.Core`` ready to compute in ``precision``: ``ValueError`` for a precision OpenVINO does not
    offer or bf16 on a CPU without bf16 arithmetic, :class:`~.base.BackendUnavailableError` without openvino."""
    check_precision("openvino", precision)
    core = _import_ov().Core() if core is None else core
    if precision == "bf16" and not bf16_supported(core):
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise ValueError(
            f"precision='bf16' needs a CPU with bf16 arithmetic (AVX512-BF16 or AMX); {name} has none: "
            "use precision='fp32'"
        )
    return core


def load_model(graph: str | os.PathLike, core: Any = None) -> Any:
    """``(core, model)``: an ``openvino.Core`` and the ``openvino.Model`` read from the ONNX file ``graph``.

    Raises ``FileNotFoundError`` without the file, ``ValueError`` for a file OpenVINO cannot read,
    :class:`~.base.BackendUnavailableError` without openvino.
    """
    ov = _import_ov()
    path = Path(graph)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {path}")
    core = ov.Core() if core is None else core
    try:
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError / its own types for unreadable graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"OpenVINO cannot read {path} (truncated or not an ONNX graph?): {first}") from None
    return core, model


def _dims(partial_shape: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in partial_shape]


class OpenVINORunner(Runner):
    """A runner over one ONNX graph, compiled by OpenVINO for the CPU (see the module docstring and :mod:`.base`).

    Args:
        graph: path of the fp32 ``.onnx`` file (external data beside it is found automatically).
        device: ``"cpu"``, the only device this backend supports.
        precision: ``"fp32"`` (exact) or ``"bf16"`` (CPUs with bf16 arithmetic).
        num_threads: inference threads (default: OpenVINO's choice, one per physical core).
        cache_dir: a folder for OpenVINO's compiled-model cache (later loads skip compilation); None: no cache.
        max_shapes: compiled models kept, one per input shape (least recently used dropped).
        unet: the graph is a UNet of the runner protocol (checked; ``runner(sample, timestep, class_labels)``;
            compiled at load time for its sample shape); False: any graph, called with ``runner.run({name:
            array})`` and compiled at load time only when every input size is fixed, else at the first call.
    """

    def __init__(
        self,
        graph: str | os.PathLike,
        device: str = "cpu",
        precision: str = "fp32",
        num_threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_shapes: int = 8,
        unet: bool = True,
    ):
        kind, _ = parse_device(device)
        if kind != "cpu":
            raise ValueError(f"the OpenVINO backend supports device 'cpu' only; got {device!r}")
        check_num_threads(num_threads)
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive integer; got {max_shapes!r}")
        if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise ValueError(f"cache_dir {cache_dir} is a file; give a folder for OpenVINO's model cache")
        self.path = Path(graph)
        self.core, self.model = load_model(graph, require_precision(precision))
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        if num_threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = int(num_threads)
        if cache_dir is not None:
            self.config["CACHE_DIR"] = str(cache_dir)
        inputs = self.model.inputs
        self.unet = bool(unet)
        self.input_names = tuple(i.get_any_name() for i in inputs)
        self.input_shapes = {i.get_any_name(): tuple(_dims(i.get_partial_shape())) for i in inputs}
        self.sample_shape, self.static_batch = graph_layout(self.input_shapes, self.unet, self.path.name)
        self._dtypes = {i.get_any_name(): i.get_element_type().to_dtype() for i in inputs}
        self.output_name = self.model.outputs[0].get_any_name()
        self.max_shapes = max_shapes
        self.precision = precision  # checked against every compiled model
        self.num_threads = num_threads  # read back from the first compiled model
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._requests: dict[tuple[int, tuple], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        # compile the first shape now: a graph OpenVINO cannot compile, or a precision it does not apply, fails
        # at load time, and the first image does not wait for it
        if self.unet:
            batch = self.static_batch or 1
            shapes = {n: (batch,) + tuple(d or 1 for d in dims[1:]) for n, dims in self.input_shapes.items()}
            self._compiled_for(shapes)
        elif all(d is not None for dims in self.input_shapes.values() for d in dims):
            self._compiled_for(dict(self.input_shapes))

    def _precision_of(self, compiled: Any) -> str:
        t = compiled.get_property("INFERENCE_PRECISION_HINT")
        return _PRECISION_NAMES.get(t.get_type_name(), t.get_type_name())

    @property
    def compiled_shapes(self) -> list[tuple]:
        """The shapes compiled models are kept for, least recently used first: the sample shape of a UNet, every
        input's shape (in ``input_names`` order) of a graph opened with ``unet=False``."""
        with self._lock:
            return list(self._compiled)

    def _key(self, shapes: dict[str, tuple[int, ...]]) -> tuple:
        if self.unet:
            return tuple(shapes["sample"])
        return tuple(tuple(shapes[n]) for n in self.input_names)

    def _compiled_for(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        """The model compiled for these input shapes (compiled now when it is not kept)."""
        shape = self._key(shapes)
        with self._lock:
            if self._closed:
                raise RuntimeError("this OpenVINORunner was closed")
            compiled = self._compiled.get(shape)
            if compiled is not None:
                self._compiled.move_to_end(shape)
                return compiled
        # compile outside the lock (other shapes keep running); two threads may compile one shape, one is kept
        model = self.model.clone()
        model.reshape({name: list(shapes[name]) for name in self.input_names})
        compiled = self.core.compile_model(model, "CPU", self.config)
        got = self._precision_of(compiled)
        if got != self.precision:
            raise RuntimeError(f"OpenVINO compiled {self.path.name} in {got}, not the {self.precision} asked for")
        if self.num_threads is None:
            self.num_threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        with self._lock:
            if self._closed:
                raise RuntimeError("this OpenVINORunner was closed")
            compiled = self._compiled.setdefault(shape, compiled)
            self._compiled.move_to_end(shape)
            while len(self._compiled) > self.max_shapes:
                dropped, _ = self._compiled.popitem(last=False)
                for key in [k for k in self._requests if k[1] == dropped]:
                    del self._requests[key]
        return compiled

    def _request(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        """This thread's infer request on the compiled model for ``shapes`` (infer requests are not thread-safe)."""
        compiled = self._compiled_for(shapes)
        shape = self._key(shapes)
        key = (threading.get_ident(), shape)
        with self._lock:
            if self._closed:
                raise RuntimeError("this OpenVINORunner was closed")
            held = self._requests.get(key)
            if held is not None and held[0] is compiled:
                return held[1]
            request = compiled.create_infer_request()
            if self._compiled.get(shape) is not compiled:  # dropped meanwhile by another thread: use it once
                return request
            live = {t.ident for t in threading.enumerate()}
            for k in [k for k in self._requests if k[0] not in live]:  # requests of threads that ended
                del self._requests[k]
            self._requests[key] = (compiled, request)
            return request

    def _execute(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        sb = self.static_batch
        return run_in_batches(self._run, feeds, min_batch=sb or 1, max_batch=sb)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        request = self._request({name: a.shape for name, a in feeds.items()})
        request.infer(feeds)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request reuses it

    def _release(self) -> None:
        with self._lock:
            self._requests.clear()
            self._compiled.clear()
