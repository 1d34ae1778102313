"""NumPy schedulers equal to diffusers' (one file per algorithm)."""

from __future__ import annotations

import os
from typing import Any

from .base import BaseScheduler, SchedulerConfig, SchedulerOutput, read_config_file
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULER_CLASSES",
    "BaseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "UniPCMultistepScheduler",
    "SCHEDULER_NAMES",
    "load_scheduler",
    "scheduler_from_name",
]

#: diffusers class name -> our class
SCHEDULER_CLASSES: dict[str, type[BaseScheduler]] = {
    cls.__name__: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
        LCMScheduler,
        PNDMScheduler,
    )
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


#: short names (CLI, ``Pipeline(scheduler=...)``) -> (diffusers class name, config overrides)
SCHEDULER_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def scheduler_from_name(
    name: str, config: str | os.PathLike | dict[str, Any] | None = None, **kwargs: Any
) -> BaseScheduler:
    """Build scheduler ``name`` (e.g. ``"dpmsolver++"``) from another scheduler's config, the way diffusers'
    ``OtherScheduler.from_config(config)`` would: shared keys carry over, the others take this class's
    defaults. ``config`` may be a dict, a JSON file, a folder holding ``scheduler_config.json`` or None."""
    key = name.lower() if isinstance(name, str) else name
    if key not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {list(SCHEDULER_NAMES)}")
    class_name, overrides = SCHEDULER_NAMES[key]
    cls = SCHEDULER_CLASSES.get(class_name)
    if cls is None:
        raise ValueError(f"scheduler {name!r} ({class_name}) is not available in this build")
    return cls.from_config(config if config is not None else {}, **{**overrides, **kwargs})
