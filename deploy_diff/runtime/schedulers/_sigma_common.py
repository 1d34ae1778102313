"""What the sigma-space (k-diffusion style) schedulers share: Euler, Euler ancestral and Heun.

These samplers work on the variance-exploding view of the schedule, x = x_0 + sigma * noise with
sigma_t = sqrt((1 - abar_t) / abar_t), and walk down a list of sigmas. Shared here:

* diffusers' fractional float32 timestep spacings (``linspace`` is *not* rounded, unlike DDPM/DDIM);
* the Karras / exponential / beta sigma lists (the beta one without scipy: a NumPy inverse of the
  regularised incomplete beta function);
* the step-index bookkeeping a pipeline sees (diffusers' ``_step_index`` / ``_begin_index`` /
  ``index_for_timestep``), ``scale_model_input``, ``init_noise_sigma`` and the sigma-space ``add_noise``.

This module belongs to the Euler/Heun family; nothing here needs to live in ``base.py``, but a future
sigma-space scheduler could reuse :class:`SigmaSchedulerMixin`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .base import check_choice

__all__ = [
    "SigmaSchedulerMixin",
    "beta_ppf",
    "betainc",
    "beta_sigmas",
    "check_sigma_options",
    "compute_dtype_view",
    "exponential_sigmas",
    "float_spaced_timesteps",
    "karras_sigma_list",
    "reject_integer_timestep",
]


# -- timesteps ---------------------------------------------------------------------------------------
def float_spaced_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """float32 descending timesteps, computed with exactly diffusers' NumPy calls for Euler/Heun.

    ``linspace`` keeps fractional values (e.g. 749.25); ``leading`` / ``trailing`` are whole numbers. Like
    diffusers, ``trailing`` can yield n + 1 entries when ``np.arange`` rounds up (e.g. n = 61 with T = 1000),
    the extra one being -1 (its sigma is clamped to sigma at t = 0).
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        ratio = T / n
        return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - np.float32(1)
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; expected one of "
                     "['linspace', 'leading', 'trailing']")


# -- sigma lists -------------------------------------------------------------------------------------
def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """float64[n] sigmas evenly spaced in log sigma, descending from ``sigma_max`` to ``sigma_min``."""
    if not 0 < sigma_min <= sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"use_exponential_sigmas needs 0 < sigma_min <= sigma_max; got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max} (beta_start=0 gives sigma_min=0)")
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), vectorised over x."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def betainc(a: float, b: float, x) -> np.ndarray:
    """Regularised incomplete beta function I_x(a, b) (the Beta(a, b) CDF), float64, vectorised over x."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    swap = x > (a + 1.0) / (a + b + 2.0)  # the continued fraction converges fast below this point
    aa = np.where(swap, b, a)
    bb = np.where(swap, a, b)
    xx = np.where(swap, 1.0 - x, x)
    inner = (xx > 0) & (xx < 1)
    xs = np.where(inner, xx, 0.5)
    log_front = (aa * np.log(xs) + bb * np.log1p(-xs)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    val = np.exp(log_front) / aa * _betacf(aa, bb, xs)
    val = np.where(inner, val, np.where(xx <= 0, 0.0, 1.0))
    return np.where(swap, 1.0 - val, val)


def beta_ppf(q, a: float, b: float) -> np.ndarray:
    """Inverse of :func:`betainc` in x (scipy's ``beta.ppf``) by bisection to float64 resolution."""
    q = np.asarray(q, dtype=np.float64)
    lo = np.zeros_like(q)
    hi = np.ones_like(q)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = betainc(a, b, mid) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    out = 0.5 * (lo + hi)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, out))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """float64[n] sigmas of "Beta Sampling is All You Need" (arXiv 2407.12173): sigma_min +
    ppf(1 - i / (n - 1)) * (sigma_max - sigma_min), descending (diffusers' ``_convert_to_beta``)."""
    ppf = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def karras_sigma_list(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """float64[n] Karras et al. (2022) eq. (5) sigmas, descending (diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def check_sigma_options(config: dict[str, Any]) -> None:
    """At most one of the Karras / exponential / beta sigma lists (diffusers raises ValueError too)."""
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if len(flags) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be "
                         f"set; got {flags}")
    check_choice("timestep_spacing", config["timestep_spacing"], ("linspace", "leading", "trailing"))


_FLOAT_SCALARS = (np.float32, float, np.float64)
_WIDE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def compute_dtype_view(sample: np.ndarray, model_output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample, model_output) in the dtype diffusers' Euler steps compute in: float32, or float64 for a
    float64 sample (float16 is upcast, as diffusers does); no copies when nothing changes."""
    x = sample if sample.dtype in _WIDE_FLOATS else sample.astype(np.float32)
    mo = model_output if model_output.dtype == x.dtype else model_output.astype(x.dtype)
    return x, mo


def _as_float_timestep(timestep: Any) -> np.ndarray:
    t = np.asarray(timestep)
    if t.size != 1:
        raise ValueError(f"timestep must be a single value (one entry of scheduler.timesteps); got shape {t.shape}")
    return t.reshape(())


def reject_integer_timestep(cls_name: str, timestep: Any) -> None:
    """diffusers' Euler schedulers refuse integer timesteps (usually an index from ``enumerate``)."""
    if type(timestep) in _FLOAT_SCALARS or isinstance(timestep, bool):
        return
    if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, np.ndarray) and timestep.dtype.kind in "iu"):
        raise ValueError(f"{cls_name}.step() got the integer timestep {timestep!r}: passing indices (e.g. from "
                         "enumerate(timesteps)) is not supported; pass an entry of scheduler.timesteps")


class SigmaSchedulerMixin:
    """Step-index bookkeeping, input scaling and noising of the sigma-space schedulers.

    A subclass sets ``self.timesteps`` (float32[n]) and ``self.sigmas`` (float64[n + 1], the last one the
    sigma after the final step) in ``__init__`` and ``set_timesteps`` and then calls ``_reset_state()``.
    """

    _needs_positive_sigma_min = True

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
        self._sigma_list = [float(s) for s in self.sigmas]
        # diffusers holds sigmas in float32 and compares them with s_tmin / s_tmax there
        self._sigma32_list = [float(s) for s in self.sigmas.astype(np.float32)]
        self._input_scale = [math.sqrt(s * s + 1.0) for s in self._sigma_list]

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: sigma_max for ``linspace``/``trailing`` spacing,
        sqrt(sigma_max^2 + 1) for ``leading`` (as diffusers)."""
        max_sigma = float(np.max(self.sigmas))
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return math.sqrt(max_sigma**2 + 1.0)


    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``).

        Where the value occurs more than once (Heun's repeated timesteps) the *second* occurrence is
        taken, as diffusers does, so a loop that starts mid-schedule (img2img) does not skip a sigma.
        """
        schedule = self.timesteps if schedule_timesteps is None else np.asarray(schedule_timesteps)
        t = _as_float_timestep(timestep).astype(schedule.dtype)  # compared in the schedule's dtype, as torch
        indices = np.flatnonzero(schedule == t)
        if indices.size == 0:
            raise ValueError(f"timestep {float(t)!r} is not one of this scheduler's timesteps "
                             f"{schedule.tolist() if schedule.size <= 20 else '(' + str(schedule.size) + ' values)'}")
        return int(indices[1] if indices.size > 1 else indices[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _current_index(self, timestep: Any) -> int:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        assert i is not None
        if i >= len(self.timesteps):
            raise ValueError(f"step {i} is past the last of the {len(self.timesteps)} timesteps; call "
                             "set_timesteps() again to start a new loop")
        return i

    def _warn_if_not_scaled(self) -> None:
        if not self.is_scale_input_called:
            warnings.warn("scale_model_input() should be called before step() to ensure correct denoising "
                          "(the model input is the sample divided by sqrt(sigma^2 + 1))", UserWarning, stacklevel=3)

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
    def _train_sigmas(self) -> np.ndarray:
        """float64[T] sigma_t for t = 0 .. T-1 (ascending in t)."""
        ac = self.alphas_cumprod  # type: ignore[attr-defined]
        return np.sqrt((1.0 - ac) / ac)

    def _converted_sigmas(self, in_sigmas: np.ndarray, n: int) -> np.ndarray | None:
        """Karras / exponential / beta sigmas (float64[n]) spanning ``in_sigmas``, or None when none is set."""
        c = self.config
        kind = next((k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)), None)
        if kind is None:
            return None
        cfg_min, cfg_max = c.get("sigma_min"), c.get("sigma_max")
        sigma_min = float(cfg_min) if cfg_min is not None else float(in_sigmas[-1])
        sigma_max = float(cfg_max) if cfg_max is not None else float(in_sigmas[0])
        if not 0 < sigma_min <= sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f"{kind} needs 0 < sigma_min <= sigma_max; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max} (from the config or the schedule's ends)")
        if kind == "use_karras_sigmas":
            return karras_sigma_list(sigma_min, sigma_max, n)
        if kind == "use_exponential_sigmas":
            return exponential_sigmas(sigma_min, sigma_max, n)
        return beta_sigmas(sigma_min, sigma_max, n)

    def _log_sigmas32(self) -> np.ndarray:
        return np.log(self._train_sigmas().astype(np.float32))
