"""DDIM (Song et al. 2021): the non-Markovian sampler; eta = 0 is deterministic, eta = 1 is DDPM-like."""

from __future__ import annotations

import numpy as np

from ..arguments import check_eta
from .base import BaseScheduler, SchedulerOutput, register_to_config


class DDIMScheduler(BaseScheduler):
    """diffusers' ``DDIMScheduler`` in NumPy (same constructor arguments and defaults).

    The previous timestep is the *next entry of* ``timesteps`` (then ``final_alpha_cumprod``), not diffusers'
    ``t - T // n``: the two agree for ``leading`` spacing and for ``trailing`` when n divides T. This and the
    other deliberate differences (eta > 0 on a zero-terminal-SNR schedule, zero betas): see docs/parity.md.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):  # fmt: skip
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self._validate_common()
        # abar used after the last step: 1 (a clean image) or abar_0
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(0, num_train_timesteps)[::-1].astype(np.int64)
        self._prev_of: dict[int, int] = {}
        self._coefs: dict[int, tuple[float, float]] = {}
        self._prediction_type = prediction_type

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """DDIM needs no input scaling; returns ``sample`` unchanged."""
        return sample

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``timestep_spacing``."""
        n = self._check_num_inference_steps(num_inference_steps)
        ts = self._spaced_timesteps(n)
        T = self.config["num_train_timesteps"]
        if ts.max() >= T:
            raise ValueError(
                f"steps_offset={self.config['steps_offset']} pushes timestep {ts.max()} past num_train_timesteps={T}"
            )
        self.num_inference_steps = n
        self.timesteps = ts
        self._prev_of = {int(t): int(p) for t, p in zip(ts, list(ts[1:]) + [-1])}
        # per-step coefficients, float64 -> Python floats, looked up once per step (the hot path)
        self._coefs = {t: self._alpha_prods(t) for t in self._prev_of}

    def previous_timestep(self, timestep) -> int:
        t = int(timestep)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if t not in self._prev_of:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps {list(self.timesteps)}")
        return self._prev_of[t]

    def _alpha_prods(self, t: int) -> tuple[float, float]:
        prev_t = self.previous_timestep(t)
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[t]), a_prev

    def _get_variance(self, timestep, prev_timestep=None) -> float:
        """sigma_t^2 / eta^2 of eq. (16)."""
        a_t, a_prev = self._alpha_prods(int(timestep))
        return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) if a_t < 1 else 0.0

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t_prev} (eq. 12 of the paper).

        Args:
            model_output: float32[B, C, H, W]; sample: float32[B, C, H, W] (x_t).
            eta: weight of the noise (0 deterministic DDIM, 1 DDPM-like); must be >= 0.
            use_clipped_model_output: recompute epsilon from the clipped x_0.
            generator / variance_noise: the source of the eta > 0 noise (not both).
        """
        self._check_step_inputs(model_output, sample)
        eta = check_eta(eta)
        t = int(timestep)
        coefs = self._coefs.get(t) if self.num_inference_steps is not None else None
        a_t, a_prev = coefs if coefs is not None else self._alpha_prods(t)
        b_t = 1 - a_t
        sqrt_a, sqrt_b = a_t**0.5, b_t**0.5

        pt = self._prediction_type
        if pt == "epsilon":
            eps = model_output
            if a_t > 0:
                x0 = model_output * -sqrt_b
                x0 += sample
                x0 *= 1.0 / sqrt_a
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    x0 = (sample - sqrt_b * model_output) / sqrt_a
        elif pt == "sample":
            x0 = model_output
            # sqrt_b = 0 only where every beta up to t is 0: x_t is x_0 and no noise direction exists
            eps = (sample - sqrt_a * x0) / sqrt_b if sqrt_b > 0 else np.zeros_like(sample)
        else:
            x0 = sqrt_a * sample - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * sample
        x0 = self._clip_or_threshold(x0, inplace=x0 is not model_output)
        self._check_x0(x0, t, a_t)

        # eq. (16): sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
        # b_t = 0 only where every beta up to t is 0 (beta_start = 0 at t = 0): x_t is x_0, no noise to add
        std_dev_t = eta * ((1 - a_prev) / b_t * (1 - a_t / a_prev)) ** 0.5 if eta and b_t > 0 else 0.0
        if use_clipped_model_output:
            eps = (sample - sqrt_a * x0) / sqrt_b if sqrt_b > 0 else np.zeros_like(sample)
        # eq. (12): "direction pointing to x_t"; clamp at 0 (zero-SNR with eta = 1 rounds to -1e-16)
        direction = max(1 - a_prev - std_dev_t**2, 0.0) ** 0.5
        prev = x0 * a_prev**0.5
        prev += eps * direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = self._noise(model_output.shape, generator, model_output.dtype)
            elif variance_noise.shape != model_output.shape:
                raise ValueError(f"variance_noise has shape {variance_noise.shape}; expected {model_output.shape}")
            prev += std_dev_t * variance_noise
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
