"""NumPy schedulers equal to diffusers' (one file per algorithm)."""

from __future__ import annotations

import os
from typing import Any

from .base import BaseScheduler, SchedulerConfig, SchedulerOutput, read_config_file
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler

__all__ = [
    "SCHEDULER_CLASSES",
    "BaseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "load_scheduler",
]

#: diffusers class name -> our class
SCHEDULER_CLASSES: dict[str, type[BaseScheduler]] = {
    cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler)
}


def load_scheduler(config: str | os.PathLike | dict[str, Any], **kwargs: Any) -> BaseScheduler:
    """Build the scheduler a config names in ``_class_name`` (a dict, a JSON file or a folder holding
    ``scheduler_config.json``); ``kwargs`` override config values."""
    data = read_config_file(config) if isinstance(config, (str, os.PathLike)) else config
    if not isinstance(data, dict):
        raise TypeError(f"load_scheduler takes a dict or a path; got {type(config).__name__}")
    name = data.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"scheduler config names _class_name={name!r}; expected one of {sorted(SCHEDULER_CLASSES)}")
    return SCHEDULER_CLASSES[name].from_config(data, **kwargs)
