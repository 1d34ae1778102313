"""The torch-free runtime: NumPy schedulers, torch-compatible noise, the sampling loop, bundle loading, the
ONNX Runtime / OpenVINO / TensorRT backends, :class:`Pipeline` (pixel-space UNets) and :class:`TextToImagePipeline`
(Stable Diffusion bundles). Imports numpy (and onnxruntime when a backend is opened, tokenizers for a text-to-image
bundle); never torch.

    from deploy_diff.runtime import Pipeline, TextToImagePipeline, load
    pipe = Pipeline.from_bundle("bundles/digits", scheduler="ddim")
    images = pipe(num_images=8, num_inference_steps=50, seed=0)
    sd = load("bundles/sd15")                              # whichever pipeline the bundle's manifest calls for
    images = sd("a watercolor of a lighthouse", seed=0)
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["Pipeline", "TextToImagePipeline", "load", "load_bundle"]


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The pipeline a bundle's manifest calls for: :class:`Pipeline` for a ``"unet"`` bundle,
    :class:`TextToImagePipeline` for a ``"text-to-image"`` one. ``kwargs`` are their ``from_bundle`` arguments
    (``backend``, ``device``, ``scheduler``, ``precision``, ``verify``, ...); the bundle is read and verified once."""
    from .bundle import TEXT_TO_IMAGE_PIPELINE, load_bundle

    bundle = load_bundle(path, verify=kwargs.pop("verify", True))
    if bundle.pipeline == TEXT_TO_IMAGE_PIPELINE:
        from .text_to_image import TextToImagePipeline

        return TextToImagePipeline.from_bundle(bundle, **kwargs)
    from .pipeline import Pipeline

    return Pipeline.from_bundle(bundle, **kwargs)


def __getattr__(name: str) -> Any:  # lazy, so `import deploy_diff.runtime` stays cheap
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "TextToImagePipeline":
        from .text_to_image import TextToImagePipeline

        return TextToImagePipeline
    if name == "load_bundle":
        from .bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
