"""Euler (Karras et al. 2022, Algorithm 2): the first-order ODE sampler in sigma space, with optional churn."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._sigma_common import (
    SigmaSchedulerMixin,
    compute_dtype_view,
    reject_integer_timestep,
)
from .base import BaseScheduler, SchedulerOutput, check_choice, register_to_config
from .sigmas import SIGMA_RAMPS, check_one_sigma_ramp, denoised_and_slope, sigma_to_t

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class EulerDiscreteScheduler(SigmaSchedulerMixin, BaseScheduler):
    """diffusers' ``EulerDiscreteScheduler`` in NumPy (same constructor arguments and defaults).

    The sample is x = x_0 + sigma * noise; the model sees ``scale_model_input(x, t) = x / sqrt(sigma^2 + 1)``
    at the fractional float32 timestep ``t`` (``timesteps`` float32[n], e.g. 749.25 with ``linspace``).
    ``sigmas`` is float64[n + 1], the last entry being the sigma after the final step (0, or sigma at t = 0
    with ``final_sigmas_type="sigma_min"``). As in diffusers: ``interpolation_type="log_linear"`` builds
    n + 1 sigmas log-evenly from sigma_max to sigma_min for n timesteps (the loop then ends at sigma_min, not
    at 0); ``trailing`` spacing can give n + 1 timesteps (n = 61 with T = 1000: the last is -1); with
    ``timestep_type="continuous"`` and v_prediction the timesteps are 0.25 * log(sigma); with
    ``rescale_betas_zero_snr`` the last alphas_cumprod is clamped to 2**-24 (sigma_max ~ 4096).

    ``step`` keeps a float64 sample in float64; float16 is upcast to float32 like diffusers. Deliberate
    differences from diffusers (Karras / exponential / beta timesteps through float64 ``alphas_cumprod``, the
    closed-form slope, option checks, ``get_velocity``): see docs/parity.md.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 timestep_spacing: str = "linspace", timestep_type: str = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._validate_common()
        check_one_sigma_ramp(self.config)
        check_choice("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.number))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0 or None; got {value!r}")
        if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas

        train = self._train_sigmas()
        self.sigmas = np.concatenate([train[::-1], [0.0]])
        if self._continuous_v():
            self.timesteps = (0.25 * np.log(train[::-1])).astype(np.float32)
        else:
            self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(np.float32)
        self._reset_state()

    def _continuous_v(self) -> bool:
        # diffusers' EDM-style timesteps 0.25 * log(sigma) exist for v_prediction only
        return self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None, sigmas=None) -> None:
        """Choose the sampling schedule: ``num_inference_steps`` spaced by ``timestep_spacing`` (then
        Karras / exponential / beta sigmas if configured), or custom descending ``timesteps`` (float[n]),
        or custom ``sigmas`` (float[n + 1], the last one reached after the final step). Resets the step index.
        """
        c = self.config
        T = c["num_train_timesteps"]
        if sum(v is not None for v in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        conversion = next((k for k in SIGMA_RAMPS if c[k]), None)
        if timesteps is not None and conversion is not None:
            raise ValueError(f"custom timesteps cannot be used with {conversion}=True")
        if timesteps is not None and self._continuous_v():
            raise ValueError(
                "custom timesteps cannot be used with timestep_type='continuous' and prediction_type='v_prediction'"
            )
        train = self._train_sigmas()
        if sigmas is not None:
            # diffusers keeps custom sigmas in float32
            sig = np.asarray(sigmas, dtype=np.float64).reshape(-1).astype(np.float32).astype(np.float64)
            if sig.size < 2 or not np.all(np.isfinite(sig)) or np.any(sig[:-1] <= 0) or sig[-1] < 0:
                raise ValueError(
                    "custom sigmas must hold at least 2 finite values, all > 0 except the last "
                    f"(>= 0); got {np.asarray(sigmas).tolist()}"
                )
            n = sig.size - 1
            ts = sigma_to_t(sig[:-1], self._log_sigmas32())
        else:
            ts, n = self._float_timesteps(num_inference_steps, timesteps)
            grid = np.arange(T)
            if c["interpolation_type"] == "linear":
                sig = np.interp(ts, grid, train)
                ends = np.interp(ts[[0, -1]], grid, train.astype(np.float32))  # diffusers' float32 ends
            else:  # log_linear: n + 1 sigmas log-evenly from sigma_max to sigma_min, whatever the timesteps
                sig = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1))
                ends = sig[[0, -1]]
            converted = self._converted_sigmas(ends, n)
            if converted is not None:
                sig = converted
                ts = sigma_to_t(sig, self._log_sigmas32())
            last = float(train[0]) if c["final_sigmas_type"] == "sigma_min" else 0.0
            sig = np.concatenate([sig, [last]])
        self.num_inference_steps = n
        if self._continuous_v():
            ts = 0.25 * np.log(sig[:-1])
        self.timesteps = np.asarray(ts).astype(np.float32)
        self.sigmas = sig
        self._reset_state()

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1} (Karras et al. 2022, Algorithm 2).

        Args:
            model_output: float32[B, C, H, W], the model's prediction on ``scale_model_input(sample, t)``.
            timestep: the current entry of ``timesteps`` (a float; integers are refused, as in diffusers).
            sample: float32[B, C, H, W], x at sigma_i.
            s_churn, s_tmin, s_tmax, s_noise: stochastic "churn": where s_tmin <= sigma_i <= s_tmax, sigma is
                raised to sigma_hat = sigma_i * (1 + gamma), gamma = min(s_churn / (len(sigmas) - 1),
                sqrt(2) - 1), by adding noise of std s_noise * sqrt(sigma_hat^2 - sigma_i^2). The noise
                (one draw of the sample's shape) is drawn only when gamma > 0, as in diffusers.
            generator: ``TorchGenerator``, ``numpy.random.Generator`` or a list of them, for the churn noise.
        Returns:
            ``SchedulerOutput(prev_sample float[B, C, H, W] in model_output's dtype, pred_original_sample)``.
        """
        self._check_step_inputs(model_output, sample)
        reject_integer_timestep(type(self).__name__, timestep)
        if s_churn is None or not math.isfinite(s_churn) or s_churn < 0:
            raise ValueError(f"s_churn must be a finite number >= 0; got {s_churn!r}")
        if s_noise is None or not math.isfinite(s_noise):
            raise ValueError(f"s_noise must be a finite number; got {s_noise!r}")
        self._warn_if_not_scaled()
        i = self._current_index(timestep)
        sigma, sigma_next = self._sigma_values[i], self._sigma_values[i + 1]
        x, mo = compute_dtype_view(sample, model_output)  # diffusers upcasts fp16 to float32

        gamma = 0.0
        if s_churn > 0 and s_tmin <= self._sigma32_values[i] <= s_tmax:
            gamma = min(s_churn / (len(self._sigma_values) - 1), 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = self._noise(model_output.shape, generator, model_output.dtype)
            x = x + noise * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))

        # x0 for v_prediction uses sigma, not sigma_hat, as diffusers does
        x0, d = denoised_and_slope(x, mo, self.config["prediction_type"], sigma, sigma_hat)
        prev = x + (sigma_next - sigma_hat) * d
        prev = prev.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
