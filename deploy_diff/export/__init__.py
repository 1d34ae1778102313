"""Export (needs torch and onnx): training runs and diffusers UNets to validated bundles. The runtime never imports
this package.

    from deploy_diff.export import export_bundle, load_run_source, load_diffusers_source
    export_bundle(load_run_source("runs/digits"), "bundles/digits", fp16=True)
"""

from .bundle import export_bundle
from .sources import ExportError, ExportSource, load_diffusers_source, load_run_source
from .validate import ValidationError

__all__ = [
    "ExportError",
    "ExportSource",
    "ValidationError",
    "export_bundle",
    "load_diffusers_source",
    "load_run_source",
]
