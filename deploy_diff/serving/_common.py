"""What serving and bulk generation share: the bundle kinds they accept and how they start Ray.

Ray is imported inside :func:`ray_init` only, so importing this module stays cheap.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

__all__ = ["PIXEL_PIPELINE", "pipeline_kind", "ray_init", "require_pixel_bundle"]

_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PIXEL_PIPELINE = "unet"  # the manifest's "pipeline" of a pixel-space UNet bundle (absent in format-1 bundles)


def pipeline_kind(manifest: dict[str, Any]) -> str:
    """The kind of pipeline a bundle's manifest describes: its ``"pipeline"`` field, ``"unet"`` when absent."""
    kind = manifest.get("pipeline", PIXEL_PIPELINE)
    return PIXEL_PIPELINE if kind is None else kind


def require_pixel_bundle(bundle: Any) -> Any:
    """``bundle`` (a :class:`~deploy_diff.runtime.bundle.Bundle`, or a path: then loaded and verified) if it is a
    pixel-space UNet bundle; else a ``ValueError`` naming its kind. Returns the :class:`Bundle`."""
    from ..runtime.bundle import Bundle, load_bundle

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    kind = pipeline_kind(bundle.manifest)
    if kind == "text-to-image":
        raise ValueError(
            f"bundle {bundle.path} holds a 'text-to-image' pipeline (text encoder, UNet, VAE decoder): sample it with "
            "deploy_diff.runtime.TextToImagePipeline (or `deploy-diff sample BUNDLE --prompt ...`); serving and bulk "
            f"generation take pixel-space UNet bundles (pipeline {PIXEL_PIPELINE!r}) only"
        )
    if kind != PIXEL_PIPELINE:
        raise ValueError(
            f"bundle {bundle.path} holds a {kind!r} pipeline; only pixel-space UNet bundles (pipeline "
            f"{PIXEL_PIPELINE!r}, what `deploy-diff export` writes for a UNet) can be served or generated from"
        )
    return bundle


def ray_init(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Connect to Ray: join the cluster at ``address`` (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``), or
    with ``address=None`` start a local instance on the loopback interface with ``num_cpus`` CPUs (default: all).
    An address on the loopback interface (``127.0.0.1:PORT``) joins such a local instance.

    No dashboard, usage statistics off. A local instance is a single-machine one: its node address is 127.0.0.1,
    so Ray's own servers (GCS, raylet, workers) listen on the loopback interface only. When Ray is already
    initialised in this process the running instance is used as is (its context is returned). Extra keyword
    arguments go to ``ray.init``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address is None or _is_loopback(address):
        # Ray's switch for a node that is never part of a cluster (its default on macOS and Windows): the node
        # advertises and binds 127.0.0.1 instead of the machine's network address (and a loopback address is
        # not translated into that network address). Read at import (patched here, as ray is imported already)
        # and by the processes a local instance starts (they inherit the environment).
        from ray._private import ray_constants

        os.environ[_LOCAL_ONLY_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    if address is not None:
        if num_cpus is not None:
            raise ValueError("num_cpus applies to a local Ray instance only; a cluster at address= has its own")
        return ray.init(address=address, include_dashboard=False, **kwargs)
    return ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (``HOST:PORT``, ``ray://HOST:PORT``) names this machine's loopback interface: a
    loopback-only instance, which Ray would otherwise look for at the machine's network address."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
