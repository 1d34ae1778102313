"""Serving and scaling a bundle on Ray: ``deploy-diff serve`` (Ray Serve) and ``deploy-diff generate`` (Ray).

Importing this package imports nothing heavy: Ray is imported only inside the modules that run on it
(:mod:`deploy_diff.serving.app`), and :mod:`deploy_diff.serving.requests` (the HTTP request rules) needs numpy
only. Pixel-space UNet bundles only (:func:`deploy_diff.serving._common.require_pixel_bundle`).
"""

from __future__ import annotations
