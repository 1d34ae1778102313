"""LCM (Luo et al. 2023, Latent Consistency Models): few-step sampling of a consistency-distilled model.

Each step maps x_t to the consistency function's output ``denoised = c_skip(t) x_t + c_out(t) x_0(t)`` (x_0 from
the model output, as in DDIM), then, except at the last step, noises it forward to the next timestep with fresh
noise: x_{t'} = sqrt(abar_{t'}) denoised + sqrt(1 - abar_{t'}) z. The timesteps are chosen from the *skipping grid*
of the distillation, every k-th training timestep with k = num_train_timesteps // original_inference_steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..arguments import is_int, is_real
from .base import BaseScheduler, SchedulerOutput, register_to_config
from .step_index import StepIndexMixin

__all__ = ["LCMScheduler", "LCMSchedulerOutput"]


@dataclass
class LCMSchedulerOutput(SchedulerOutput):
    """``step``'s result: ``prev_sample`` (the next sample of the loop) and ``pred_original_sample``, the
    consistency function's output, which diffusers names ``denoised`` (the ``denoised`` property is that array).
    Unpacks as ``prev_sample, denoised = scheduler.step(...)``."""

    @property
    def denoised(self) -> np.ndarray | None:
        return self.pred_original_sample


class LCMScheduler(StepIndexMixin, BaseScheduler):
    """diffusers' ``LCMScheduler`` in NumPy (same constructor arguments and defaults).

    ``set_timesteps(n)`` takes n timesteps evenly spaced in index from the skipping grid :meth:`origin_timesteps`
    (or a custom descending list ``timesteps=``, and ``strength`` < 1 for img2img), exactly as diffusers does.
    ``step`` returns ``(prev_sample, denoised)`` and draws one noise array of the sample's shape at every step but
    the last, in diffusers' order, so a ``TorchGenerator`` reproduces diffusers' samples. ``timestep_spacing`` and
    ``steps_offset`` are accepted (and validated) but unused, as in diffusers; so is ``set_alpha_to_one``, whose
    ``final_alpha_cumprod`` would only apply below timestep 0, where LCM's timesteps never go.

    The step index follows diffusers' (``step_index``, ``begin_index``, ``set_begin_index``). Deliberate differences
    (the last step of a custom schedule cut by ``strength``, refusals where diffusers fails later): docs/parity.md.
    """

    # not a sigma-space scheduler: abar_t is used directly (beta_start = 0 is fine, zero SNR is not clamped)
    _needs_positive_sigma_min: ClassVar[bool] = False
    _clamps_zero_snr: ClassVar[bool] = False
    #: sigma_data of the boundary-condition scalings (diffusers' fixed 0.5)
    sigma_data: ClassVar[float] = 0.5

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._validate_common()
        if not is_int(original_inference_steps) or original_inference_steps < 1:
            raise ValueError(f"original_inference_steps must be a positive int; got {original_inference_steps!r}")
        if not is_real(timestep_scaling) or not math.isfinite(timestep_scaling) or timestep_scaling <= 0:
            raise ValueError(f"timestep_scaling must be a finite number > 0; got {timestep_scaling!r}")
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self._prediction_type = prediction_type
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """LCM needs no input scaling; returns ``sample`` unchanged."""
        return sample

    # -- the schedule ------------------------------------------------------------------------------------
    def _original_steps(self, original_inference_steps: Any) -> int:
        T = self.config["num_train_timesteps"]
        o = self.config["original_inference_steps"] if original_inference_steps is None else original_inference_steps
        if not is_int(o) or o < 1:
            raise ValueError(f"original_inference_steps must be a positive int; got {o!r}")
        if o > T:
            raise ValueError(
                f"original_inference_steps={o} reaches past num_train_timesteps={T}: the skipping grid takes every "
                f"(num_train_timesteps // original_inference_steps)-th training timestep, so use at most {T}"
            )
        return int(o)

    @staticmethod
    def _check_strength(strength: Any) -> float:
        if not is_real(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1]; got {strength!r}")
        return float(strength)

    def origin_timesteps(self, original_inference_steps: int | None = None, strength: float = 1.0) -> np.ndarray:
        """int64[m] ascending: the skipping grid of LCM distillation, diffusers' ``lcm_origin_timesteps``.

        With k = num_train_timesteps // original_inference_steps (default: the config's), the grid is
        k - 1, 2k - 1, ..., m k - 1 with m = int(original_inference_steps * strength): the timesteps a model
        distilled with ``original_inference_steps`` ODE-solver steps was trained at (the distillation trainer
        draws its timesteps from here), and those ``set_timesteps`` picks from.
        """
        o = self._original_steps(original_inference_steps)
        k = self.config["num_train_timesteps"] // o
        return np.arange(1, int(o * self._check_strength(strength)) + 1, dtype=np.int64) * k - 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        original_inference_steps: int | None = None,
        timesteps=None,
        strength: float = 1.0,
    ) -> None:
        """Choose the inference timesteps (int64, descending) and reset the step index; as diffusers.

        Args:
            num_inference_steps: take this many timesteps, evenly spaced in index, from the top of the skipping
                grid reversed (:meth:`origin_timesteps`); at most the grid's length int(original_inference_steps
                * strength).
            original_inference_steps: the grid's number of steps (default: the config's).
            timesteps: instead of ``num_inference_steps``, a strictly descending list of integer timesteps in
                [0, num_train_timesteps); warns (as diffusers does) where it does not start at
                num_train_timesteps - 1 (with strength 1), leaves the grid, or is longer than the grid.
            strength: in (0, 1]; the fraction of the schedule kept, for img2img (diffusers' rule: the grid is cut
                to its lowest int(original_inference_steps * strength) timesteps, a custom list to its last
                int(len * strength) entries).
        """
        if num_inference_steps is None and timesteps is None:
            raise ValueError("pass exactly one of num_inference_steps or timesteps; got neither")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass exactly one of num_inference_steps or timesteps; got both")
        o = self._original_steps(original_inference_steps)
        strength = self._check_strength(strength)
        grid = self.origin_timesteps(o, strength)
        if timesteps is not None:
            ts = self._custom_timesteps(timesteps, grid, o, strength)
            self.num_inference_steps = len(ts)  # before the strength cut, as diffusers
            self.custom_timesteps = True
            keep = min(int(len(ts) * strength), len(ts))
            if keep == 0:
                raise ValueError(
                    f"strength={strength} keeps none of the {len(ts)} custom timesteps (it keeps the last "
                    f"int(len(timesteps) * strength)); use strength >= {1 / len(ts):.6g}"
                )
            ts = ts[len(ts) - keep :]
        else:
            n = self._check_num_inference_steps(num_inference_steps)
            m = len(grid)
            if n > m:
                raise ValueError(
                    f"num_inference_steps={n} is more than the {m} timesteps of the LCM skipping grid "
                    f"(original_inference_steps={o} x strength={strength}): use at most {m} steps, or a larger "
                    "original_inference_steps or strength"
                )
            self.num_inference_steps = n
            self.custom_timesteps = False
            indices = np.floor(np.linspace(0, m, num=n, endpoint=False)).astype(np.int64)
            ts = grid[::-1][indices]
        self.timesteps = np.ascontiguousarray(ts, dtype=np.int64)
        self._step_index = None
        self._begin_index = None

    def _custom_timesteps(self, timesteps: Any, grid: np.ndarray, original_steps: int, strength: float) -> np.ndarray:
        """int64[n] from a custom list: checked (diffusers' errors, plus integers >= 0), with diffusers' warnings."""
        T = self.config["num_train_timesteps"]
        raw = np.asarray(timesteps)
        if raw.ndim != 1 or raw.size == 0 or raw.dtype.kind not in "iuf" or not np.all(np.isfinite(raw)):
            raise ValueError(f"timesteps must be a non-empty list of integers; got {timesteps!r}")
        if raw.dtype.kind == "f" and not np.all(raw == np.round(raw)):
            raise ValueError(f"timesteps must be integers (entries of the training timesteps); got {timesteps!r}")
        ts = raw.astype(np.int64)
        if np.any(np.diff(ts) >= 0):
            raise ValueError(f"custom timesteps must be strictly descending; got {ts.tolist()}")
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, num_train_timesteps={T}); got {ts.tolist()}")
        if strength == 1.0 and ts[0] != T - 1:
            warnings.warn(
                f"the custom timesteps start at {ts[0]}, not at num_train_timesteps - 1 = {T - 1}: results may be "
                "unexpected",
                UserWarning,
                stacklevel=3,
            )
        on_grid = set(grid.tolist())
        off_grid = [int(t) for t in ts[1:] if int(t) not in on_grid]  # diffusers skips the first entry
        if off_grid:
            warnings.warn(
                f"the custom timesteps {off_grid} are not on the skipping grid of original_inference_steps="
                f"{original_steps}: results may be unexpected",
                UserWarning,
                stacklevel=3,
            )
        if len(ts) > original_steps:
            warnings.warn(
                f"{len(ts)} custom timesteps are more than original_inference_steps={original_steps}: results may "
                "be unexpected",
                UserWarning,
                stacklevel=3,
            )
        return ts

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in ``timesteps`` (-1 after the last); ``timestep - 1`` before
        ``set_timesteps`` (diffusers' rule)."""
        t = self._check_timestep(timestep)
        if self.num_inference_steps is None:
            return t - 1
        i = self.index_for_timestep(t)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def _check_timestep(self, timestep: Any) -> int:
        t = np.asarray(timestep)
        T = self.config["num_train_timesteps"]
        if t.size != 1 or t.dtype.kind not in "iuf" or not np.isfinite(t).all():
            raise ValueError(f"timestep must be one integer timestep in [0, {T}); got {timestep!r}")
        v = t.reshape(()).item()
        if v != int(v) or not 0 <= v < T:
            raise ValueError(f"timestep must be one integer timestep in [0, {T}); got {timestep!r}")
        return int(v)

    # -- the consistency step ------------------------------------------------------------------------------
    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple[Any, Any]:
        """(c_skip, c_out) of the consistency parameterisation at ``timestep`` (diffusers' formula).

        With s = timestep * timestep_scaling and sigma_data = 0.5: c_skip = sigma_data^2 / (s^2 + sigma_data^2),
        c_out = s / sqrt(s^2 + sigma_data^2), so c_skip -> 1, c_out -> 0 at t = 0 (the boundary condition
        f(x, 0) = x). A scalar gives Python floats (equal to diffusers' for an int), an array float64 arrays of
        its shape.
        """
        t = np.asarray(timestep)
        if t.dtype.kind not in "iuf":
            raise ValueError(f"timestep must be a number or an array of numbers; got {timestep!r}")
        scaling = float(self.config["timestep_scaling"])
        sd2 = self.sigma_data**2
        if t.ndim == 0:
            scaled = float(t.item()) * scaling
            return sd2 / (scaled**2 + sd2), scaled / (scaled**2 + sd2) ** 0.5
        scaled = t.astype(np.float64) * scaling
        return sd2 / (scaled**2 + sd2), scaled / np.sqrt(scaled**2 + sd2)

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, return_dict: bool = True
    ) -> LCMSchedulerOutput | tuple:
        """One LCM step: the consistency function's output ``denoised``, then (except at the last timestep)
        noise to the next timestep.

        Args:
            model_output: float32[B, C, H, W], the model's prediction at ``timestep``.
            timestep: the current entry of ``timesteps``.
            sample: float32[B, C, H, W], x_t.
            generator: ``TorchGenerator``, ``numpy.random.Generator`` or a list of them (one per image); the noise
                of every step but the last (None: unseeded noise).
        Returns:
            ``LCMSchedulerOutput(prev_sample, pred_original_sample=denoised)`` (``.denoised`` too), or the tuple
            ``(prev_sample, denoised)``; arrays in model_output's dtype. At the last step prev_sample is denoised.
        """
        self._check_step_inputs(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        t = self._check_timestep(timestep)
        i = self._current_index(t)
        last = i == len(self.timesteps) - 1
        a_t = float(self.alphas_cumprod[t])
        sqrt_a, sqrt_b = a_t**0.5, (1.0 - a_t) ** 0.5
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(t)

        pt = self._prediction_type
        if pt == "epsilon":
            with np.errstate(divide="ignore", invalid="ignore"):  # a_t = 0 (zero SNR): refused by _check_x0
                x0 = (sample - sqrt_b * model_output) / sqrt_a
        elif pt == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sqrt_a * sample - sqrt_b * model_output
        x0 = self._clip_or_threshold(x0, inplace=x0 is not model_output)
        self._check_x0(x0, t, a_t)

        denoised = x0 * c_out
        denoised += sample * c_skip
        if last:
            prev = denoised
        else:
            a_prev = float(self.alphas_cumprod[self.timesteps[i + 1]])
            noise = self._noise(model_output.shape, generator, denoised.dtype)
            prev = denoised * a_prev**0.5
            prev += noise * (1.0 - a_prev) ** 0.5
        self._step_index = i + 1
        if not return_dict:
            return prev, denoised
        return LCMSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)
