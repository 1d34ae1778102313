"""The torch-free runtime: NumPy schedulers, torch-compatible noise, the sampling loop, bundle loading, the
ONNX Runtime / TensorRT backends and :class:`Pipeline`. Imports numpy (and onnxruntime when a backend is
opened); never torch.

    from deploy_diff.runtime import Pipeline
    pipe = Pipeline.from_bundle("bundles/digits", scheduler="ddim")
    images = pipe(num_images=8, num_inference_steps=50, seed=0)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "load_bundle"]


def __getattr__(name: str) -> Any:  # lazy, so `import deploy_diff.runtime` stays cheap
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "load_bundle":
        from .bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
