"""Export (needs torch and onnx): training runs and diffusers UNets to validated bundles, Stable Diffusion pipelines
to text-to-image bundles. The runtime never imports this package.

    from deploy_diff.export import export_bundle, export_text_to_image, load_run_source, load_diffusers_source
    export_bundle(load_run_source("runs/digits"), "bundles/digits", fp16=True)
    export_text_to_image("./stable-diffusion-v1-5", "bundles/sd15", fp16=True)
"""

from .bundle import export_bundle
from .sources import ExportError, ExportSource, load_diffusers_source, load_run_source
from .text_to_image import TextToImageSource, export_text_to_image, load_text_to_image_source
from .validate import ValidationError

__all__ = [
    "ExportError",
    "ExportSource",
    "TextToImageSource",
    "ValidationError",
    "export_bundle",
    "export_text_to_image",
    "load_diffusers_source",
    "load_run_source",
    "load_text_to_image_source",
]
