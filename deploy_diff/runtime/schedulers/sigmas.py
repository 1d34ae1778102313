"""Sigma schedules and timestep spacings: plain functions of numbers, no scheduler state.

The sigma-space samplers (Euler, Euler ancestral, Heun, DPM-Solver, UniPC) work on the variance-exploding
view of a schedule, x = x_0 + sigma * noise with sigma_t = sqrt((1 - abar_t) / abar_t). Everything they build
from the schedule lives here, once, in the manner of k-diffusion's ``get_sigmas_*``:

* sigma lists: :func:`karras_sigmas`, :func:`exponential_sigmas`, :func:`lu_sigmas`, :func:`beta_sigmas`
  (its Beta(a, b) quantiles in NumPy, no scipy: :func:`betainc`, :func:`beta_ppf`) and :func:`sigma_ramp`,
  which picks one by name;
* the way back from sigmas to timesteps (:func:`sigma_to_t`, diffusers' ``_sigma_to_t``);
* timestep spacings: :func:`float_spaced_timesteps` (Euler/Heun, fractional), :func:`spaced_timesteps`
  (DDPM/DDIM, n points) and :func:`multistep_spaced_timesteps` (DPM-Solver/UniPC, n + 1 points, last dropped);
* a float32 replica of the ``alphas_cumprod`` diffusers holds (:func:`diffusers_float32_alphas_cumprod`),
  for the integer timesteps diffusers decides through float32 rounding;
* the slope of the probability-flow ODE, k-diffusion's ``to_d`` in closed form (:func:`denoised_and_slope`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "SIGMA_RAMPS",
    "ZERO_SNR_ALPHA_CUMPROD",
    "beta_ppf",
    "beta_sigmas",
    "betainc",
    "check_one_sigma_ramp",
    "cumprod_f32",
    "denoised_and_slope",
    "diffusers_float32_alphas_cumprod",
    "exponential_sigmas",
    "float_spaced_timesteps",
    "karras_sigmas",
    "lu_sigmas",
    "multistep_spaced_timesteps",
    "sigma_ramp",
    "sigma_to_t",
    "sigmas_from_alphas_cumprod",
    "spaced_timesteps",
    "torch_linspace_f32",
]

#: diffusers sets the last alphas_cumprod of a zero-terminal-SNR schedule to this (float16's smallest subnormal)
#: in its sigma-space schedulers, so that the first sigma is finite (~4096) instead of infinite
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

#: config flag -> sigma list of :func:`sigma_ramp` (diffusers' ``use_*_sigmas`` options)
SIGMA_RAMPS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}


# -- the variance-exploding view --------------------------------------------------------------------------------
def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float64[T] sigma_t = sqrt((1 - abar_t) / abar_t) (the variance-exploding view of the schedule)."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep(s) of ``sigma`` by linear interpolation in log-sigma (diffusers' ``_sigma_to_t``).

    Pass float32 ``log_sigmas`` to decide brackets as diffusers does: where the zero-terminal-SNR clamp
    (abar_{T-1} = 2**-24) makes log sigma non-monotonic at the top (``linear``), which bracket a sigma falls
    in is decided by that float32 rounding."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def denoised_and_slope(
    x: np.ndarray,
    model_output: np.ndarray,
    prediction_type: str,
    sigma: float,
    sigma_hat: float | None = None,
    clip_range: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(x_0, d): the model's denoised sample D(x; sigma) and the ODE slope d = (x - x_0) / sigma_hat.

    k-diffusion's ``to_d``, with the slope formed in closed form where it can be (epsilon: the model output
    itself; v_prediction: x sigma^2 / (sigma^2 + 1) / sigma_hat + v sigma / sqrt(sigma^2 + 1) / sigma_hat), which
    avoids the float32 cancellation of x - x_0. ``sigma_hat`` is the churned sigma of Euler (default
    ``sigma``): diffusers takes x_0 = x - sigma_hat * eps for epsilon and the unchurned sigma for v_prediction.
    ``clip_range`` clips x_0 to [-r, r] and then takes the slope from the clipped x_0. A zero ``sigma_hat``
    (trained betas starting at 0) has slope 0: x is x_0 already there.
    """
    sh = sigma if sigma_hat is None else sigma_hat
    inv = 1.0 / sh if sh > 0 else 0.0
    if prediction_type == "epsilon":
        x0 = x - sh * model_output
        d = model_output
    elif prediction_type == "v_prediction":
        # x_0 = c_skip x + c_out v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
        root = math.sqrt(sigma * sigma + 1.0)
        x0 = model_output * (-sigma / root) + x * (1.0 / (sigma * sigma + 1.0))
        d = x * (sigma * sigma / (sigma * sigma + 1.0) * inv) + model_output * (sigma / root * inv)
    else:  # sample
        x0 = model_output
        d = None
    if clip_range is not None:
        x0 = np.clip(x0, -clip_range, clip_range)
        d = None
    if d is None:
        d = (x - x0) * inv
    return x0, d


# -- sigma lists (descending, sampler order) ---------------------------------------------------------------------
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """float64[n] Karras et al. (2022) eq. (5) sigmas, descending from sigma_max to sigma_min (k-diffusion's
    ``get_sigmas_karras`` without the final 0; diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, n, dtype=np.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """float64[n] sigmas evenly spaced in log sigma, descending (diffusers' ``_convert_to_exponential``)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def lu_sigmas(log_sigma_min: float, log_sigma_max: float, n: int) -> np.ndarray:
    """float64[n] sigmas uniform in lambda = -log sigma (Lu et al. 2022; diffusers' ``use_lu_lambdas``)."""
    return np.exp(log_sigma_max + np.linspace(0, 1, n) * (log_sigma_min - log_sigma_max))


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), vectorised over x."""
    tiny = 1e-300

    def guard(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < tiny, tiny, v)

    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 / guard(1.0 - qab * x / qap)
    h = d.copy()
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 / guard(1.0 + aa * d)
            c = guard(1.0 + aa / c)
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
    log_front = aa * np.log(xs) + bb * np.log1p(-xs) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
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


@functools.lru_cache(maxsize=32)
def _beta_quantiles(n: int, alpha: float, beta: float) -> np.ndarray:
    q = beta_ppf(1 - np.linspace(0, 1, n), alpha, beta)
    q.setflags(write=False)
    return q


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """float64[n] sigmas of "Beta Sampling is All You Need" (arXiv 2407.12173): sigma_min +
    ppf(1 - i / (n - 1)) * (sigma_max - sigma_min), descending (diffusers' ``_convert_to_beta``)."""
    return sigma_min + _beta_quantiles(n, alpha, beta) * (sigma_max - sigma_min)


def sigma_ramp(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """float64[n] descending sigmas of ``kind`` ("karras", "exponential" or "beta") from sigma_max to sigma_min.

    Refuses a range that has no such list: sigma_min must be > 0 (a log is taken) and sigma_max finite.
    """
    if not 0 < sigma_min <= sigma_max or not math.isfinite(sigma_max):
        raise ValueError(
            f"use_{kind}_sigmas needs 0 < sigma_min <= sigma_max; got sigma_min={sigma_min}, "
            f"sigma_max={sigma_max} (from the config or the schedule's ends; beta_start=0 gives "
            "sigma_min=0)"
        )
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    if kind == "beta":
        return beta_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"sigma list {kind!r} is not supported; expected one of {list(SIGMA_RAMPS.values())}")


def check_one_sigma_ramp(config) -> None:
    """At most one of ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` (diffusers
    raises ValueError too)."""
    flags = [k for k in SIGMA_RAMPS if config.get(k)]
    if len(flags) > 1:
        raise ValueError(
            f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set; got {flags}"
        )


# -- timestep spacings (descending) ------------------------------------------------------------------------------
def _unknown_spacing(spacing: str) -> ValueError:
    return ValueError(
        f"timestep_spacing={spacing!r} is not supported; expected one of ['linspace', 'leading', 'trailing']"
    )


def spaced_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """int64[n] timesteps of diffusers' DDPM/DDIM rule (``trailing`` can give n + 1, the last -1)."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    raise _unknown_spacing(spacing)


def float_spaced_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """float32[n] timesteps of diffusers' Euler/Heun rule.

    ``linspace`` keeps fractional values (e.g. 749.25); ``leading`` / ``trailing`` are whole numbers. Like
    diffusers, ``trailing`` can yield n + 1 entries when ``np.arange`` rounds up (e.g. n = 61 with T = 1000),
    the extra one being -1 (its sigma is clamped to sigma at t = 0).
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(steps_offset)
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round().copy().astype(np.float32) - np.float32(1)
    raise _unknown_spacing(spacing)


def multistep_spaced_timesteps(
    num_train_timesteps: int, n: int, spacing: str, steps_offset: int, last: int | None = None
) -> np.ndarray:
    """int64[n] timesteps of diffusers' DPM-Solver/UniPC rule: n + 1 points with the 0 dropped, below ``last``
    (default ``num_train_timesteps``; DPM-Solver's ``lambda_min_clipped`` lowers it). ``trailing`` can give
    n + 1 entries, the last -1 (kept as diffusers keeps it)."""
    T = num_train_timesteps
    last = T if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + int(steps_offset)
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    raise _unknown_spacing(spacing)


# -- diffusers' float32 schedule ----------------------------------------------------------------------------------
def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32[steps] equal to ``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU.

    torch computes ``step = (end - start) / (steps - 1)`` in float32 and then ``start + step * i`` for the
    first half, ``end - step * (steps - 1 - i)`` for the second, each with one rounding (a fused multiply-add);
    the float64 product of a float32 and an int is exact, so one float64 add then a cast reproduces it.
    """
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + step * i
    second = np.float64(e) - step * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, first, second).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 tensor on the CPU: accumulated in float64, each output cast to float32."""
    return np.cumprod(np.asarray(x).astype(np.float64)).astype(np.float32)


def diffusers_float32_alphas_cumprod(
    raw_betas: np.ndarray, rescale_betas_zero_snr: bool = False, linspace: tuple[float, float, bool] | None = None
) -> np.ndarray:
    """float32[T] alphas_cumprod as diffusers' sigma-space schedulers hold it.

    diffusers builds ``linear`` / ``scaled_linear`` betas with torch's float32 ``linspace`` (pass
    ``linspace=(beta_start, beta_end, squared)`` to replay it) and casts any other betas (trained ones,
    ``squaredcos_cap_v2``'s Python floats) to float32; it rescales them for zero terminal SNR with float32
    ops, takes ``torch.cumprod`` (float64 accumulation, float32 entries) and then clamps the last entry to
    :data:`ZERO_SNR_ALPHA_CUMPROD`. Used where diffusers' float32 rounding decides an integer: the timesteps of
    Karras / Lu / exponential / beta sigmas and DPM-Solver's ``lambda_min_clipped`` cut. With zero terminal
    SNR, torch's float32 ``sqrt`` (not correctly rounded) cannot be replayed bit for bit.
    """
    f32 = np.float32
    if linspace is not None:
        start, end, squared = linspace
        if squared:
            betas = torch_linspace_f32(start**0.5, end**0.5, len(raw_betas))
            betas = betas * betas
        else:
            betas = torch_linspace_f32(start, end, len(raw_betas))
    else:
        betas = np.asarray(raw_betas, dtype=np.float64).astype(f32)
    if rescale_betas_zero_snr:  # diffusers' rescale_zero_terminal_snr (Lin et al. 2023), op for op in float32
        s = np.sqrt(cumprod_f32(f32(1) - betas))
        s0, sT = s[0], s[-1]
        s = (s - sT) * (s0 / (s0 - sT))
        ab = s * s
        betas = f32(1) - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    ac = cumprod_f32(f32(1) - betas)
    if rescale_betas_zero_snr:
        ac[-1] = f32(ZERO_SNR_ALPHA_CUMPROD)
    return ac
