"""Runner backends, all callable as ``runner(sample, timestep, class_labels=None) -> output`` (see :mod:`.base`).

- ``base``: the runner protocol, the shared input check, batching, device strings, :class:`BackendUnavailableError`.
- ``onnxruntime``: ``load_session`` and ``OnnxRuntimeRunner`` (CPU or CUDA).
- ``openvino``: ``load_model`` and ``OpenVINORunner`` (CPU; fp32 or bf16; ``openvino`` imported on load).
- ``tensorrt``: ``load_engine`` and ``TensorRTRunner`` (``tensorrt`` and ``cuda-python`` imported on load).

Import the submodule you need: this package imports numpy only, so neither onnxruntime, OpenVINO nor TensorRT is loaded
until a runner is built. A new backend is one submodule: a loader function and a :class:`~.base.Runner` subclass.
"""

from .base import (
    PRECISIONS,
    SUPPORTED_PRECISIONS,
    BackendUnavailableError,
    check_inputs,
    check_precision,
    parse_device,
    run_in_batches,
)

__all__ = [
    "PRECISIONS",
    "SUPPORTED_PRECISIONS",
    "BackendUnavailableError",
    "check_inputs",
    "check_precision",
    "parse_device",
    "run_in_batches",
]
