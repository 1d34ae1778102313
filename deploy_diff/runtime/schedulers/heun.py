"""Heun (Karras et al. 2022, Algorithm 1): second-order ODE sampler, an Euler step corrected by the slope at
its end point. Two model evaluations per sigma interval except the last, so timesteps are interleaved."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._sigma_common import SigmaSchedulerMixin
from .base import BaseScheduler, SchedulerOutput, register_to_config
from .sigmas import SIGMA_RAMPS, check_one_sigma_ramp, denoised_and_slope, sigma_to_t


class HeunDiscreteScheduler(SigmaSchedulerMixin, BaseScheduler):
    """diffusers' ``HeunDiscreteScheduler`` in NumPy (same constructor arguments and defaults, including
    beta_start = 0.00085 and beta_end = 0.012).

    For n sigmas s_0 > ... > s_{n-1} (then 0), ``timesteps`` is float32[2n - 1] = [t_0, t_1, t_1, t_2, t_2,
    ..., t_{n-1}, t_{n-1}] and ``sigmas`` float64[2n] = [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]. Steps
    alternate: a first-order (Euler) step from s_i to s_{i+1} stores its slope, step size and starting
    sample; the next call (the model evaluated at s_{i+1}) is the second-order correction that restarts
    from the stored sample with the mean of both slopes. The last step, from s_{n-1} to 0, is first order
    only (the state then stays "second order" until ``set_timesteps`` resets it, as in diffusers).
    ``state_in_first_order`` tells which kind the next step is. Like diffusers, ``step`` takes no
    ``generator`` (Heun is deterministic).

    Deliberate differences from diffusers (Karras / exponential / beta timesteps through float64
    ``alphas_cumprod``, the closed-form slope without ``clip_sample``): see docs/parity.md.
    """

    _diffusers_beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0):  # fmt: skip
        self._init_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self._validate_common()
        check_one_sigma_ramp(self.config)
        self.use_karras_sigmas = use_karras_sigmas
        # as diffusers: the full T-step schedule until set_timesteps is called
        self.set_timesteps(num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a first-order (Euler) step, False for a second-order correction."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None) -> None:
        """Choose ``num_inference_steps`` sigmas spaced by ``timestep_spacing`` (then Karras / exponential /
        beta sigmas if configured), or custom descending ``timesteps``; interleave them for the two-step
        method. Resets the step index and the first/second-order state."""
        c = self.config
        T = c["num_train_timesteps"]
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        conversion = next((k for k in SIGMA_RAMPS if c[k]), None)
        if timesteps is not None and conversion is not None:
            raise ValueError(f"custom timesteps cannot be used with {conversion}=True")
        ts, n = self._float_timesteps(num_inference_steps, timesteps)
        train = self._train_sigmas()
        grid = np.arange(T)
        sig = np.interp(ts, grid, train)
        if conversion is not None:
            ends = np.interp(ts[[0, -1]], grid, train.astype(np.float32))  # diffusers' float32 ends
            sig = self._converted_sigmas(ends, n)
            ts = sigma_to_t(sig, self._log_sigmas32())
        sig = np.concatenate([sig, [0.0]])
        ts = np.asarray(ts).astype(np.float32)
        self.num_inference_steps = n
        self.sigmas = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
        self.timesteps = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
        self.prev_derivative: np.ndarray | None = None
        self.dt: float | None = None
        self.sample: np.ndarray | None = None
        self._reset_state()

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One call of the two-stage Heun method (first or second order, see the class docstring).

        Args:
            model_output: float32[B, C, H, W], the model's prediction on ``scale_model_input(sample, t)``.
            timestep: the current entry of ``timesteps``.
            sample: float32[B, C, H, W], the sample the model saw (before scaling).
        Returns:
            ``SchedulerOutput(prev_sample float32[B, C, H, W], pred_original_sample)``: after a first-order
            step, the Euler estimate at the next sigma (where the model is evaluated next); after a
            second-order step, the corrected sample.
        """
        self._check_step_inputs(model_output, sample)
        first = self.dt is None
        i = self._current_index(timestep)
        if first:
            sigma, sigma_next = self._sigma_values[i], self._sigma_values[i + 1]
            sigma_in = sigma  # gamma = 0: sigma_hat == sigma
        else:
            sigma, sigma_next = self._sigma_values[i - 1], self._sigma_values[i]
            sigma_in = sigma_next  # the model was evaluated at the end point of the Euler step

        c = self.config
        # x0 (Karras' D(x; sigma)) and the ODE slope (x - x0) / sigma, the slope in closed form unless x0 is
        # clipped (the float32 cancellation in x - x0 is multiplied by dt / sigma in the correction)
        x0, derivative = denoised_and_slope(
            sample,
            model_output,
            c["prediction_type"],
            sigma_in,
            clip_range=float(c["clip_sample_range"]) if c["clip_sample"] else None,
        )
        if first and derivative is model_output:
            derivative = model_output.copy()  # kept across calls
        if first:
            # Euler step to sigma_next; keep slope, step size and start for the correction
            dt = sigma_next - sigma
            self.prev_derivative = derivative
            self.dt = dt
            self.sample = sample
            prev = sample + dt * derivative
        else:
            # Heun: restart from the stored sample with the mean slope
            assert self.prev_derivative is not None and self.sample is not None and self.dt is not None
            prev = self.sample + (0.5 * self.dt) * (self.prev_derivative + derivative)
            self.prev_derivative = None
            self.dt = None
            self.sample = None
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
