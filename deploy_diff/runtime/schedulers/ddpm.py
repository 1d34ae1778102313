"""DDPM (Ho et al. 2020): ancestral sampling from the posterior q(x_{t-1} | x_t, x_0)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import BaseScheduler, SchedulerOutput, check_choice, register_to_config

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(BaseScheduler):
    """diffusers' ``DDPMScheduler`` in NumPy (same constructor arguments and defaults).

    ``step`` draws one noise array of the sample's shape per step (except at t = 0), in diffusers' order.
    The previous timestep is the next entry of ``timesteps`` (as diffusers does for DDPM).

    Differs from diffusers where diffusers returns NaN: ``variance_type="fixed_large_log"`` (diffusers takes
    the square root of log(beta_t) < 0) uses std = exp(0.5 * log(beta_t)), i.e. the same step as
    ``fixed_large``.
    """

    _diffusers_beta_schedules: ClassVar[tuple[str, ...]] = (
        "linear",
        "scaled_linear",
        "squaredcos_cap_v2",
        "sigmoid",
        "laplace",
    )

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._validate_common()
        # None (what DPM-Solver writes into a shared config) behaves as fixed_small, as in diffusers
        check_choice("variance_type", variance_type, VARIANCE_TYPES + (None,))
        self.variance_type = variance_type or "fixed_small"
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self._prev_of: dict[int, int] = {}

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DDPM needs no input scaling; returns ``sample`` unchanged."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None) -> None:
        """Choose the inference timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``, or an
        explicit descending list ``timesteps`` (diffusers' custom timesteps)."""
        T = self.config["num_train_timesteps"]
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64).reshape(-1)
            if ts.size == 0 or np.any(np.diff(ts) >= 0) or ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {T}); got {list(ts)}")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            n = self._check_num_inference_steps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = n
            ts = self._spaced_timesteps(n)
            if ts.max() >= T:
                raise ValueError(
                    f"steps_offset={self.config['steps_offset']} pushes timestep {ts.max()} past "
                    f"num_train_timesteps={T}"
                )
        self.timesteps = ts
        self._prev_of = {int(t): int(p) for t, p in zip(ts, list(ts[1:]) + [-1])}

    def previous_timestep(self, timestep) -> int:
        t = int(timestep)
        if self.num_inference_steps is None:
            return t - 1
        if t not in self._prev_of:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps {list(self.timesteps)}")
        return self._prev_of[t]

    def _alpha_prods(self, t: int) -> tuple[float, float]:
        prev_t = self.previous_timestep(t)
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        return a_t, a_prev

    def _get_variance(self, t: int, predicted_variance: np.ndarray | None = None):
        a_t, a_prev = self._alpha_prods(t)
        beta_t = 1 - a_t / a_prev
        # eq. (7): posterior variance beta_tilde_t, floored so that log() is finite
        variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20) if a_t < 1 else 1e-20  # all betas 0 up to t
        vt = self.variance_type
        if vt == "fixed_small":
            return variance
        if vt == "fixed_small_log":
            return float(np.exp(0.5 * np.log(variance)))
        if vt == "fixed_large":
            return beta_t
        if vt == "fixed_large_log":
            # diffusers returns log(beta_t) here and step() then takes its square root: NaN. The log
            # variance means std = exp(0.5 * log(beta_t)); step() uses that (same as fixed_large).
            return float(np.log(beta_t))
        if vt == "learned":
            return predicted_variance
        # learned_range (improved DDPM eq. 15): interpolate log-variance between beta_tilde and beta
        min_log, max_log = float(np.log(variance)), float(np.log(beta_t))
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One reverse step x_t -> x_{t-1}.

        Args:
            model_output: float32[B, C, H, W] (or [B, 2C, H, W] with a learned variance).
            timestep: the current entry of ``timesteps``.
            sample: float32[B, C, H, W], x_t.
            generator: ``TorchGenerator``, ``numpy.random.Generator`` or a list of them (one per image).
        """
        self._check_step_inputs(model_output, sample)
        t = int(timestep)
        C = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * C and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output[:, :C], model_output[:, C:]
        a_t, a_prev = self._alpha_prods(t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha

        # eq. (15): predict x_0
        pt = self.config["prediction_type"]
        if pt == "epsilon":
            with np.errstate(divide="ignore", invalid="ignore"):
                x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        elif pt == "sample":
            x0 = model_output
        else:
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        x0 = self._clip_or_threshold(x0)
        self._check_x0(x0, t, a_t)

        # eq. (7): posterior mean coefficients of x_0 and x_t
        if b_t > 0:
            prev = (a_prev**0.5 * cur_beta / b_t) * x0 + (cur_alpha**0.5 * b_prev / b_t) * sample
        else:  # beta = 0 up to t (beta_start=0): x_t is x_0 itself, the posterior is exact
            prev = x0
        if t > 0:
            noise = self._noise(model_output.shape, generator, model_output.dtype)
            variance = self._get_variance(t, predicted_variance)
            if self.variance_type == "fixed_small_log":
                prev = prev + variance * noise
            elif self.variance_type == "learned_range":
                prev = prev + (np.exp(0.5 * variance) * noise).astype(sample.dtype, copy=False)
            elif self.variance_type == "fixed_large_log":
                prev = prev + float(np.exp(0.5 * variance)) * noise
            elif self.variance_type == "learned":
                prev = prev + (np.sqrt(variance) * noise).astype(sample.dtype, copy=False)
            else:
                prev = prev + variance**0.5 * noise
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
