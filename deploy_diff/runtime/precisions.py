"""The backend and precision vocabulary, written once (no numpy, so the command line can read it for free).

``precision=`` names what is computed; :data:`SUPPORTED_PRECISIONS` says which backend computes in which, and
:func:`check_precision` refuses every other pair, naming what that backend supports.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "PRECISIONS", "SUPPORTED_PRECISIONS", "check_precision"]

#: what ``precision=`` may name: the arithmetic a backend computes in
PRECISIONS = ("fp32", "fp16", "bf16")

#: backend -> the precisions it computes in. ONNX Runtime and TensorRT run a bundle's fp32 or fp16 graph; OpenVINO
#: computes the fp32 graph in f32 or bf16 (CPUs with bf16 arithmetic). int8 is not offered: see docs/benchmarks.md.
SUPPORTED_PRECISIONS = {
    "onnxruntime": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16"),
    "tensorrt": ("fp32", "fp16"),
}

#: what ``backend=`` may name: a backend, or "auto" (see ``pipeline.select_backend``)
BACKENDS = (*SUPPORTED_PRECISIONS, "auto")


def check_precision(backend: str, precision: Any) -> str:
    """``precision`` if ``backend`` computes in it; else ``ValueError`` listing what that backend supports."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {list(PRECISIONS)}; got {precision!r} (int8 is not offered: it costs 6-10% "
            "error per UNet forward for at most 1.4x; see docs/benchmarks.md)"
        )
    supported = SUPPORTED_PRECISIONS.get(backend)
    if supported is None:
        raise ValueError(f"backend must be one of {list(SUPPORTED_PRECISIONS)}; got {backend!r}")
    if precision not in supported:
        others = [b for b, ps in SUPPORTED_PRECISIONS.items() if precision in ps]
        raise ValueError(
            f"the {backend} backend supports precision {list(supported)}; got {precision!r} ({precision} runs "
            f"on {', '.join(others)})"
        )
    return precision
