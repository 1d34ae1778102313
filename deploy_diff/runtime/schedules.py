"""The former home of the beta schedules, kept importable: see :mod:`deploy_diff.runtime.schedulers.beta_schedules`."""

from __future__ import annotations

from .schedulers.beta_schedules import *  # noqa: F403
from .schedulers.beta_schedules import (  # noqa: F401  (names outside __all__ that callers import)
    MAX_TRAIN_TIMESTEPS,
    OWN_SCHEDULES,
    SEED_SCHEDULES,
    __all__,
    betas_for_alpha_bar,
)
