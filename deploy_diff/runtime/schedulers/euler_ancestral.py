"""Euler ancestral (k-diffusion's ``sample_euler_ancestral``): an Euler step down to sigma_down, then fresh
noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._sigma_common import SigmaSchedulerMixin, compute_dtype_view, reject_integer_timestep
from .base import BaseScheduler, SchedulerOutput, register_to_config
from .sigmas import check_one_sigma_ramp, denoised_and_slope, float_spaced_timesteps


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin, BaseScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` in NumPy (same constructor arguments and defaults).

    ``step`` draws one noise array of the sample's shape at *every* step, the last one included (where its
    weight sigma_up is 0), in diffusers' order, so a ``TorchGenerator`` reproduces diffusers' samples.
    ``timesteps`` are float32 (fractional for ``linspace``), ``sigmas`` float64[len(timesteps) + 1].

    As in diffusers, ``rescale_betas_zero_snr`` clamps the last alphas_cumprod to 2**-24 (sigma_max ~ 4096),
    and ``trailing`` spacing can give n + 1 timesteps (n = 61 with T = 1000: the last is -1). Deliberate
    differences from diffusers (``prediction_type="sample"`` works, the sigma_down / sigma_up arithmetic,
    float64 samples stay float64): see docs/parity.md.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._validate_common()
        check_one_sigma_ramp(self.config)
        self.sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]])
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(np.float32)
        self._reset_state()

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``timestep_spacing``; sigmas are interpolated
        linearly in t. Resets the step index."""
        n = self._check_num_inference_steps(num_inference_steps)
        c = self.config
        T = c["num_train_timesteps"]
        ts = float_spaced_timesteps(T, n, c["timestep_spacing"], c["steps_offset"])
        sig = np.interp(ts, np.arange(T), self._train_sigmas())
        self.num_inference_steps = n
        self.timesteps = ts
        self.sigmas = np.concatenate([sig, [0.0]])
        self._reset_state()

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, generator=None, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One ancestral step from sigma_i to sigma_{i+1}.

        Args:
            model_output: float32[B, C, H, W], the model's prediction on ``scale_model_input(sample, t)``.
            timestep: the current entry of ``timesteps`` (a float; integers are refused, as in diffusers).
            sample: float32[B, C, H, W], x at sigma_i.
            generator: ``TorchGenerator``, ``numpy.random.Generator`` or a list of them (one per image).
        Returns:
            ``SchedulerOutput(prev_sample float[B, C, H, W] in model_output's dtype, pred_original_sample)``.
        """
        self._check_step_inputs(model_output, sample)
        reject_integer_timestep(type(self).__name__, timestep)
        self._warn_if_not_scaled()
        i = self._current_index(timestep)
        sigma, sigma_to = self._sigma_values[i], self._sigma_values[i + 1]
        x, mo = compute_dtype_view(sample, model_output)  # diffusers upcasts fp16 to float32

        # the ancestral split: sigma_up^2 = sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2, sigma_down^2 =
        # sigma_to^2 - sigma_up^2 = sigma_to^4 / sigma^2
        ratio = sigma_to / sigma if sigma > 0 else 0.0  # sigma = 0 only with trained_betas starting at 0
        sigma_up = sigma_to * math.sqrt(max(1.0 - ratio * ratio, 0.0))
        sigma_down = sigma_to * ratio
        dt = sigma_down - sigma

        x0, d = denoised_and_slope(x, mo, self.config["prediction_type"], sigma)
        prev = x + dt * d
        noise = self._noise(model_output.shape, generator, model_output.dtype)
        prev = (prev + noise * sigma_up).astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
