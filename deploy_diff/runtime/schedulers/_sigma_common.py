"""What Euler, Euler ancestral and Heun share beyond the step index: the model-input scaling, the initial
noise, the sigma-space ``add_noise``, the choice of sigma list, and diffusers' input checks.

The sigma lists and spacings themselves are plain functions in :mod:`.sigmas`; the step index is
:class:`.step_index.StepIndexMixin`, which DPM-Solver and UniPC use too.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .sigmas import (  # noqa: F401  (beta_ppf, betainc, beta_sigmas, exponential_sigmas: importable from here, as before)
    SIGMA_RAMPS,
    beta_ppf,
    beta_sigmas,
    betainc,
    check_one_sigma_ramp,
    exponential_sigmas,
    float_spaced_timesteps,
    sigma_ramp,
)
from .sigmas import karras_sigmas as karras_sigma_list  # noqa: F401  (the name this module gave it)
from .step_index import StepIndexMixin

__all__ = [
    "SigmaSchedulerMixin",
    "check_sigma_options",
    "compute_dtype_view",
    "reject_integer_timestep",
]


#: the former name of :func:`.sigmas.check_one_sigma_ramp` (``timestep_spacing`` is BaseScheduler._validate_common's)
check_sigma_options = check_one_sigma_ramp


_FLOAT_SCALARS = (np.float32, float, np.float64)
_WIDE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype_view(sample: np.ndarray, model_output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample, model_output) in the dtype diffusers' Euler steps compute in: float32, or float64 for a
    float64 sample (float16 is upcast, as diffusers does); no copies when nothing changes."""
    x = sample if sample.dtype in _WIDE_FLOATS else sample.astype(np.float32)
    mo = model_output if model_output.dtype == x.dtype else model_output.astype(x.dtype)
    return x, mo


def reject_integer_timestep(cls_name: str, timestep: Any) -> None:
    """diffusers' Euler schedulers refuse integer timesteps (usually an index from ``enumerate``)."""
    if type(timestep) in _FLOAT_SCALARS or isinstance(timestep, bool):
        return
    if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, np.ndarray) and timestep.dtype.kind in "iu"):
        raise ValueError(
            f"{cls_name}.step() got the integer timestep {timestep!r}: passing indices (e.g. from "
            "enumerate(timesteps)) is not supported; pass an entry of scheduler.timesteps"
        )


class SigmaSchedulerMixin(StepIndexMixin):
    """Input scaling, initial noise and noising of Euler, Euler ancestral and Heun.

    A subclass sets ``self.timesteps`` (float32[n]) and ``self.sigmas`` (float64[n + 1], the last one the
    sigma after the final step) in ``__init__`` and ``set_timesteps`` and then calls ``_reset_state()``.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    config: Any

    # -- state ----------------------------------------------------------------------------------------

    def _float_timesteps(self, num_inference_steps: Any, timesteps: Any) -> tuple[np.ndarray, int]:
        """float32 timesteps and their count: the custom ``timesteps`` when given (checked), else
        ``num_inference_steps`` spaced by ``timestep_spacing`` (diffusers' float rule)."""
        c = self.config
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.float64).reshape(-1).astype(np.float32)
            if ts.size == 0 or not np.all(np.isfinite(ts)):
                raise ValueError(f"custom timesteps must be a non-empty list of finite numbers; got {timesteps!r}")
            return ts, int(ts.size)
        n = self._check_num_inference_steps(num_inference_steps)
        return float_spaced_timesteps(c["num_train_timesteps"], n, c["timestep_spacing"], c["steps_offset"]), n

    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.is_scale_input_called = False
        self._sigma_values = [float(s) for s in self.sigmas]  # Python floats for the step arithmetic
        # diffusers holds sigmas in float32 and compares them with s_tmin / s_tmax there
        self._sigma32_values = [float(s) for s in self.sigmas.astype(np.float32)]
        self._input_scale = [math.sqrt(s * s + 1.0) for s in self._sigma_values]

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: sigma_max for ``linspace``/``trailing`` spacing,
        sqrt(sigma_max^2 + 1) for ``leading`` (as diffusers)."""
        max_sigma = float(np.max(self.sigmas))
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return math.sqrt(max_sigma**2 + 1.0)

    def _warn_if_not_scaled(self) -> None:
        if not self.is_scale_input_called:
            warnings.warn(
                "scale_model_input() should be called before step() to ensure correct denoising "
                "(the model input is the sample divided by sqrt(sigma^2 + 1))",
                UserWarning,
                stacklevel=3,
            )

    # -- public helpers ---------------------------------------------------------------------------------
    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """The model's input at ``timestep``: ``sample / sqrt(sigma^2 + 1)`` (float32[B, C, H, W] in and out).

        Call it once per step, before ``step``; like diffusers, the first call fixes the step index.
        """
        i = self._current_index(timestep)
        self.is_scale_input_called = True
        return sample / self._input_scale[i]

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """x = x_0 + sigma * noise at ``timesteps`` (entries of ``self.timesteps``, one per batch entry or
        one for all), with diffusers' index rule: each timestep is looked up in the schedule unless a begin
        index was set (then the current step index, or the begin index before the first step)."""
        x0 = np.asarray(original_samples)
        dtype = x0.dtype if x0.dtype.kind == "f" else np.float32
        t = np.asarray(timesteps).reshape(-1)
        idx = self._noise_indices(t)
        sigma = self.sigmas[idx].astype(dtype)
        sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
        return x0 + np.asarray(noise, dtype=dtype) * sigma

    # -- schedule pieces --------------------------------------------------------------------------------
    def _converted_sigmas(self, in_sigmas: np.ndarray, n: int) -> np.ndarray | None:
        """Karras / exponential / beta sigmas (float64[n]) spanning ``in_sigmas``, or None when none is set."""
        c = self.config
        kind = next((k for k in SIGMA_RAMPS if c.get(k)), None)
        if kind is None:
            return None
        cfg_min, cfg_max = c.get("sigma_min"), c.get("sigma_max")
        sigma_min = float(cfg_min) if cfg_min is not None else float(in_sigmas[-1])
        sigma_max = float(cfg_max) if cfg_max is not None else float(in_sigmas[0])
        return sigma_ramp(SIGMA_RAMPS[kind], sigma_min, sigma_max, n)

    def _log_sigmas32(self) -> np.ndarray:
        return np.log(self._train_sigmas().astype(np.float32))
