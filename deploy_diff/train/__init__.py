"""Training (torch): UNet, data, trainer, checkpoints, and the ``DiffusionConfig`` / ``DiffusionModel`` API
of :mod:`deploy_diff.train.api`.

Imports ``deploy_diff.runtime``; never imported by it. Names are loaded on first use so that
``import deploy_diff.train`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UNet": "unet",
    "UNetConfig": "unet",
    "TrainConfig": "config",
    "Trainer": "trainer",
    "train": "trainer",
    "TorchRunner": "runner",
    "load_data": "data",
    "find_checkpoint": "checkpoint",
    "DiffusionConfig": "api",
    "DiffusionModel": "api",
    "DiffusionTrainer": "api",
    "DiffusionAnalyzer": "api",
    "SchedulerType": "api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
